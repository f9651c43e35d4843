#include "concurrency_limiter/permit.h"

#include <condition_variable>
#include <mutex>
#include <utility>

namespace concurrency_limiter {

Permit make_permit(std::unique_ptr<Acquisition> acquisition) {
  Permit p;
  if (acquisition->state() == Acquisition::State::kGranted) {
    p.outcome_ = Outcome::kGranted;
    p.granted_ = std::move(acquisition);
    return p;
  }
  const Outcome o = acquisition->outcome();
  // A try that found no free slot is not started: it is a zero timeout.
  p.outcome_ = o == Outcome::kPending ? Outcome::kTimeout : o;
  if (const Resource* r = acquisition->refused_by()) p.refused_by_ = r->name();
  return p;
}

Permit acquire_blocking(std::shared_ptr<const ResourceSet> set,
                        Clock::time_point deadline, std::stop_token stop) {
  // Declared before the acquisition so that it outlives the acquisition's
  // destructor, which waits for a completion still in flight.
  struct Signal {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;       // guarded by mu
    Outcome outcome{};       // guarded by mu
  } signal;
  auto acq = std::make_unique<Acquisition>(std::move(set));
  Outcome o = acq->start([&signal](Outcome outcome) {
    std::lock_guard lock(signal.mu);
    signal.done = true;
    signal.outcome = outcome;
    // Notify under the lock: the waiter may destroy `signal` as soon as it
    // can take the lock again.
    signal.cv.notify_one();
  });
  if (o == Outcome::kPending) {
    // Runs at once in this thread if a stop was already requested.
    std::stop_callback on_stop(stop, [&acq] { acq->cancel(Outcome::kCancelled); });
    std::unique_lock lock(signal.mu);
    if (!signal.cv.wait_until(lock, deadline, [&] { return signal.done; })) {
      lock.unlock();
      acq->expire();  // calls back (here) unless a grant or stop came first
      lock.lock();
      signal.cv.wait(lock, [&] { return signal.done; });
    }
  }
  return make_permit(std::move(acq));
}

}  // namespace concurrency_limiter
