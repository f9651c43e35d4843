// Acquisition: one request for a slot of every resource in a ResourceSet,
// taken in order under one deadline, with a completion callback.
//
// This is the engine's single way of waiting. Front ends build on it: the
// Python package resolves an asyncio future from the callback, a C++ server
// posts an Asio completion handler from it, and the blocking calls
// (Limiter::acquire_for, Resource::acquire_for) wait on a condition variable
// that the callback signals.
//
//   Acquisition acq(set);
//   Outcome o = acq.start([&](Outcome o) { /* granted or rejected */ });
//   if (o == Outcome::kPending) {
//     // later, from a timer:  acq.expire();   from a cancel: acq.cancel();
//   }
//   ...
//   acq.release();  // or destroy it; gives every slot back
//
// Resources are taken one after the other in the set's order; a request holds
// the first ones while it waits for a later one. When it fails (timeout,
// rejection, cancel) every slot already held is released at once.
//
// A resource with a free slot and nobody waiting grants it without its lock
// (an atomic compare-and-swap, see resource.h); waiting, and every grant to
// a waiter, go through the resource's mutex. Races are decided by the
// resource's mutex, in C++, once: a slot granted at
// the instant the deadline passes or the caller cancels is either kept (the
// grant came first and it was the last resource needed: the acquisition
// succeeds) or handed on to the next waiter. A slot is never lost and the
// callback is never called twice.
//
// Key: an acquisition may carry a key (a client, an API key, a tenant). On a
// resource with a per-key share (ResourceOptions::per_key, see resource.h)
// the key holds at most that many slots, and a request whose key is at its
// share waits without holding up requests of other keys; if its deadline
// passes while it is held back that way (its share kept it from a slot the
// resource had for others), it is rejected with kKeyLimit, not kTimeout. std::nullopt (the
// default) is exempt from every per-key share but counts toward the total.
// Resources without a per-key share ignore the key.
//
//   Acquisition acq(set, "tenant-1");
//
// Priority: an acquisition belongs to one priority class (priority.h),
// Priority::kCritical unless it says otherwise, on every resource of its
// set (it cannot change: a request that needs another class is another
// Acquisition). A resource hands a freed slot to the highest class with waiters
// (within a class, in its queue discipline's order); a full queue pushes out
// the newest waiter of the lowest class to make room for a higher class
// (kLowerPriority); a class may not take slots reserved for the classes
// above it (ResourceOptions::reserve). See resource.h, "Priority classes".
// A class other than kCritical is refused (std::invalid_argument, at
// construction) when the set holds a resource with a per-key share: not
// built yet. Host-scoped resources keep the classes across processes
// (host_resource.h).
//
//   Acquisition acq(set, std::nullopt, Priority::kSheddable);
//
// Thread safety: all member functions may be called from any thread,
// concurrently with grants made by other threads' releases. The callback runs
// on whichever thread decided the outcome: a releasing thread, or the thread
// calling expire()/cancel() (never the thread calling start(): start()
// returns an immediate outcome instead of calling back). No lock is held
// while it runs, and the Acquisition may already be destroyed by then (the
// callback owns its captures). It must not throw.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "concurrency_limiter/deadline_queue.h"
#include "concurrency_limiter/internal/mutex.h"
#include "concurrency_limiter/internal/thread_annotations.h"
#include "concurrency_limiter/outcome.h"
#include "concurrency_limiter/priority.h"
#include "concurrency_limiter/resource.h"
#include "concurrency_limiter/resource_set.h"

namespace concurrency_limiter {

class Acquisition {
 public:
  using Callback = detail::NoticeList::Callback;

  enum class State : std::uint8_t {
    kIdle,      // not started
    kPending,   // queued for one of its resources
    kGranted,   // holds every slot
    kRejected,  // turned away; holds nothing
    kReleased,  // was granted, gave everything back
  };

  // `key`: see "Key" above; copied, and constant for the acquisition's life.
  // `priority`: see "Priority" above. Throws std::invalid_argument, naming
  // `priority`, for a value outside the enum or a class other than
  // kCritical on a set with a per-key share.
  explicit Acquisition(std::shared_ptr<const ResourceSet> set,
                       std::optional<std::string> key = std::nullopt,
                       Priority priority = Priority::kCritical);
  Acquisition(const Acquisition&) = delete;
  Acquisition& operator=(const Acquisition&) = delete;
  // Cancels a pending wait or releases held slots. If a releasing thread is
  // at that instant deciding this acquisition's grant, waits for it to finish
  // with this object: a few instructions under locks, never user code. Must
  // not run concurrently with a DeadlineQueue call on its queue's thread.
  ~Acquisition();

  // Takes every slot now if each resource has one free and nobody waiting for
  // it (with reserves or a per-key share: nobody who may take it, and the
  // slot is one this request's class and key may take); otherwise takes
  // nothing and returns false. Never queues and counts no rejection. Only
  // valid in state kIdle; on false it stays kIdle, so start() may follow.
  bool try_acquire();

  // The zero-timeout form of start(): takes every slot now if each resource
  // has one free and nobody waiting for it (as try_acquire()), otherwise is
  // rejected at once, refused by the first resource without a slot for it,
  // which counts the rejection: kQueueFull where a request arriving now
  // would have been turned away by a full queue (FIFO order; a request of a
  // higher class than the lowest waiting one would not have been: it would
  // have pushed that class's newest waiter out), kUnavailable
  // if the resource is closed, kKeyLimit if it had a slot but the key is at
  // its share, otherwise kTimeout (where a request would have queued). Never
  // joins a queue, so it never waits behind anyone and never pushes a waiter
  // out of a full queue. Calls no callback. Returns kGranted or the
  // rejection. Only valid in state kIdle.
  Outcome try_once();

  // Turns the request away without trying for a slot or queueing, for a
  // reason the caller knows before it starts (kDeadline: the client's budget
  // is already spent). Counted as a rejection with `reason` by the set's
  // first resource, which becomes refused_by(); takes nothing, waits for no
  // lock but that resource's statistics lock, calls no callback. Returns
  // `reason`. Only valid in state kIdle (std::logic_error otherwise);
  // `reason` must be a rejection (std::invalid_argument otherwise).
  Outcome refuse(Outcome reason);

  // Starts acquiring. Returns kGranted or a rejection (kQueueFull,
  // kPredictedTimeout, or kUnavailable from a closed resource) when that is
  // known at once: then `callback` is never called. Returns kPending when
  // the request is queued:
  // then `callback` is called exactly once, later, with kGranted or a
  // rejection (among them kLowerPriority: pushed out of a full queue by a
  // request of a higher class, see resource.h). A request queued into a
  // full queue may itself push out the newest waiter of a lower class,
  // whose callback is then called from this thread, after start() has
  // released every lock. Only valid in state kIdle. Use try_once() for a
  // zero timeout.
  Outcome start(Callback callback);
  // As start(callback), telling the resources when the caller will give up
  // waiting (its timer still has to expire() the request, e.g. through a
  // DeadlineQueue): a resource with early rejection
  // (ResourceOptions::early_reject) refuses the request at once, with
  // kPredictedTimeout, when the wait it predicts exceeds the time left.
  // Clock::time_point::max(): no deadline (as start(callback)).
  Outcome start(Callback callback, Clock::time_point deadline);

  // Stops waiting. Only a pending acquisition is affected: it leaves the
  // queue, drops every slot it already held, is counted as a rejection with
  // `reason` by the resource it was waiting for, and its callback is called
  // from this thread with `reason`. If that resource had granted the last
  // slot at the same instant, the grant wins instead: the state becomes
  // kGranted and the callback gets kGranted (so a caller that gives up must
  // follow cancel() with release()); if the queue had just shed it or pushed
  // it out, the callback gets that reason (kShed, kQueueFull,
  // kLowerPriority). No effect in
  // any other state.
  // `reason` must be a rejection (kTimeout, kCancelled, kDisconnected...).
  // A kTimeout of a request held back by its key's share is reported as
  // kKeyLimit (see "Key" above).
  void cancel(Outcome reason = Outcome::kCancelled);

  // The deadline has passed: cancel(kTimeout).
  void expire() { cancel(Outcome::kTimeout); }

  // Gives every held slot back, last acquired first, each to its resource's
  // next waiter if there is one. No effect unless granted.
  // `completion` tells adaptive resources how the work went (kDropped: it
  // failed or timed out); the destructor of a granted acquisition reports
  // kSuccess.
  void release(Completion completion = Completion::kSuccess);

  // The work starts now: the hold of a granted acquisition is timed from
  // this call instead of the grant of its last slot, both the service time
  // its release reports to adaptive resources and the hold time of the
  // statistics. For a caller that waits for something else after the grant
  // (e.g. a cluster-wide permit) before doing its work, so that this wait
  // does not count as service time. Blocks only on the acquisition's own
  // mutex; no effect unless granted (or if its holds are not timed).
  void restart_service_clock();

  State state() const;
  // The final outcome, or kPending while not decided.
  Outcome outcome() const;
  // The resource that turned the request away (or that it was waiting for
  // when it timed out or was cancelled); null unless rejected.
  const Resource* refused_by() const;
  // For a request that early rejection refused (kPredictedTimeout from
  // start()): the wait, in seconds, that refused_by() predicted for it from
  // the whole queue ahead (always more than the time it had left). A server
  // can tell its client when to come back from it: the Python package's
  // Retry-After does (Limiter, "retry_after"). std::nullopt for any other
  // outcome, and for a kPredictedTimeout the caller gave refuse() or
  // cancel() itself (no prediction was made).
  std::optional<double> predicted_wait() const;
  const std::shared_ptr<const ResourceSet>& resource_set() const noexcept {
    return set_;
  }
  const std::optional<std::string>& key() const noexcept { return key_; }
  Priority priority() const noexcept { return priority_; }

 private:
  friend class DeadlineQueue;

  class Node final : public detail::WaiterNode {
   public:
    Acquisition* owner = nullptr;
    std::uint32_t index = 0;

   private:
    void on_complete(Outcome outcome, detail::NoticeList& notices) noexcept override {
      owner->on_node_complete(index, outcome, notices);
    }
  };

  void on_node_complete(std::uint32_t index, Outcome outcome,
                        detail::NoticeList& notices) noexcept CL_EXCLUDES(mu_);
  // Ends the acquisition as rejected, refused by resource `index`, releasing
  // what it held. Leaves callback_ to the caller.
  void reject_locked(std::uint32_t index, Outcome reason,
                     detail::NoticeList& notices) CL_REQUIRES(mu_);
  // Enqueues the remaining resources in order until one has to wait or
  // rejects. Returns kGranted, kPending or a rejection.
  Outcome advance_locked(detail::NoticeList& notices) CL_REQUIRES(mu_);
  // Every slot is held: the acquisition is granted, and its hold starts now
  // (at the grant of the last slot, for all of its resources).
  void complete_locked() CL_REQUIRES(mu_);
  // Releases the first `held_` resources, last first.
  // Partial holds (a failed acquisition) teach limit algorithms nothing.
  void release_held_locked(detail::NoticeList& notices,
                           Completion completion = Completion::kIgnored)
      CL_REQUIRES(mu_);
  Resource& resource(std::uint32_t i) const { return *set_->resources()[i]; }

  const std::shared_ptr<const ResourceSet> set_;
  const std::optional<std::string> key_;
  const Priority priority_;
  // &*key_, or null: what the resources are given.
  const std::string* key_ptr() const noexcept { return key_ ? &*key_ : nullptr; }
  const std::uint32_t count_;
  std::unique_ptr<Node[]> nodes_;

  // Order: Acquisition::mu_ before Resource::mu_.
  mutable detail::Mutex mu_;
  State state_ CL_GUARDED_BY(mu_) = State::kIdle;
  Outcome outcome_ CL_GUARDED_BY(mu_) = Outcome::kPending;
  // Resources [0, held_) are held.
  std::uint32_t held_ CL_GUARDED_BY(mu_) = 0;
  // Index of the refusing resource, count_ if none.
  std::uint32_t refused_ CL_GUARDED_BY(mu_);
  // Moved out to be called once.
  Callback callback_ CL_GUARDED_BY(mu_);
  // Start of the hold (grant of the last slot), if the statistics time it.
  Clock::time_point granted_at_ CL_GUARDED_BY(mu_){};
  bool measured_ CL_GUARDED_BY(mu_) = false;

  // Membership in a DeadlineQueue (a binary heap of acquisitions); used by
  // that queue's thread only.
  DeadlineQueue* deadlines_ = nullptr;
  std::size_t deadline_index_ = 0;   // position in the heap
  std::uint64_t deadline_order_ = 0; // ties: earlier add() first
  double deadline_ = 0.0;
};

}  // namespace concurrency_limiter
