-- release: ARGV[4] permit id. Frees its slot and hands free slots to the
-- head of the queue. Returns {1 if it was held else 0, in use, wake-ups}.
local id = ARGV[4]
local held = redis.call('ZREM', holders, id)
purge()
grant_free()
return reply({held, redis.call('ZCARD', holders)})
