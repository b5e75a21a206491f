-- admit: token budget, tenant + user concurrency (leased slots), user start rate (GCRA),
-- all or nothing.  See gateway.limits.base.Limiter.admit.
--
-- KEYS[1] tenant slots (ZSET member=session_id score=lease expiry)
-- KEYS[2] user slots (ZSET)
-- KEYS[3] user GCRA theoretical arrival time (string)
-- KEYS[4] tenant token bucket (HASH b=balance ts=time)
-- ARGV[1] session_id          ARGV[2] lease seconds
-- ARGV[3] max_sessions         ARGV[4] max_sessions_per_user
-- ARGV[5] starts per minute    ARGV[6] tokens_per_minute     (0 = no limit)
-- ARGV[7] concurrency retry_after seconds
-- ARGV[8] GCRA tolerance seconds
-- Reply: {'ok'} or {limit, retry_after_seconds} with limit one of
-- tokens | tenant_sessions | user_sessions | start_rate.  A refusal writes nothing.
local now = now_seconds()
local session = ARGV[1]
local lease = tonumber(ARGV[2])
local max_tenant = tonumber(ARGV[3])
local max_user = tonumber(ARGV[4])
local rate = tonumber(ARGV[5])
local tpm = tonumber(ARGV[6])
local busy_retry = ARGV[7]
local tolerance = tonumber(ARGV[8])

if tpm > 0 then
  local balance = refill(KEYS[4], tpm, now)
  if balance <= 0 then
    return {'tokens', num(ceil_us(-balance / (tpm / 60) + 0.001))}
  end
end

drop_expired(KEYS[1], now)
drop_expired(KEYS[2], now)

local function full(key, limit)
  if limit <= 0 then return false end
  local n = redis.call('ZCARD', key)
  if redis.call('ZSCORE', key, session) then n = n - 1 end
  return n >= limit
end

if full(KEYS[1], max_tenant) then
  return {'tenant_sessions', busy_retry}
end
if full(KEYS[2], max_user) then
  return {'user_sessions', busy_retry}
end

if rate > 0 then
  local wait = gcra(KEYS[3], rate, tolerance, now)
  if wait ~= nil then
    return {'start_rate', num(wait)}
  end
end

local expiry = now + lease
redis.call('ZADD', KEYS[1], num(expiry), session)
redis.call('ZADD', KEYS[2], num(expiry), session)
keep_for(KEYS[1], lease)
keep_for(KEYS[2], lease)
return {'ok'}
