-- heartbeat: ARGV[4] number of permits n, then n quadruples (permit id,
-- fencing token, when Redis last held it for sure in ms, its epoch: see
-- stale) for the permits this process holds; then the number of ids to
-- give back r and r quadruples (releases, as above, and cancellations,
-- token 0, that did not reach Redis when they were made);
-- then pairs (waiter id, ms left before its deadline or -1) for the
-- waiters it has queued.
--
-- Renews the process's leases and waiters, reclaims expired ones, grants
-- freed slots. Permits Redis does not know are put back (see below).
-- Waiters Redis no longer knows are reported lost (their process queues
-- them again).
-- Returns {processes alive, in use, {permits put back}, {lost waiters},
-- how many were put back beyond the capacity, {"waiter-id token" found
-- granted}, {permits and releases found stale: their lease was lost},
-- the resource's epoch, Redis's time in ms (when the permits renewed were
-- held for sure), wake-ups}.
local bad = check_config(true)
if bad then
  return redis.error_reply(bad)
end
purge()
redis.call('ZADD', procs, now + lease, process)
redis.call('ZREMRANGEBYSCORE', procs, '-inf', now)
redis.call('PEXPIRE', procs, notify_ttl)
if redis.call('EXISTS', notify) == 1 then
  redis.call('PEXPIRE', notify, notify_ttl)
end
-- The ticket counter lives while processes use the resource: were it to
-- start again while waiters are queued, newcomers would pass them.
if redis.call('EXISTS', ticket) == 1 then
  redis.call('PEXPIRE', ticket, config_ttl)
end
local n = tonumber(ARGV[4])
local first = 5 + 4 * n  -- ARGV index of r
local r = tonumber(ARGV[first])
-- Renewals and releases follow one rule (see stale): a stale one changes
-- nothing and is reported lost.
local lost = {}
for i = first + 1, first + 4 * r, 4 do
  local id, token = ARGV[i], ARGV[i + 1]
  drop_waiter(id)
  if stale(id, token, ARGV[i + 2], ARGV[i + 3]) then
    table.insert(lost, id)
  else
    drop_holder(id)
  end
end
-- Every other permit the process holds is a running request. One that
-- Redis does not hold and that is not stale (its lease ran out while a
-- slot was free anyway, admitted by on_error during an outage, or Redis
-- lost its data and granted nothing since) is put back even beyond the
-- capacity, so that no slot is granted while the requests really running
-- fill it.
local added = {}
local over = 0
for i = 5, 4 + 4 * n, 4 do
  local id, token = ARGV[i], ARGV[i + 1]
  if stale(id, token, ARGV[i + 2], ARGV[i + 3]) then
    table.insert(lost, id)
  elseif redis.call('ZSCORE', holders, id) then
    redis.call('ZADD', holders, now + lease, id)
  else
    table.insert(added, id)
    if redis.call('ZCARD', holders) >= capacity then
      over = over + 1
    end
    redis.call('ZADD', holders, now + lease, id)
    if tonumber(token) > 0 then
      redis.call('HSET', tokens, id, token)
    end
  end
end
local lost_waiters = {}
local granted = {}
for i = first + 1 + 4 * r, #ARGV, 2 do
  local id = ARGV[i]
  local left = tonumber(ARGV[i + 1])
  if redis.call('ZSCORE', queue, id) then
    local expiry = now + lease
    if left >= 0 and now + left < expiry then
      expiry = now + left
    end
    redis.call('ZADD', wexp, expiry, id)
  elseif redis.call('ZSCORE', holders, id) then
    -- Granted, the notification not read yet (or lost with its reply):
    -- renew its lease and tell the process, which resolves the waiter.
    redis.call('ZADD', holders, now + lease, id)
    table.insert(granted, id .. ' ' .. (redis.call('HGET', tokens, id) or '0') .. ' ' .. epoch())
  else
    table.insert(lost_waiters, id)
  end
end
grant_free()
return reply({redis.call('ZCARD', procs), redis.call('ZCARD', holders), added, lost_waiters, over,
  granted, lost, epoch(), now})
