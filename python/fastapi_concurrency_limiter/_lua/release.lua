-- release: ARGV[4] permit id. Frees its slot and hands free slots to the
-- head of the queue. Returns {1 if it was held, 2 if its lease had run out
-- and a slot was granted since (its token is stale), else 0; in use;
-- wake-ups}.
local id = ARGV[4]
local held = drop_holder(id)
if held == 0 and regranted(id) then
  held = 2  -- its lease had run out and its slot was granted again since
end
purge()
grant_free()
return reply({held, redis.call('ZCARD', holders)})
