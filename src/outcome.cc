#include "concurrency_limiter/outcome.h"

#include "concurrency_limiter/priority.h"
#include "concurrency_limiter/statistics.h"

namespace concurrency_limiter {

std::string_view to_string(Outcome o) noexcept {
  switch (o) {
    case Outcome::kGranted: return "granted";
    case Outcome::kTimeout: return "timeout";
    case Outcome::kQueueFull: return "queue_full";
    case Outcome::kShed: return "shed";
    case Outcome::kDisconnected: return "disconnected";
    case Outcome::kCancelled: return "cancelled";
    case Outcome::kKeyLimit: return "key_limit";
    case Outcome::kUnavailable: return "unavailable";
    case Outcome::kDeadline: return "deadline";
    case Outcome::kPredictedTimeout: return "predicted_timeout";
    case Outcome::kLowerPriority: return "lower_priority";
    case Outcome::kPending: return "pending";
  }
  return "unknown";
}

std::string_view to_string(Priority p) noexcept {
  switch (p) {
    case Priority::kSheddable: return "sheddable";
    case Priority::kSheddablePlus: return "sheddable_plus";
    case Priority::kCritical: return "critical";
    case Priority::kCriticalPlus: return "critical_plus";
  }
  return "unknown";
}

std::string_view to_string(QueueDiscipline d) noexcept {
  switch (d) {
    case QueueDiscipline::kFifo: return "fifo";
    case QueueDiscipline::kLifo: return "lifo";
    case QueueDiscipline::kAdaptive: return "adaptive";
  }
  return "unknown";
}

std::size_t Histogram::bucket_of(double seconds) noexcept {
  std::size_t i = 0;
  while (i < kBounds.size() && seconds > kBounds[i]) ++i;
  return i;
}

void Histogram::observe(double seconds) noexcept {
  ++counts[bucket_of(seconds)];
  ++count;
  sum += seconds;
}

}  // namespace concurrency_limiter
