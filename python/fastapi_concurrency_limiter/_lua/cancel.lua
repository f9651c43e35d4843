-- cancel: ARGV[4] waiter id, whose wait ended (deadline, disconnect). Leaves
-- the queue; if the slot was granted at that instant (the notification is
-- still on its way), passes it on. Returns {0 nothing to do, 1 left the
-- queue, 2 passed on a granted slot; in use; wake-ups}.
local id = ARGV[4]
local state = 0
if redis.call('ZREM', queue, id) == 1 then
  state = 1
end
redis.call('ZREM', wexp, id)
redis.call('HDEL', wmeta, id)
if drop_holder(id) == 1 then
  state = 2
end
purge()
grant_free()
return reply({state, redis.call('ZCARD', holders)})
