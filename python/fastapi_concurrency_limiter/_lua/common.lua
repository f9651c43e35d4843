-- Shared by every script of the cluster-scope protocol; each script is this
-- prelude followed by its own body, run atomically by EVALSHA.
--
-- Keys of one resource, all under the hash tag {prefix:name}, so that they
-- live in one Redis Cluster slot:
--   KEYS[1] holders  ZSET  permit id -> lease expiry (ms, Redis time)
--   KEYS[2] queue    ZSET  waiter id -> ticket (from KEYS[3]): FIFO order
--   KEYS[3] ticket   counter (INCR)
--   KEYS[4] wexp     ZSET  waiter id -> when a waiter is dropped (ms): its
--                    deadline, or one lease after its process last spoke
--   KEYS[5] wmeta    HASH  waiter id -> "process notify-list" of its process
--                    and the notify list of its event loop's client
--   KEYS[6] config   the capacity every process must agree on
--   KEYS[7] procs    ZSET  process id -> liveness expiry (ms): one lease
--                    after its last heartbeat (or queued acquire)
--   KEYS[8] notify   LIST  the notify list of the calling client (one per
--                    process and event loop; same hash tag); other
--                    clients' lists are pushed by the notify script
--   KEYS[9] fence    the last fencing token granted (see grant_token)
--   KEYS[10] tokens  HASH  permit id -> its fencing token
--   KEYS[11] filled  HASH  'at': when (ms) a grant last filled the
--                    capacity; 'epoch': when these keys were created (a
--                    Redis that lost its data, or keys that expired, start
--                    a new epoch). See stale.
-- ARGV[1] capacity, ARGV[2] lease (ms), ARGV[3] process id; then the
-- script's own arguments from ARGV[4] on.
--
-- A waiter id becomes its permit id when granted, so a retried call finds
-- what the first one did (acquire is idempotent per waiter id).

local holders, queue, ticket, wexp, wmeta, config, procs, notify, fence, tokens, filled =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10],
  KEYS[11]
local capacity = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local process = ARGV[3]

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- The capacity key outlives the processes that set it by a few leases, so a
-- new capacity can be rolled out once every process of the old one is gone.
local config_ttl = math.max(3 * lease, 60000)
-- A notify list nobody reads any more (its process died) goes away.
local notify_ttl = 3 * lease

-- Returns an error message when this process disagrees on the capacity.
-- Sets it when missing; the heartbeat (refresh) keeps it alive.
local function check_config(refresh)
  local current = redis.call('GET', config)
  if current and tonumber(current) ~= capacity then
    return 'CAPACITY_MISMATCH resource has capacity ' .. current ..
      ' in Redis, this process says ' .. capacity
  end
  if refresh or not current then
    redis.call('SET', config, capacity, 'PX', config_ttl)
  end
  return nil
end

-- A grant's fencing token: strictly increasing per resource, also across
-- the expiry of the fence key or a Redis restart that lost it: at least
-- the Redis clock in microseconds (so it keeps growing as long as the
-- clock of Redis does not go back).
-- ``held``: the number of holders with this grant, when the caller knows
-- it.
local function grant_token(id, held)
  local last = tonumber(redis.call('GET', fence) or '0')
  local token = math.max(last + 1, now * 1000)
  local text = string.format('%.0f', token)
  redis.call('SET', fence, text, 'PX', config_ttl)
  redis.call('HSET', tokens, id, text)
  if (held or redis.call('ZCARD', holders)) >= capacity then
    redis.call('HSET', filled, 'at', now)
  end
  return text
end

-- A permit leaves the holders (released, passed on, expired).
local function drop_holder(id)
  redis.call('HDEL', tokens, id)
  return redis.call('ZREM', holders, id)
end

-- The resource's epoch (see KEYS[11]), created when missing; read once
-- per script (nothing deletes that key while a script runs).
local known_epoch = nil
local function epoch()
  if known_epoch then
    return known_epoch
  end
  local current = redis.call('HGET', filled, 'epoch')
  if not current then
    current = tostring(now)
    redis.call('HSET', filled, 'epoch', current)
    redis.call('PEXPIRE', filled, config_ttl)
  end
  known_epoch = current
  return current
end

-- The one rule for a renewal or a release of permit ``id``, given its
-- fencing token ``token`` (0: admitted by on_error, no token), when Redis
-- last held it for sure ``since`` (ms: its grant or its last renewal) and
-- the epoch it was held in: true when it is stale, so that it changes
-- nothing and its process is told that the lease was lost. Stale: Redis
-- holds the permit under another token; or Redis does not hold it and a
-- grant filled the capacity without it: after its lease ran out (same
-- epoch), or after ``since`` when Redis lost it (another epoch: a restart,
-- a failover). A permit that lapsed while a slot was free anyway ran within
-- the capacity: not stale.
local function stale(id, token, since, held_in)
  token = tonumber(token) or 0
  if token <= 0 then
    return false
  end
  if redis.call('ZSCORE', holders, id) then
    local stored = tonumber(redis.call('HGET', tokens, id) or '0')
    return stored ~= 0 and stored ~= token
  end
  local at = tonumber(redis.call('HGET', filled, 'at') or '0')
  since = tonumber(since) or 0
  if held_in ~= '' and held_in ~= epoch() then
    return at > since
  end
  return at >= since + lease
end

local function drop_waiter(id)
  redis.call('ZREM', queue, id)
  redis.call('ZREM', wexp, id)
  redis.call('HDEL', wmeta, id)
end

-- Leases of crashed or paused holders end; waiters past their deadline, or
-- of processes that stopped speaking, leave the queue.
local function purge()
  local ended = redis.call('ZRANGEBYSCORE', holders, '-inf', now)
  for _, id in ipairs(ended) do
    redis.call('HDEL', tokens, id)
  end
  if #ended > 0 then
    redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
  end
  local gone = redis.call('ZRANGEBYSCORE', wexp, '-inf', now)
  for _, id in ipairs(gone) do
    drop_waiter(id)
  end
end

-- Wake-ups for the processes whose waiters a script granted: pairs (notify
-- list, "waiter-id token"), returned as the script's last reply element. The
-- calling process pushes each onto its list (the notify script, which
-- declares that key) or, for its own waiters, resolves them at once; a
-- script never touches a key it was not given. A wake-up that is lost
-- (the caller died, the push failed) is made up for by the waiter's
-- heartbeat, which reports the waiters it finds granted.
local notices = {}

-- Direct hand-off: while a slot is free, the head of the queue gets it and
-- its process is told on its notify list (a list, not pub/sub: a wake-up
-- waits there until read). A head whose process has stopped speaking
-- (crashed, killed) leaves the queue without a slot; a granted lease never
-- outlives its process's liveness (the next heartbeat renews it), so a
-- process that dies right after its last heartbeat holds a slot at most
-- one lease after that heartbeat.
local function grant_free()
  local free = capacity - redis.call('ZCARD', holders)
  while free > 0 do
    local head = redis.call('ZRANGE', queue, 0, 0)[1]
    if not head then
      break
    end
    local meta = redis.call('HGET', wmeta, head)
    drop_waiter(head)
    if meta then
      local cut = string.find(meta, ' ', 1, true)
      local owner, list = string.sub(meta, 1, cut - 1), string.sub(meta, cut + 1)
      local alive = tonumber(redis.call('ZSCORE', procs, owner))
      if alive and alive > now then
        local expiry = now + lease
        if alive < expiry then
          expiry = alive
        end
        redis.call('ZADD', holders, expiry, head)
        table.insert(notices, list)
        table.insert(notices, head .. ' ' .. grant_token(head) .. ' ' .. epoch())
        free = free - 1
      end
    end
  end
end

-- The holders' keys live a lease after the last lease ends (the expiry
-- ``last``, ms): the fence and the filled hash (created if missing) as
-- long as any permit is held, and config_ttl after: a holder paused for
-- longer is still found stale. ``fenced``: the fence was just set to live
-- config_ttl (grant_token).
local function expire_holders(last, fenced)
  redis.call('PEXPIREAT', holders, last + lease)
  redis.call('PEXPIREAT', tokens, last + lease)
  local keep = math.max(last + lease, now + config_ttl)
  if not fenced or keep > now + config_ttl then
    redis.call('PEXPIREAT', fence, keep)
  end
  epoch()
  redis.call('PEXPIREAT', filled, keep)
end

-- Every key of the resource expires once nothing in it is alive: holders a
-- lease after the last lease in it ends, the queue, its deadlines and its
-- wake-up addresses a lease after the last waiter's. So a crashed
-- process's entries never outlive it by more than a few leases, even if no
-- script touches the resource again.
local function expire_keys()
  local last = redis.call('ZRANGE', holders, -1, -1, 'WITHSCORES')
  if last[2] then
    expire_holders(tonumber(last[2]))
  end
  last = redis.call('ZRANGE', wexp, -1, -1, 'WITHSCORES')
  if last[2] then
    local at = tonumber(last[2]) + lease
    redis.call('PEXPIREAT', wexp, at)
    redis.call('PEXPIREAT', queue, at)
    redis.call('PEXPIREAT', wmeta, at)
  end
end

-- Each script's reply: its own elements, then the wake-ups to send.
local function reply(values)
  expire_keys()
  table.insert(values, notices)
  return values
end
