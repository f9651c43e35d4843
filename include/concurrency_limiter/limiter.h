// Limiter: the registry of resources, their canonical acquisition order and
// a default timeout.
//
//   auto db = Resource::create("db", 5);
//   auto file = Resource::create("file", 10);
//   Limiter limiter({db, file}, std::chrono::seconds(5));
//   auto both = limiter.select({db, file});   // validated once, at start-up
//   if (Permit p = limiter.acquire(both)) { ... }
//
// The order in which resources are registered is the order in which every
// request acquires them; select() refuses any other order, so no two requests
// can deadlock on each other. That guarantee covers the requests of one
// Limiter: register a resource shared by several Limiters in the same
// relative order in each. The timeout covers acquiring *all* resources of a
// request together.
//
// Lifetime: the Limiter owns its resources through shared_ptr, and so does
// every ResourceSet, Permit and waiting request: destroying a Limiter (say,
// replacing it with a new configuration) while requests wait or hold slots
// is safe; they end as they would have, and the resources go when the last
// of them does. To fail the waiters at once instead, close() it first
// (host-scoped resources excepted, see close()).
//
// Thread safety: a Limiter is immutable after construction except for
// close(); every member function may be called from any thread, concurrently
// with any other (the blocking calls block only the calling thread).
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <stop_token>
#include <string>
#include <vector>

#include "concurrency_limiter/permit.h"
#include "concurrency_limiter/resource.h"
#include "concurrency_limiter/resource_set.h"
#include "concurrency_limiter/statistics.h"

namespace concurrency_limiter {

class Limiter {
 public:
  // Throws std::invalid_argument when `timeout` is negative, a resource is
  // null, or a resource (or a resource name) is registered twice.
  // Clock::duration::max() as `timeout` waits without a deadline.
  Limiter(std::vector<std::shared_ptr<Resource>> resources,
          Clock::duration timeout);

  Clock::duration timeout() const noexcept { return timeout_; }
  const std::vector<std::shared_ptr<Resource>>& resources() const noexcept {
    return resources_;
  }

  // Validates the resources one request needs and returns them as a set.
  // Throws std::invalid_argument, naming the resources at fault, if the list
  // is empty, holds a resource that is not registered here, lists one twice,
  // or breaks the registration order. Call it at start-up, not per request.
  std::shared_ptr<const ResourceSet> select(
      const std::vector<std::shared_ptr<Resource>>& resources) const;

  // Blocking acquisition of every resource in `set`, in order, within the
  // limiter's timeout (acquire), a given timeout (acquire_for) or until a
  // deadline (acquire_until). Blocks the calling thread until granted, the
  // deadline passes (kTimeout: whatever was already held is released), a
  // queue rejects it (kQueueFull, kShed; kLowerPriority: pushed out for a
  // request of a higher class), a resource is closed (kUnavailable) or
  // `stop` is requested (kCancelled). A timeout <= 0 (a deadline not in
  // the future) tries once: all slots now, or refused without joining any
  // queue (kTimeout; kQueueFull where a full queue would have turned the
  // request away on arrival), so it never pushes a waiter out of a queue.
  // try_acquire() never blocks: all slots now, or none (kTimeout).
  // A request that finds every slot free with nobody waiting takes them
  // without a lock, an allocation or a clock read. A timeout too large to
  // add to now (Clock::duration::max()) means "no deadline".
  Permit acquire(const std::shared_ptr<const ResourceSet>& set,
                 std::stop_token stop = {}) const {
    Permit p;  // filled in place: the common case inline, without moves
    if (!p.take(set)) p = acquire_waiting(set, timeout_, std::move(stop));
    return p;
  }
  Permit acquire_for(const std::shared_ptr<const ResourceSet>& set,
                     Clock::duration timeout, std::stop_token stop = {}) const;
  Permit acquire_until(const std::shared_ptr<const ResourceSet>& set,
                       Clock::time_point deadline,
                       std::stop_token stop = {}) const;
  Permit try_acquire(const std::shared_ptr<const ResourceSet>& set) const;

  // The same for a request of client `key` (see "Key" in acquisition.h):
  // on resources with a per-key share (ResourceOptions::per_key) the key
  // holds at most that many slots; a request held back by its share blocks
  // without holding up other keys, and is rejected with kKeyLimit if its
  // deadline passes that way. std::nullopt is exempt from the share, as the
  // calls above are. Unlike them these take the resources' mutexes even when
  // slots are free.
  Permit acquire(const std::shared_ptr<const ResourceSet>& set,
                 std::optional<std::string> key, std::stop_token stop = {}) const {
    return acquire_for(set, std::move(key), timeout_, std::move(stop));
  }
  Permit acquire_for(const std::shared_ptr<const ResourceSet>& set,
                     std::optional<std::string> key, Clock::duration timeout,
                     std::stop_token stop = {}) const;

  // The same for a request of class `priority` (see "Priority" in
  // acquisition.h and "Priority classes" in resource.h), with or without a
  // key: served before lower classes, pushed out of a full queue only for
  // a higher class (kLowerPriority), kept from the slots reserved for the
  // classes above it. std::invalid_argument, before anything is taken, for
  // a class other than kCritical on a set with a per-key share. Like the
  // keyed calls these take the resources' mutexes when they must wait; a
  // free slot of a resource without reserves is taken without a lock.
  Permit acquire(const std::shared_ptr<const ResourceSet>& set,
                 std::optional<std::string> key, Priority priority,
                 std::stop_token stop = {}) const {
    return acquire_for(set, std::move(key), priority, timeout_, std::move(stop));
  }
  Permit acquire_for(const std::shared_ptr<const ResourceSet>& set,
                     std::optional<std::string> key, Priority priority,
                     Clock::duration timeout, std::stop_token stop = {}) const;

  // Closes every registered resource (Resource::close()): each request
  // waiting for one fails with kUnavailable at once, and later requests are
  // refused with kUnavailable; held slots stay held until released. A
  // resource shared with another Limiter is closed for that one too.
  // Host-scoped resources (host_resource.h) only refuse later requests: a
  // request already waiting for one keeps waiting until it is granted,
  // times out or is cancelled.
  void close();

  // One snapshot per registered resource, in registration order.
  std::vector<ResourceStatistics> statistics() const;

 private:
  // acquire_for() once the slots could not be taken at once.
  Permit acquire_waiting(const std::shared_ptr<const ResourceSet>& set,
                         Clock::duration timeout, std::stop_token stop) const;

  std::vector<std::shared_ptr<Resource>> resources_;
  Clock::duration timeout_;
};

}  // namespace concurrency_limiter
