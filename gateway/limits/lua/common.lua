-- Shared helpers, prepended to every script of this directory (gateway/limits/redis.py).
-- The arithmetic repeats gateway/limits/policy.py; times are seconds (floats) on the
-- Redis server clock (TIME), so every replica shares one clock.

local function now_seconds()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- A float as a reply string (Lua numbers become truncated integers in replies).
local function num(x)
  return string.format('%.17g', x)
end

-- Round seconds up to a whole microsecond (policy.ceil_microseconds).
local function ceil_us(x)
  local r = math.ceil(x * 1000000) / 1000000
  if r < x then return x end
  return r
end

-- Keep a key at least ttl_seconds longer (PEXPIRE on every key; never shortens).
local function keep_for(key, ttl_seconds)
  local ms = math.ceil(ttl_seconds * 1000) + 1
  local pttl = redis.call('PTTL', key)
  if pttl < ms then
    redis.call('PEXPIRE', key, ms)
  end
end

-- Token bucket balance at now (policy.refill); a missing bucket is full.
local function refill(key, tpm, now)
  local state = redis.call('HMGET', key, 'b', 'ts')
  if not state[1] or not state[2] then
    return tpm
  end
  local elapsed = now - tonumber(state[2])
  if elapsed < 0 then elapsed = 0 end
  local balance = tonumber(state[1]) + elapsed * tpm / 60
  if balance > tpm then balance = tpm end
  return balance
end

-- Store a bucket (policy.bucket_state_ttl); a full bucket is the same as none.
local function store_bucket(key, tpm, balance, now)
  local ttl = (tpm - balance) / (tpm / 60)
  if ttl <= 0 then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'b', num(balance), 'ts', num(now))
  redis.call('PEXPIRE', key, math.ceil(ttl * 1000) + 1)
end

-- Drop expired leases (score = expiry <= now) from a sorted set of slots.
local function drop_expired(key, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', num(now))
end

-- GCRA for one user action (policy.gcra, burst = rate): nil when it passes (the new
-- theoretical arrival time is stored), else the seconds until it would (nothing written).
local function gcra(key, rate, tolerance, now)
  local interval = 60 / rate
  local tat = tonumber(redis.call('GET', key) or '')
  if tat == nil or tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - rate * interval
  if allow_at - now > tolerance then
    return ceil_us(allow_at - now)
  end
  redis.call('SET', key, num(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1)
  return nil
end
