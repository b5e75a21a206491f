-- renew: extend a live session's lease in both slot sets, re-adding it when it was lost
-- (Redis restart, FLUSHALL, expiry) even above the limits; return the token balance.
-- See gateway.limits.base.Limiter.renew.
--
-- KEYS[1] tenant slots (ZSET)   KEYS[2] user slots (ZSET)   KEYS[3] tenant token bucket
-- ARGV[1] session_id   ARGV[2] lease seconds   ARGV[3] tokens_per_minute (0 = no limit)
-- Reply: {re_added (0|1|2: slots that had been lost), balance or ''}
local now = now_seconds()
local session = ARGV[1]
local lease = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])

drop_expired(KEYS[1], now)
drop_expired(KEYS[2], now)
local expiry = num(now + lease)
local added = redis.call('ZADD', KEYS[1], expiry, session)
added = added + redis.call('ZADD', KEYS[2], expiry, session)
keep_for(KEYS[1], lease)
keep_for(KEYS[2], lease)

local balance = ''
if tpm > 0 then
  balance = num(refill(KEYS[3], tpm, now))
end
return {added, balance}
