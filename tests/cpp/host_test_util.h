// Settings shared by the host-scope tests and their helper process
// (host_helper.cc), which must open resources with the same configuration.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>

#include "concurrency_limiter/limit.h"
#include "concurrency_limiter/priority.h"

namespace concurrency_limiter {

// The tests' AIMD limit: starts at 8, halves on a window with a drop, and a
// window is every 2 samples (no minimum time), so that a test decides
// exactly when a window closes: a window needs samples from two processes
// when each gives one.
inline std::shared_ptr<LimitAlgorithm> testing_host_aimd() {
  return std::make_shared<AimdLimit>(AimdOptions{.min_limit = 1,
                                                 .initial_limit = 8,
                                                 .backoff = 0.5,
                                                 .window = Clock::duration::zero(),
                                                 .min_window_samples = 2});
}

// The churn tests' counters, in a file that the test and its helper
// processes map: the requests holding a slot now ([0]) and their peak
// ([1]); then, for each class c (its index), the holders of the classes
// <= c now ([2 + c]) and their peak ([2 + kPriorityCount + c]).
inline constexpr std::size_t kSharedCountersBytes = 8 * (2 + 2 * kPriorityCount);

inline void raise_peak(std::atomic<std::int64_t>& peak, std::int64_t now) {
  std::int64_t seen = peak.load();
  while (now > seen && !peak.compare_exchange_weak(seen, now)) {
  }
}

// A hold (`delta` +1) or its end (-1) of a request of class `priority`
// (none: the totals only). Counted after the grant and before the release,
// so the counts never exceed what the resource let hold.
inline void count_hold(std::atomic<std::int64_t>* counter, std::optional<Priority> priority,
                       std::int64_t delta) {
  if (delta > 0) raise_peak(counter[1], counter[0].fetch_add(1) + 1);
  if (priority) {
    for (std::size_t c = priority_index(*priority); c < kPriorityCount; ++c) {
      const std::int64_t now = counter[2 + c].fetch_add(delta) + delta;
      if (delta > 0) raise_peak(counter[2 + kPriorityCount + c], now);
    }
  }
  if (delta < 0) counter[0].fetch_sub(1);
}

}  // namespace concurrency_limiter
