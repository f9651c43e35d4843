// Priority classes: which requests a resource serves first and sheds last.
//
// Every request belongs to one of four ordered classes, named after Google
// SRE's criticality levels:
//
//   kSheddable < kSheddablePlus < kCritical < kCriticalPlus
//
// kCritical is the default: a request that names no class is critical, so
// an application that never uses priorities behaves exactly as without them.
// What a class gets, on every resource of process scope (resource.h,
// "Priority classes", says it in full):
//   - Grant order: a freed slot goes to the highest class with waiters;
//     within a class the resource's queue discipline (FIFO, LIFO, adaptive)
//     picks the waiter.
//   - Full queue (ResourceOptions::max_waiting): a newcomer of a class above
//     the lowest class with waiters pushes out the newest waiter of that
//     lowest class, which is rejected with Outcome::kLowerPriority. So a
//     class is shed only once every lower one is.
//   - Reserved shares (ResourceOptions::reserve): slots that only a class,
//     or a higher one, may take; a class may use every slot not reserved
//     for the classes above it. Capacity 20 with 4 reserved for
//     kCriticalPlus: the other classes hold at most 16 together.
//   - Early rejection (ResourceOptions::early_reject) counts only the
//     waiters served before the newcomer: the higher classes' and, in FIFO
//     order, its own class's.
//   - Statistics per class (ResourceStatistics::classes).
// A request carries its class through Acquisition (acquisition.h) or the
// Limiter's calls that take one:
//
//   Acquisition prefetch(set, std::nullopt, Priority::kSheddable);
//   Permit p = limiter.acquire(set, std::nullopt, Priority::kCriticalPlus);
//
// Cost: a resource without reserves takes and gives back a free slot
// without a lock for every class; a class other than kCritical adds two
// relaxed atomic adds to a grant (its holds and its grants) and one to a
// release, and a try that finds no free slot takes its two adds back (two
// more), the default class nothing. With
// waiters, a grant, release, timeout or cancel stays O(1). Reserves put every
// grant and release under the resource's mutex.
// Host scope (host_resource.h) keeps the grant order, the shedding, the
// reserves and the per-class statistics across processes (every process
// must pass the same reserves). Per-key shares support only kCritical for now
// (std::invalid_argument otherwise).
// A class's counts are taken before its slot: a snapshot of the statistics
// may, for a moment, show the classes' grants summing above the resource's
// (a try that then finds no free slot takes its class's back).
//
// Thread safety: plain values and pure functions, usable from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace concurrency_limiter {

enum class Priority : std::uint8_t {
  kSheddable = 0,      // shed first: prefetches, batch work, retries
  kSheddablePlus = 1,  // shed before the critical classes
  kCritical = 2,       // the default: what a user is waiting for
  kCriticalPlus = 3,   // shed last: the requests that must get through
};

// Number of classes; a Priority's value indexes per-class arrays
// (ResourceOptions::reserve, ResourceStatistics::classes).
inline constexpr std::size_t kPriorityCount = 4;

// Dense index 0..kPriorityCount-1 of a class, for per-class arrays.
constexpr std::size_t priority_index(Priority p) noexcept {
  return static_cast<std::size_t>(p);
}

// The slots that `reserve` slots of a resource's `capacity` keep while its
// limit is `limit` (an adaptive limit below the capacity, see resource.h,
// "Priority classes"): as many while the limit is the capacity,
// proportionally fewer below it, rounded up (a reserve never vanishes while
// the limit leaves room for it), but fewer than `limit` (the classes below
// keep at least one slot) unless `reserve` is the whole capacity. A
// negative `reserve` keeps nothing.
constexpr std::int64_t scaled_reserve(std::int64_t reserve, std::int64_t limit,
                                      std::int64_t capacity) noexcept {
  if (reserve <= 0) return 0;
  if (limit >= capacity) return reserve;
  if (reserve >= capacity) return limit;
  const std::int64_t scaled = (reserve * limit + capacity - 1) / capacity;
  return scaled < limit - 1 ? scaled : limit - 1;
}

// Stable lower-case names used in errors, statistics and metrics labels:
// "sheddable", "sheddable_plus", "critical", "critical_plus".
std::string_view to_string(Priority p) noexcept;

}  // namespace concurrency_limiter
