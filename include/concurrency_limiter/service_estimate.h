// ServiceTimeEstimate: the moving estimate of service time (grant to
// release) that every resource keeps (a host-scoped one in its shared
// segment, from the holds of every process: host_resource.h), and the
// prediction its early rejection (ResourceOptions::early_reject) makes from
// it.
//
// The estimate is an exponentially weighted moving average of the timed
// holds (see statistics.h: every hold that waited, one in 64 of those granted
// at once; every hold of a resource with early rejection), holds given back
// unused left out: each new hold moves it by kWeight of the difference, so
// it follows a change of the downstream's speed within a few dozen releases
// and one slow request moves it by a sixteenth of its excess only. Updated at
// release, under the resource's mutex that a timed release takes anyway: no
// allocation, no extra lock, nothing on the lock-free path.
//
// Prediction: a request that has to wait behind `ahead` waiters of a
// resource with `limit` slots in force is predicted to wait ahead / limit x
// the estimate; early rejection refuses it when that exceeds the time it has
// left (its timeout). This counts the waiters that will time out before
// their turn as well, so under a sustained overload the queue settles near
// the length the timeout allows, and most refusals that used to come at the
// timeout come at arrival instead. What it costs, measured in simulated time
// (tests/cpp/early_reject_test.cc: 10 slots, exponential, lognormal and
// bimodal service times, a spike at twice the capacity): 0.4 to 1.6 % of
// the early rejections cost a grant (the requests served fall by that many,
// against the same arrivals without early rejection), and about 87 % of the
// timeouts become immediate refusals. Asked the other way, "would this
// refused request have been granted in time had it waited?", the answer is
// yes for about half of them: in a sustained overload the slots serve as
// many requests either way, so a request refused early could have been
// served in the place of one that then timed out. That exchange is what
// early rejection does; the requests lost to it are the 0.4 to 1.6 %.
//
// Thread safety: a plain value; the resource guards it with its mutex.
#pragma once

#include <cstdint>
#include <optional>

namespace concurrency_limiter {

class ServiceTimeEstimate {
 public:
  // Weight of each new hold in the moving average.
  static constexpr double kWeight = 1.0 / 16;

  // Adds one hold of `seconds`. The first hold is the estimate.
  void add(double seconds) noexcept {
    if (seconds < 0.0) seconds = 0.0;
    value_ = known_ ? value_ + kWeight * (seconds - value_) : seconds;
    known_ = true;
  }

  // The estimate in seconds; nullopt until the first hold was added.
  std::optional<double> seconds() const noexcept {
    if (!known_) return std::nullopt;
    return value_;
  }

  // Whether a request with `ahead` waiters before it in the grant order, on
  // `limit` slots, and `patience` seconds left before its timeout, is
  // predicted to time out (see the prediction above). Never without an
  // estimate, with nobody ahead, or with limit < 1.
  bool predicts_timeout(std::int64_t ahead, std::int64_t limit,
                        double patience) const noexcept {
    if (!known_ || ahead <= 0 || limit < 1) return false;
    const double predicted =
        static_cast<double>(ahead) / static_cast<double>(limit) * value_;
    return predicted > patience;
  }

 private:
  double value_ = 0.0;
  bool known_ = false;
};

}  // namespace concurrency_limiter
