// Settings shared by the host-scope tests and their helper process
// (host_helper.cc), which must open resources with the same configuration.
#pragma once

#include <memory>

#include "concurrency_limiter/limit.h"

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

}  // namespace concurrency_limiter
