// Deadlines from timeouts without overflow.
#pragma once

#include "concurrency_limiter/resource.h"

namespace concurrency_limiter::detail {

// `from + timeout`, saturated to the clock's range: a timeout too large to
// add (Clock::duration::max(), or a limiter's "forever") gives the latest
// representable time, i.e. no deadline, instead of wrapping into the past.
constexpr Clock::time_point saturating_add(Clock::time_point from,
                                           Clock::duration timeout) noexcept {
  const Clock::duration since_epoch = from.time_since_epoch();
  if (timeout > Clock::duration::zero() &&
      since_epoch > Clock::duration::max() - timeout) {
    return Clock::time_point::max();
  }
  if (timeout < Clock::duration::zero() &&
      since_epoch < Clock::duration::min() - timeout) {
    return Clock::time_point::min();
  }
  return from + timeout;
}

inline Clock::time_point deadline_after(Clock::duration timeout) noexcept {
  return saturating_add(Clock::now(), timeout);
}

}  // namespace concurrency_limiter::detail
