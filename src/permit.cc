#include "concurrency_limiter/permit.h"

#include <utility>

#include "concurrency_limiter/internal/mutex.h"
#include "concurrency_limiter/resource_set.h"

namespace concurrency_limiter {

Permit make_permit(std::unique_ptr<Acquisition> acquisition) {
  Permit p;
  if (acquisition->state() == Acquisition::State::kGranted) {
    p.outcome_ = Outcome::kGranted;
    p.acquisition_ = std::move(acquisition);
    return p;
  }
  const Outcome o = acquisition->outcome();
  // A try that found no free slot is not started: it is a zero timeout.
  p.outcome_ = o == Outcome::kPending ? Outcome::kTimeout : o;
  if (const Resource* r = acquisition->refused_by()) p.refused_by_ = r->name();
  return p;
}

Permit take_at_once(Resource& resource) {
  Permit p;
  bool measure = false;
  if (!resource.try_grant(measure)) {
    p.outcome_ = Outcome::kTimeout;
    p.refused_by_ = resource.name();
    return p;
  }
  p.resource_ = &resource;
  p.outcome_ = Outcome::kGranted;
  if (measure) {
    p.measured_ = true;
    p.granted_at_ = Clock::now();
  }
  return p;
}

Permit take_at_once(const std::shared_ptr<const ResourceSet>& set) {
  const auto& resources = set->resources();
  if (resources.size() == 1) return take_at_once(*resources.front());
  Permit p;
  bool measure = false;
  for (std::size_t i = 0; i < resources.size(); ++i) {
    bool m = false;
    if (!resources[i]->try_grant(m)) {
      // Undo the slots taken on the way, leaving no trace in the statistics.
      detail::NoticeList notices;
      for (std::size_t j = i; j-- > 0;) resources[j]->revert_grant(notices);
      p.outcome_ = Outcome::kTimeout;
      p.refused_by_ = resources[i]->name();
      return p;
    }
    measure = measure || m;
  }
  p.set_ = set;
  p.outcome_ = Outcome::kGranted;
  if (measure) {
    // One start for every resource: the hold begins with the last slot.
    p.measured_ = true;
    p.granted_at_ = Clock::now();
  }
  return p;
}

void Permit::release_slow() noexcept {
  if (acquisition_) {
    acquisition_->release();
    acquisition_.reset();
    return;
  }
  const Clock::time_point now = measured_ ? Clock::now() : Clock::time_point{};
  detail::NoticeList notices;  // fired when this function returns
  if (resource_) {
    resource_->release(measured_, granted_at_, now, notices);
    resource_ = nullptr;
  } else if (set_) {
    const auto& resources = set_->resources();
    for (std::size_t i = resources.size(); i-- > 0;) {
      resources[i]->release(measured_, granted_at_, now, notices);
    }
    set_.reset();
  }
}

Permit acquire_blocking(std::shared_ptr<const ResourceSet> set,
                        Clock::time_point deadline, std::stop_token stop) {
  // Declared before the acquisition so that it outlives the acquisition's
  // destructor, which waits for a completion still in flight.
  struct Signal {
    detail::Mutex mu;
    detail::CondVar cv;
    bool done CL_GUARDED_BY(mu) = false;
    Outcome outcome CL_GUARDED_BY(mu) = Outcome::kPending;
  } signal;
  auto acq = std::make_unique<Acquisition>(std::move(set));
  Outcome o = acq->start([&signal](Outcome outcome) {
    detail::MutexLock lock(signal.mu);
    signal.done = true;
    signal.outcome = outcome;
    // Notify under the lock: the waiter may destroy `signal` as soon as it
    // can take the lock again.
    signal.cv.notify_one();
  });
  if (o == Outcome::kPending) {
    // Runs at once in this thread if a stop was already requested.
    std::stop_callback on_stop(stop, [&acq] { acq->cancel(Outcome::kCancelled); });
    bool expire = false;
    {
      detail::MutexLock lock(signal.mu);
      while (!signal.done) {
        if (!signal.cv.wait_until(signal.mu, deadline) && !signal.done) {
          expire = true;
          break;
        }
      }
    }
    if (expire) {
      acq->expire();  // calls back (here) unless a grant or stop came first
      detail::MutexLock lock(signal.mu);
      while (!signal.done) signal.cv.wait(signal.mu);
    }
  }
  return make_permit(std::move(acq));
}

}  // namespace concurrency_limiter
