// Statistics of a resource: a consistent snapshot of its counters and its
// wait-time and hold-time histograms.
//
// Exact: every counter (acquired_total, rejected_total, peak_in_use), the
// wait-time histogram, and the number of holds in the hold-time histogram
// (hold_seconds.count, and the sum of its buckets, is the number of slots
// given back). Kept without a lock or a clock read on the path that takes a
// free slot: a request granted at once waited 0 s, and the counts are
// derived from the resource's slot word.
//
// Sampled: the durations in hold_seconds. Timing every hold would cost two
// clock reads per request, more than the rest of taking and returning a free
// slot together. So every hold of a request that waited is timed (it read
// the clock anyway), and of those granted at once one in 64 (and every one
// until the first is recorded). A hold that is not timed is counted in the
// bucket, and with the duration, of the latest timed hold of the resource;
// so hold_seconds.sum and the bucket counts are estimates, monotonic like
// any Prometheus histogram. A request that times out or is rejected after
// taking its first resources never held them all: those holds are not timed.
//
// Histogram buckets are fixed (Prometheus style, cumulative on export) so
// that snapshots from any process can be merged.
//
// Thread safety: Resource::statistics() may be called from any thread; it
// returns a copy. The types below are plain values without synchronisation:
// one object is used by one thread at a time.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "concurrency_limiter/outcome.h"
#include "concurrency_limiter/priority.h"

namespace concurrency_limiter {

// A histogram of durations in seconds with fixed upper bounds.
struct Histogram {
  // Upper bounds (inclusive) of the finite buckets, in seconds. A value above
  // the last bound falls in the implicit +Inf bucket.
  static constexpr std::array<double, 14> kBounds = {
      0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
      0.1,    0.25,  0.5,    1.0,   2.5,  5.0,   10.0};

  // counts[i] is the number of observations in bucket i alone (not
  // cumulative); counts[kBounds.size()] is the +Inf bucket.
  std::array<std::uint64_t, kBounds.size() + 1> counts{};
  std::uint64_t count = 0;  // number of observations
  double sum = 0.0;         // sum of observed values, seconds

  void observe(double seconds) noexcept;
  // Index in `counts` of the bucket `seconds` falls in.
  static std::size_t bucket_of(double seconds) noexcept;
};

// Which waiter a freed slot goes to.
enum class QueueDiscipline : std::uint8_t {
  kFifo,      // oldest waiter first (the default)
  kLifo,      // newest waiter first
  kAdaptive,  // FIFO until a standing queue forms, then LIFO and shedding
};

std::string_view to_string(QueueDiscipline d) noexcept;

// The share of one priority class (priority.h) in a resource's statistics.
// Summed over the classes, each field gives the resource's own. The default
// class's figures (Priority::kCritical) are the resource's less the other
// classes', which their grants and releases move without a lock (the
// lock-free path stays as cheap for every class): acquired_total never
// counts another class's grant (bar one undone at that moment) and never
// goes down between snapshots of one resource; in_use (a gauge)
// may, in a snapshot taken across a whole grant and release of another
// class, show that class's hold as the default class's.
struct ClassStatistics {
  std::int64_t in_use = 0;           // slots the class holds right now
  std::int64_t waiting = 0;          // waiters of the class queued right now
  std::uint64_t acquired_total = 0;  // slots granted to the class
  // Requests of the class turned away, by reason; index with
  // rejection_index(Outcome).
  std::array<std::uint64_t, kRejectionReasonCount> rejected_total{};

  std::uint64_t rejected(Outcome reason) const noexcept {
    return rejected_total[rejection_index(reason)];
  }
};

struct ResourceStatistics {
  std::string name;
  std::int64_t capacity = 0;
  std::int64_t limit = 0;            // slots in force right now (<= capacity)
  std::int64_t in_use = 0;           // slots held right now
  std::int64_t waiting = 0;          // waiters queued right now
  // Keys (ResourceOptions::per_key) holding or waiting for a slot right now;
  // 0 for a resource without a per-key share.
  std::int64_t active_keys = 0;
  std::int64_t peak_in_use = 0;      // highest in_use ever seen
  std::optional<std::int64_t> max_waiting;  // nullopt: unbounded queue
  QueueDiscipline queue = QueueDiscipline::kFifo;
  std::uint64_t acquired_total = 0;  // slots granted, immediately or after waiting
  // Requests turned away, by reason; index with rejection_index(Outcome).
  std::array<std::uint64_t, kRejectionReasonCount> rejected_total{};
  Histogram wait_seconds;  // time from request to grant, of granted requests
  // Time from the grant of the request's last slot to release (durations
  // sampled, count exact: see above).
  Histogram hold_seconds;
  // The resource's moving estimate of service time (grant to release), in
  // seconds: see service_estimate.h. nullopt until a timed hold was released.
  // Host scope: the machine's, from the holds of every process.
  std::optional<double> service_seconds;
  // The counters above split by priority class, indexed by
  // priority_index(Priority). On host scope, in_use and waiting per class
  // are machine-wide and the counters this process's, as the totals are
  // (while the shared state is out of reach, the last totals known are
  // shown under Priority::kCritical). in_use per class is a
  // snapshot as in_use is (on the lock-free path of a resource without
  // reserves, a slot is counted in its class a moment after the resource
  // counts it, so a class may briefly show one slot that is its neighbour's).
  std::array<ClassStatistics, kPriorityCount> classes{};

  std::uint64_t rejected(Outcome reason) const noexcept {
    return rejected_total[rejection_index(reason)];
  }
};

}  // namespace concurrency_limiter
