-- charge: refill the tenant's token bucket, then debit usage; never refuses, the
-- balance may go below zero.  See gateway.limits.base.Limiter.charge.
--
-- KEYS[1] tenant token bucket (HASH b=balance ts=time)
-- ARGV[1] tokens_per_minute (> 0)   ARGV[2] tokens to debit (>= 0)
-- Reply: the balance after the debit.
local now = now_seconds()
local tpm = tonumber(ARGV[1])
local balance = refill(KEYS[1], tpm, now) - tonumber(ARGV[2])
store_bucket(KEYS[1], tpm, balance, now)
return num(balance)
