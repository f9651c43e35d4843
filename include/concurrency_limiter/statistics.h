// Statistics of a resource: a consistent snapshot of its counters and its
// wait-time and hold-time histograms.
//
// The counters are kept by the engine under the resource's lock on the paths
// that already take it, so keeping them costs a few integer additions and two
// clock reads per acquisition. Histogram buckets are fixed (Prometheus style,
// cumulative on export) so that snapshots from any process can be merged.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "concurrency_limiter/outcome.h"

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
};

// Which waiter a freed slot goes to.
enum class QueueDiscipline : std::uint8_t {
  kFifo,      // oldest waiter first (the default)
  kLifo,      // newest waiter first
  kAdaptive,  // FIFO until a standing queue forms, then LIFO and shedding
};

std::string_view to_string(QueueDiscipline d) noexcept;

struct ResourceStatistics {
  std::string name;
  std::int64_t capacity = 0;
  std::int64_t limit = 0;            // slots in force right now (<= capacity)
  std::int64_t in_use = 0;           // slots held right now
  std::int64_t waiting = 0;          // waiters queued right now
  std::int64_t peak_in_use = 0;      // highest in_use ever seen
  std::optional<std::int64_t> max_waiting;  // nullopt: unbounded queue
  QueueDiscipline queue = QueueDiscipline::kFifo;
  std::uint64_t acquired_total = 0;  // slots granted, immediately or after waiting
  // Requests turned away, by reason; index with rejection_index(Outcome).
  std::array<std::uint64_t, kRejectionReasonCount> rejected_total{};
  Histogram wait_seconds;  // time from request to grant, of granted requests
  Histogram hold_seconds;  // time from grant to release

  std::uint64_t rejected(Outcome reason) const noexcept {
    return rejected_total[rejection_index(reason)];
  }
};

}  // namespace concurrency_limiter
