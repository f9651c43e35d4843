-- acquire: ARGV[4] waiter id, ARGV[5] longest wait in ms (0: take a free
-- slot or give up; -1: no deadline).
-- Returns {status, in use, fencing token ('0' unless granted), epoch (see
-- stale), wake-ups}:
-- status 1 granted (the waiter id is now a permit with a lease), 0 queued (its process is told on its notify list when
-- granted), -1 no free slot and no wait.
local bad = check_config()
if bad then
  return redis.error_reply(bad)
end
local id = ARGV[4]
local wait = tonumber(ARGV[5])
-- The common case, nobody queued (so no waiter to purge: a waiter is in
-- the queue and its deadlines alike), no lease ended and a slot free, in
-- as few commands as the rules below allow: the same grant, token and
-- keys' time to live, without the purge and hand-off passes that would
-- find nothing to do. Any other case (a retry of a granted acquire
-- included: ZADD NX adds nothing) takes the general path.
if redis.call('ZCARD', queue) == 0 and redis.call('ZCOUNT', holders, '-inf', now) == 0 then
  local in_use = redis.call('ZCARD', holders)
  if in_use < capacity and redis.call('ZADD', holders, 'NX', now + lease, id) == 1 then
    local token = grant_token(id, in_use + 1)
    expire_holders(tonumber(redis.call('ZRANGE', holders, -1, -1, 'WITHSCORES')[2]), true)
    return {1, in_use + 1, token, epoch(), notices}
  end
end
purge()
grant_free()
if redis.call('ZSCORE', holders, id) then
  -- A retry of a granted acquire.
  return reply({1, redis.call('ZCARD', holders), redis.call('HGET', tokens, id) or '0', epoch()})
end
if redis.call('ZSCORE', queue, id) then
  return reply({0, redis.call('ZCARD', holders), '0'})  -- a retry of a queued acquire
end
local in_use = redis.call('ZCARD', holders)
if in_use < capacity and redis.call('ZCARD', queue) == 0 then
  redis.call('ZADD', holders, now + lease, id)
  local token = grant_token(id)
  return reply({1, in_use + 1, token, epoch()})
end
if wait == 0 then
  return reply({-1, in_use, '0'})
end
local expiry = now + lease
if wait > 0 and now + wait < expiry then
  expiry = now + wait
end
redis.call('ZADD', queue, redis.call('INCR', ticket), id)
redis.call('PEXPIRE', ticket, config_ttl)
redis.call('ZADD', wexp, expiry, id)
redis.call('HSET', wmeta, id, process .. ' ' .. notify)
redis.call('PEXPIRE', notify, notify_ttl)
-- The process is alive (it may not have sent a heartbeat yet).
redis.call('ZADD', procs, now + lease, process)
redis.call('PEXPIRE', procs, notify_ttl)
return reply({0, in_use, '0'})
