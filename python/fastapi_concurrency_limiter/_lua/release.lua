-- release: ARGV[4] permit id, ARGV[5] its fencing token, ARGV[6] when Redis
-- last held it for sure (ms), ARGV[7] the epoch it was held in (see stale).
-- Frees its slot and
-- hands free slots to the head of the queue. A stale release (see stale)
-- changes nothing. Returns {1 if it was held, 2 if it is stale (its lease
-- was lost), else 0; in use; wake-ups}.
local id = ARGV[4]
local held = 0
if stale(id, ARGV[5], ARGV[6], ARGV[7]) then
  held = 2
else
  held = drop_holder(id)
end
purge()
grant_free()
return reply({held, redis.call('ZCARD', holders)})
