-- throttle: a user's rate (GCRA) for an action that is not a session start, e.g. minting
-- client secrets.  See gateway.limits.base.Limiter.throttle.
--
-- KEYS[1] the action's GCRA theoretical arrival time for the user (string)
-- ARGV[1] rate per minute      ARGV[2] GCRA tolerance seconds
-- Reply: {'ok'} or {'start_rate', retry_after_seconds}.  A refusal writes nothing.
local now = now_seconds()
local wait = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now)
if wait ~= nil then
  return {'start_rate', num(wait)}
end
return {'ok'}
