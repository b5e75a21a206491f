-- release: free a session's slots at once; an unknown session is a no-op.
-- See gateway.limits.base.Limiter.release.
--
-- KEYS[1] tenant slots (ZSET)   KEYS[2] user slots (ZSET)   ARGV[1] session_id
-- Reply: number of slots removed (0, 1 or 2).
return redis.call('ZREM', KEYS[1], ARGV[1]) + redis.call('ZREM', KEYS[2], ARGV[1])
