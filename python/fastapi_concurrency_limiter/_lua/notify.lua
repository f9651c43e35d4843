-- notify: KEYS[1] a client's notify list, ARGV[1] a granted waiter id (or
-- "": a wake-up to listen to a new list), ARGV[2] the list's time to live
-- (ms): a list nobody reads any more (its process died) goes away.
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
