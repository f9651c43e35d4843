// Resource: a named pool of `capacity` slots with a queue of waiters.
//
// A resource stands for one thing that must not be overloaded: a database, a
// filesystem, a downstream API. Each request that uses it holds one slot while
// it runs. When every slot is taken, requests wait in the resource's queue;
// when a slot is released it is handed straight to the waiter chosen by the
// queue discipline (no thundering herd, and nobody barges past the queue: a
// newcomer gets a free slot only when nobody is waiting).
//
//   auto db = std::make_shared<Resource>(ResourceOptions{.name = "db", .capacity = 5});
//   if (Permit p = db->acquire_for(std::chrono::seconds(2))) {
//     run_query();        // the slot is held until `p` is destroyed
//   } else {
//     reply_503(p.outcome());   // kTimeout, kQueueFull, kShed or kCancelled
//   }
//
// Queue disciplines (ResourceOptions::queue):
//   kFifo      oldest waiter first. When the queue is at max_waiting, the new
//              request is rejected with kQueueFull at once.
//   kLifo      newest waiter first. When the queue is full, the *oldest*
//              waiter is rejected with kQueueFull to make room: under overload
//              the newest requests, whose clients are still waiting, are the
//              ones worth serving.
//   kAdaptive  FIFO while the queue drains. Once more requests wait than the
//              resource has slots and the oldest waiter has been older than
//              `adaptive_target` without a break for a whole
//              `adaptive_interval` (a standing queue, in CoDel's terms), it
//              serves the newest waiter first, so the requests that do get
//              served have not waited, and sheds (kShed) waiters older than
//              `adaptive_target + adaptive_interval`: served last, they would
//              only wait for their timeout. Back to FIFO as soon as the oldest
//              waiter is younger than the target or the queue is no longer
//              than the number of slots. Full queue: as kLifo while standing,
//              as kFifo otherwise.
//
// Thread safety: every member function may be called from any thread. The
// resource's state is guarded by one mutex, held for a few instructions (plus
// one step per waiter shed by the adaptive queue) and never while user code
// (a completion callback) runs.
//
// Lifetime: create resources with std::make_shared. A Resource must outlive
// every Permit and Acquisition that uses it; Limiter and ResourceSet hold it
// by shared_ptr, which takes care of that, and the blocking calls below need
// that ownership (they use shared_from_this()).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "concurrency_limiter/outcome.h"
#include "concurrency_limiter/statistics.h"

namespace concurrency_limiter {

using Clock = std::chrono::steady_clock;

class Acquisition;
class Permit;
class Resource;

// Which processes share a resource's slots (see host_resource.h).
enum class Scope : std::uint8_t {
  kProcess,  // this process only (the default)
  kHost,     // every process of this user on this machine that opens the name
};

struct ResourceOptions {
  // Appears in errors, statistics and metrics. Empty: a unique name
  // "resource-N" is generated.
  std::string name;
  // Number of slots; must be >= 1.
  std::int64_t capacity = 1;
  // Longest queue allowed; nullopt means unbounded. 0 means "never wait":
  // a request either gets a free slot at once or is rejected with kQueueFull.
  std::optional<std::int64_t> max_waiting;
  QueueDiscipline queue = QueueDiscipline::kFifo;
  // kAdaptive only: the queueing delay considered normal. Must be > 0. Set
  // it above the waits of normal operation (about a service time when the
  // steady load keeps a short queue), so only an overload changes the order.
  Clock::duration adaptive_target = std::chrono::milliseconds(500);
  // kAdaptive only: how long the oldest waiter must stay above the target
  // before the queue counts as standing. Must be > 0.
  Clock::duration adaptive_interval = std::chrono::milliseconds(1500);
  // kHost: one pool of `capacity` slots and one queue for every process of
  // this user on this machine that opens a resource of the same `name`
  // (required: letters, digits, '_', '-', '.', at most 64). See
  // host_resource.h.
  Scope scope = Scope::kProcess;
};

namespace detail {

class NoticeList;
class HostPool;

// A queued request for one slot of one resource: an intrusive list node, so
// that queueing never allocates. The resource links and unlinks it and
// decides its fate under the resource's mutex; it then calls on_complete()
// after the mutex is released. Implemented by Acquisition.
class WaiterNode {
 public:
  enum class State : std::uint8_t { kIdle, kQueued, kGranted, kRejected };

  WaiterNode() = default;
  WaiterNode(const WaiterNode&) = delete;
  WaiterNode& operator=(const WaiterNode&) = delete;

 protected:
  ~WaiterNode() = default;

 private:
  friend class concurrency_limiter::Resource;
  friend class NoticeList;
  friend class concurrency_limiter::Acquisition;
  friend class HostPool;

  // Called once, without any lock held, when the resource granted the node a
  // slot (kGranted) or dropped it from the queue (kShed, kQueueFull), unless
  // the owner took it out first with Resource::abandon(). It must clear
  // completing_ (release store) as its last access to the node, must not
  // run user code itself (hand it to `notices.defer()`), and may push further
  // nodes onto `notices`. So an owner waiting to free a node only ever waits
  // for a few instructions under locks, never for a callback.
  virtual void on_complete(Outcome outcome, NoticeList& notices) noexcept = 0;

  WaiterNode* prev_ = nullptr;  // queue links; guarded by the resource's mu_
  WaiterNode* next_ = nullptr;  // also links a NoticeList once dequeued
  Clock::time_point enqueued_at_{};
  Clock::time_point granted_at_{};  // start of the hold, for hold_seconds
  State state_ = State::kIdle;      // guarded by the resource's mu_
  Outcome outcome_ = Outcome::kPending;  // set together with state_
  // True from the moment the resource decides the node's fate until its
  // on_complete() has finished with the node. The owner waits for false
  // before the node's memory may go away (release store in on_complete,
  // acquire load by the owner).
  std::atomic<bool> completing_{false};
  // Host scope: index of the node's entry in the shared waiter table while
  // it is queued; guarded by the host pool's local mutex.
  std::uint32_t host_entry_ = 0;
};

// Nodes whose fate was decided under a resource's mutex and whose owners must
// be told once every lock is released, and the completion callbacks that
// their owners then want called. Intrusive: reuses the queue links.
class NoticeList {
 public:
  using Callback = std::function<void(Outcome)>;

  NoticeList() = default;
  NoticeList(const NoticeList&) = delete;
  NoticeList& operator=(const NoticeList&) = delete;
  ~NoticeList() { fire(); }

  void push(WaiterNode* node) noexcept;
  // Queues `callback(outcome)` to run after every node has been told.
  void defer(Callback callback, Outcome outcome);
  // Calls on_complete() of every node in order (including nodes pushed
  // meanwhile), then the deferred callbacks. Call with no lock held.
  void fire() noexcept;

 private:
  WaiterNode* head_ = nullptr;
  WaiterNode* tail_ = nullptr;
  // One deferred call inline (the common case: a single handoff), the rest
  // in a vector.
  Callback first_;
  Outcome first_outcome_ = Outcome::kPending;
  std::vector<std::pair<Callback, Outcome>> more_;
};

}  // namespace detail

class Resource : public std::enable_shared_from_this<Resource> {
 public:
  // Throws std::invalid_argument naming the parameter and the allowed values
  // when an option is out of range.
  explicit Resource(ResourceOptions options);
  Resource(std::string name, std::int64_t capacity);

  Resource(const Resource&) = delete;
  Resource& operator=(const Resource&) = delete;
  ~Resource();

  const std::string& name() const noexcept { return name_; }
  std::int64_t capacity() const noexcept { return capacity_; }
  std::optional<std::int64_t> max_waiting() const noexcept;
  QueueDiscipline queue() const noexcept { return discipline_; }
  Scope scope() const noexcept { return host_ ? Scope::kHost : Scope::kProcess; }

  // Slots held right now, and requests waiting right now. A snapshot: it may
  // be stale by the time the caller looks at it.
  std::int64_t in_use() const;
  std::int64_t waiting() const;
  ResourceStatistics statistics() const;

  // Blocking acquisition of one slot from a calling thread. These are
  // shorthands for a one-resource Acquisition; see Permit for the result.
  //
  // try_acquire(): never blocks. Succeeds only if a slot is free and nobody is
  //   waiting; otherwise the returned Permit is empty with kTimeout (it is a
  //   zero timeout), without counting a rejection.
  // acquire_until(deadline): blocks the calling thread until a slot is handed
  //   to it (kGranted), the deadline passes (kTimeout), the queue rejects it
  //   (kQueueFull, kShed) or `stop` is requested (kCancelled). A deadline in
  //   the past means "try once" but still queues behind nobody: a free slot
  //   with an empty queue is granted.
  // acquire_for(timeout): acquire_until(now + timeout).
  Permit try_acquire();
  Permit acquire_until(Clock::time_point deadline, std::stop_token stop = {});
  Permit acquire_for(Clock::duration timeout, std::stop_token stop = {});

 private:
  friend class Acquisition;

  Resource(ResourceOptions validated_options, int);

  // All of the following take mu_ themselves. Nodes whose fate they decide
  // (grants, sheds) are appended to `notices`, to be fired with no lock held.

  // Grants a slot to `node` at once if one is free and nobody waits.
  bool try_grant(detail::WaiterNode& node);
  // Grants at once, or queues the node, or rejects it (kQueueFull). Returns
  // kGranted, kPending (queued) or kQueueFull.
  Outcome enqueue(detail::WaiterNode& node, detail::NoticeList& notices);
  // Takes a queued node out of the queue with `reason`, counted as a
  // rejection. Returns the node's state: kQueued if it was still queued (it is
  // now rejected and will not be notified), else kGranted or kRejected when
  // the resource had already decided (its notice may still be in flight).
  detail::WaiterNode::State abandon(detail::WaiterNode& node, Outcome reason);
  // Gives back a slot taken by try_grant() a moment ago, as if it had never
  // been granted: no acquisition, wait or hold is counted.
  void revert_grant(detail::NoticeList& notices);
  // Counts a rejection that the resource itself did not decide.
  void count_rejection(Outcome reason);
  // Gives back one slot held since `granted_at`: hands it to the next waiter
  // or frees it.
  void release(Clock::time_point granted_at, detail::NoticeList& notices);

  // Helpers; require mu_ held.
  void grant_free_slot_locked(detail::WaiterNode& node, Clock::time_point now);
  // A slot was given back: to the waiter the discipline picks, or freed.
  void hand_over_locked(Clock::time_point now, detail::NoticeList& notices);
  void note_grant_locked(double waited);
  void note_rejection_locked(Outcome reason);
  void link_tail(detail::WaiterNode& node, Clock::time_point now);
  void unlink(detail::WaiterNode& node);
  void reject_locked(detail::WaiterNode& node, Outcome reason,
                     detail::NoticeList& notices);
  bool standing_locked(Clock::time_point now);
  void shed_locked(Clock::time_point now, detail::NoticeList& notices);
  detail::WaiterNode* pick_locked(Clock::time_point now,
                                  detail::NoticeList& notices);
  void grant_locked(detail::WaiterNode& node, Clock::time_point now);

  const std::string name_;
  const std::int64_t capacity_;
  const std::int64_t max_waiting_;  // -1: unbounded
  const QueueDiscipline discipline_;
  const Clock::duration target_;
  const Clock::duration interval_;

  mutable std::mutex mu_;
  std::int64_t in_use_ = 0;          // guarded by mu_
  std::int64_t waiting_ = 0;         // guarded by mu_
  detail::WaiterNode* head_ = nullptr;  // oldest waiter; guarded by mu_
  detail::WaiterNode* tail_ = nullptr;  // newest waiter; guarded by mu_
  // Since when the oldest waiter has been older than target_ without a break;
  // guarded by mu_.
  std::optional<Clock::time_point> above_target_since_;
  ResourceStatistics stats_;          // counters; guarded by mu_
  // Host scope: every operation above is delegated to the machine-wide pool
  // (src/host/); null for process scope. Set once by the constructor.
  std::shared_ptr<detail::HostPool> host_;
};

}  // namespace concurrency_limiter
