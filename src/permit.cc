#include "concurrency_limiter/permit.h"

#include <atomic>
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
  if (o == Outcome::kPredictedTimeout) {
    p.predicted_wait_ = acquisition->predicted_wait().value_or(0.0);
  }
  // The name only, shared with the resource: the error may be reported
  // after the acquisition, and the resource itself, are gone.
  if (const Resource* refused = acquisition->refused_by()) {
    p.refused_by_ = Permit::name_of(*refused);
  }
  return p;
}

void Permit::start_measuring() noexcept {
  measured_ = true;
  granted_at_ = Clock::now();
}

bool Permit::take_all(const std::shared_ptr<const ResourceSet>& set) noexcept {
  const auto& resources = set->resources();
  bool measure = false;
  for (std::size_t i = 0; i < resources.size(); ++i) {
    bool m = false;
    if (!resources[i]->try_grant(m)) {
      // Undo the slots taken on the way, leaving no trace in the statistics.
      detail::NoticeList notices;
      for (std::size_t j = i; j-- > 0;) resources[j]->revert_grant(notices);
      outcome_ = resources[i]->closed() ? Outcome::kUnavailable : Outcome::kTimeout;
      refused_by_ = resources[i]->shared_name_;
      return false;
    }
    measure = measure || m;
  }
  set_ = set;
  outcome_ = Outcome::kGranted;
  // One start for every resource: the hold begins with the last slot.
  if (measure) start_measuring();
  return true;
}

void Permit::release_slow(Completion completion) noexcept {
  if (acquisition_) {
    acquisition_->release(completion);
    acquisition_.reset();
    return;
  }
  const Clock::time_point now = measured_ ? Clock::now() : Clock::time_point{};
  detail::NoticeList notices;  // fired when this function returns
  if (resource_) {
    resource_->release(measured_, granted_at_, now, completion, notices);
    resource_.reset();
  } else if (set_) {
    const auto& resources = set_->resources();
    for (std::size_t i = resources.size(); i-- > 0;) {
      Resource& r = *resources[i];
      if (measured_ || !r.try_give_back()) {
        r.release(measured_, granted_at_, now, completion, notices);
      }
    }
    set_.reset();
  }
}

namespace {

// How a blocked thread learns that its acquisition was decided, without a
// lock or a futex wake when the decision comes before the waiter sleeps (as
// in a handoff between two running threads).
//
struct Signal {
  static constexpr int kAwake = 0, kDone = 1, kAsleep = 2;
  std::atomic<int> state{kAwake};
  detail::Mutex mu;
  detail::CondVar cv;

  void notify() {
    int expected = kAwake;
    // acq_rel: the waiter's acquire load of kDone sees the acquisition
    // decided.
    if (state.compare_exchange_strong(expected, kDone, std::memory_order_acq_rel)) return;
    {
      detail::MutexLock lock(mu);
      state.store(kDone, std::memory_order_release);
    }
    // After the unlock: a waiter woken under the mutex would only block on
    // it again. The signal outlives this call (the callback that calls it
    // owns a reference).
    cv.notify_one();
  }
  bool done() const { return state.load(std::memory_order_acquire) == kDone; }

  // Waits for notify() or the deadline; false if the deadline came first.
  bool wait_until(Clock::time_point deadline) {
    // No spinning: measured here, a spin before sleeping only took CPU from
    // the thread about to release.
    if (done()) return true;
    detail::MutexLock lock(mu);
    int expected = kAwake;
    if (!state.compare_exchange_strong(expected, kAsleep, std::memory_order_acq_rel)) {
      return true;  // kDone meanwhile
    }
    while (!done()) {
      if (!cv.wait_until(mu, deadline)) return done();
    }
    return true;
  }
  // Waits for notify() after the waiter gave up on the deadline.
  void wait() {
    detail::MutexLock lock(mu);
    while (!done()) cv.wait(mu);
  }
};

}  // namespace

Permit acquire_blocking(std::shared_ptr<const ResourceSet> set,
                        Clock::time_point deadline, std::stop_token stop,
                        std::optional<std::string> key, Priority priority) {
  auto acq = std::make_unique<Acquisition>(std::move(set), std::move(key), priority);
  // A deadline not in the future tries once and never queues (a queued
  // request could take a slot released later, or push a waiter out).
  if (deadline <= Clock::now()) {
    acq->try_once();
    return make_permit(std::move(acq));
  }
  // A class other than the default takes a free slot without a lock first,
  // as the default class's callers do before they come here.
  if (priority != Priority::kCritical && acq->try_acquire()) return make_permit(std::move(acq));
  // Shared with the callback: the thread that decides the acquisition may
  // still be notifying when this thread, woken, has returned.
  const auto signal = std::make_shared<Signal>();
  const Outcome o = acq->start([signal](Outcome) { signal->notify(); }, deadline);
  if (o == Outcome::kPending) {
    // Runs at once in this thread if a stop was already requested.
    std::stop_callback on_stop(stop, [&acq] { acq->cancel(Outcome::kCancelled); });
    if (!signal->wait_until(deadline)) {
      acq->expire();  // calls back (here) unless a grant or stop came first
      signal->wait();
    }
  }
  return make_permit(std::move(acq));
}

}  // namespace concurrency_limiter
