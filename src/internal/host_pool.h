// HostPool: this process's side of a host-scoped resource. One per resource
// name per process (Resources of the same name share it), never destroyed:
// the segment stays mapped for the life of the process.
//
// It implements Resource's private operations (try_grant, enqueue, abandon,
// release...) on the shared segment, so Acquisition, Limiter and Permit work
// unchanged. Decisions are made under the segment's mutex; a node of this
// process is told through the usual NoticeList, a waiter of another process
// through its process's decided list and futex word, which that process's
// background thread waits on and turns into the same notices.
//
// Lock order: Acquisition::mu_, then HostPool::mu_, then the segment mutex.
#pragma once

#include <sys/types.h>

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "concurrency_limiter/host_resource.h"
#include "concurrency_limiter/resource.h"
#include "internal/host_segment.h"

namespace concurrency_limiter::detail {

class HostPool {
 public:
  // The pool of `options.name` in this process, opening (or creating) its
  // segment on first use and registering this process with it (a forked
  // child registers again at its first operation). Throws as
  // host::open_segment(), and std::runtime_error if the background thread
  // cannot start (nothing stays registered then).
  // `algorithm`: the resource's limit algorithm, or null; only its kind and
  // options are used (throws std::invalid_argument for a custom one).
  // An existing pool or segment with another configuration takes this one
  // (newest wins); `note` then says so (`warning`: processes using the old
  // one are alive), as it does when a corrupt segment was replaced.
  static std::shared_ptr<HostPool> get(const ResourceOptions& options,
                                       const LimitAlgorithm* algorithm, std::string& note,
                                       bool& warning);
  // The pool of `name` if this process opened it; else null.
  static std::shared_ptr<HostPool> find(const std::string& name);

  // Takes a free slot if nobody waits; never throws (false instead: the
  // slow path, enqueue(), reports the error). Sets `measure` (always timed).
  // `priority`: the request's class (reserves; counted per class).
  bool try_grant(bool& measure, Priority priority) noexcept;
  // Outcome::kUnavailable when the shared state cannot be reached in time.
  // With `early_reject` (ResourceOptions::early_reject), a request that
  // would wait is refused with kPredictedTimeout when the waiters ahead of
  // it machine-wide / the limit x this process's service estimate exceed
  // the time to its deadline.
  Outcome enqueue(WaiterNode& node, NoticeList& notices, bool early_reject = false);
  WaiterNode::State abandon(WaiterNode& node, Outcome reason);
  // `priority`: the class of the request (of the slot, for revert_grant()
  // and release()), for the per-class counts and the reserves.
  void revert_grant(NoticeList& notices, Priority priority);
  void count_rejection(Outcome reason, Priority priority);
  // A measured hold (every hold of an adaptive resource is) feeds the shared
  // limit algorithm unless `completion` is kIgnored. A release that cannot
  // reach the shared state now is applied by the background thread later.
  void release(bool measured, Clock::time_point granted_at, Clock::time_point now,
               Completion completion, NoticeList& notices, Priority priority);
  // The configuration in force host-wide (snapshots, no lock).
  std::int64_t capacity() const noexcept;
  std::int64_t max_waiting() const noexcept;  // -1: unbounded
  // Whether a request of class `priority` arriving now would be turned away
  // by the full queue (max_waiting), as enqueue() decides: full, and no
  // waiter of a lower class (nor, newest first, of its own) to push out.
  // False when the shared state cannot be reached.
  bool queue_full_for(Priority priority) noexcept;
  QueueDiscipline queue() const noexcept;
  // The limit in force host-wide (a snapshot, no lock), and setting it:
  // raising it grants waiters of every process at once; lowering it retires
  // slots as they are released. Throws host::Unavailable (a
  // std::runtime_error) if the shared state cannot be reached.
  std::int64_t limit() const noexcept;
  void set_limit(std::int64_t limit);
  // Snapshots; the last known values while the shared state is unreachable.
  std::int64_t in_use() noexcept;
  std::int64_t waiting() noexcept;
  ResourceStatistics statistics();

  // Fork handlers (pthread_atfork), for every pool of the process.
  static void before_fork() noexcept;
  static void after_fork_parent() noexcept;
  static void after_fork_child() noexcept;

  // Test hooks.
  void hold_lock_forever();
  void forge_process(pid_t pid, std::int64_t held);
  void sweep_now();
  void die_mid_update();
  static void fail_thread_start(bool fail) noexcept;

  HostPool(std::string name, const host::Config& config, host::Opened opened);

 private:
  // Processes to FUTEX_WAKE once the segment's mutex is released.
  struct Wakes {
    std::array<std::uint32_t, 16> procs{};
    std::uint32_t count = 0;
    bool overflow = false;  // too many: wake every registered process
  };
  // Holds the segment mutex (throws host::Unavailable, see SegmentLock); if
  // its last holder died inside, repairs the state first. On unlock, keeps
  // the snapshots of in_use and waiting, then wakes `wakes`.
  class Locked {
   public:
    explicit Locked(HostPool& pool) : pool_(pool), seg_(pool.seg()) { lock_.emplace(*seg_); }
    ~Locked() {
      pool_.in_use_snapshot_.store(seg_->header.in_use, std::memory_order_relaxed);
      pool_.waiting_snapshot_.store(seg_->header.waiting, std::memory_order_relaxed);
      lock_.reset();
      HostPool::wake(seg_, wakes);
    }
    Locked(const Locked&) = delete;
    Locked& operator=(const Locked&) = delete;
    Wakes wakes;

   private:
    HostPool& pool_;
    host::Segment* seg_;
    std::optional<host::SegmentLock> lock_;
  };

  host::Segment* seg() const noexcept { return seg_.load(std::memory_order_acquire); }
  // Require mu_ and the segment mutex.
  const host::Config& cfg() const { return seg()->header.config; }
  host::Process& me() { return seg()->processes[me_]; }
  host::SharedAlgorithm* algorithm_locked();

  // Require mu_. Registers this process (again after fork), attaches to a
  // new segment after a reset, starts the background thread.
  bool must_attach_locked() const noexcept;
  void attach_locked(NoticeList& notices);
  void register_locked();
  void reattach_locked(NoticeList& notices);
  void start_thread_locked();
  // Gives up the segment (a failed open: nothing registered, no thread).
  void close_locked() noexcept;
  // Takes and gives back the segment's lock without mu_ (background thread).
  bool probe_lock() noexcept;
  // The breaker: after the shared state could not be reached, requests are
  // refused at once (kUnavailable) until the background thread reaches it.
  bool unavailable_now() const noexcept;
  void mark_unavailable() noexcept;

  // Require mu_ and the segment mutex.
  std::uint32_t allocate_entry_locked();
  void free_entry_locked(std::uint32_t i);
  void decide_locked(std::uint32_t i, Outcome outcome, std::int64_t now_ns,
                     NoticeList& notices, Wakes& wakes);
  // Takes this process's decided entry `i` (already off every list) and
  // applies it to its local node; returns the node, or null if it has none.
  WaiterNode* settle_own_locked(std::uint32_t i, NoticeList& notices, Wakes& wakes);
  bool mine(const host::Entry& e) const;
  // Gives back a slot of class `freed` (its index): grants it to the next
  // waiter that may take it, frees it, or retires it (the limit lowered).
  void hand_over_locked(std::size_t freed, std::int64_t now_ns, NoticeList& notices,
                        Wakes& wakes);
  // Whether a newcomer of class `c` (its index) takes a free slot at once:
  // one is free and nobody waits (with reserves: its class may take it,
  // and nobody of its class or above waits); and taking it.
  bool may_grant_at_once_locked(std::size_t c) const;
  void grant_at_once_locked(Priority priority);
  void fill_locked(std::int64_t now_ns, NoticeList& notices, Wakes& wakes);
  void put_limit_locked(std::int64_t limit, std::int64_t now_ns, NoticeList& notices,
                        Wakes& wakes);
  bool standing_locked(std::int64_t now_ns);
  // Sheds the oldest waiters of the lowest classes waiting, and of none
  // above `below` (the class of a newcomer about to wait).
  void shed_locked(std::int64_t now_ns, NoticeList& notices, Wakes& wakes,
                   std::size_t below = kPriorityCount);
  std::uint32_t pick_locked(std::int64_t now_ns, NoticeList& notices, Wakes& wakes);
  void reclaim_locked(std::uint32_t proc, NoticeList& notices, Wakes& wakes);
  void catch_up_locked(NoticeList& notices, Wakes& wakes);
  // Waiters ahead of a newcomer of class `own` in the grant order,
  // machine-wide: every waiter of the classes above, and of its own unless
  // served newest first, each of its own class counted `own_weight` times
  // (the limit over the slots the class may use, with reserves above it).
  // Counts no further than `enough`.
  double waiters_ahead_locked(std::size_t own, bool newest_first, double own_weight,
                              double enough);
  // Whether holds are timed (see measure_).
  bool timed_locked();
  void note_grant_locked(double waited, Priority priority);
  void note_rejection_locked(Outcome reason, Priority priority);
  Outcome refuse_locked(WaiterNode& node, Outcome reason);
  // The waiter table is full: queued entry `i` (the newest of the lowest
  // class below a newcomer) is freed for the newcomer. This process's
  // waiter is told kLowerPriority at once; another process's is unlinked
  // and its process woken, whose deliver() tells it (tell_taken_locked()).
  void take_entry_locked(std::uint32_t i, std::int64_t now_ns, NoticeList& notices,
                         Wakes& wakes);
  // Tells the local node of entry `i`, which another process took, that it
  // was pushed out (kLowerPriority).
  void tell_taken_locked(std::uint32_t i, NoticeList& notices);

  // Background thread: takes this process's decided entries, applies what
  // could not be applied at once, sweeps dead processes every 200 ms.
  void run();
  void deliver();
  void sweep();
  static void wake(host::Segment* seg, const Wakes& wakes) noexcept;

  const std::string name_;
  const host::Config config_;  // what this process asked for

  std::mutex mu_;
  // The segment attached to: changes only when an operator's reset makes
  // this process attach to a new one (the old one stays mapped). Written
  // under mu_; read without it for snapshots.
  std::atomic<host::Segment*> seg_;
  // Guarded by mu_: the segment's file (liveness locks) and inode.
  int fd_ = -1;
  ino_t inode_ = 0;
  // This process's instance of the shared limit algorithm, for the
  // configuration generation it was made for; guarded by mu_ (and used
  // under the segment mutex).
  std::optional<host::SharedAlgorithm> algorithm_;
  std::uint64_t algorithm_generation_ = 0;
  // Process slot and registration; guarded by mu_.
  std::uint32_t me_ = host::kNone;
  std::uint64_t incarnation_ = 0;
  std::uint64_t generation_ = 0;         // fork generation it was registered in
  std::uint64_t thread_generation_ = 0;  // fork generation of its running thread
  // The local node of each of this process's entries, and how many are
  // set; guarded by mu_. An entry another process took (take_entry_locked())
  // keeps its node here until deliver() or enqueue() tells it.
  std::vector<WaiterNode*> nodes_;
  std::int64_t nodes_count_ = 0;
  // Guarded by mu_: slots this process holds in the attached segment;
  // releases and abandoned entries not yet applied for want of the lock.
  std::int64_t held_local_ = 0;
  // When this process (this fork generation of it) registered.
  Clock::time_point registered_at_{};
  // Of held_local_, those of each class (by priority_index()), so that a
  // reset carries each slot into the new segment in its own class.
  std::array<std::int64_t, kPriorityCount> held_class_local_{};
  // held_local_ (and per class) of a removed segment, until registered.
  std::int64_t carried_ = 0;
  std::array<std::int64_t, kPriorityCount> carried_class_{};
  std::array<std::int64_t, kPriorityCount> pending_releases_{};  // per class
  std::vector<std::uint32_t> orphans_;
  // Set by the background thread when the segment's file was removed.
  std::atomic<bool> detached_{false};
  // Steady-clock ns until which requests are refused as unavailable.
  std::atomic<std::int64_t> unavailable_until_ns_{0};
  std::atomic<std::int64_t> in_use_snapshot_{0};
  std::atomic<std::int64_t> waiting_snapshot_{0};
  ResourceStatistics stats_;  // this process's counters; guarded by mu_
  // Guarded by mu_: whether a Resource of this name in this process
  // rejects early (every hold is then timed). The estimate of service time
  // is the segment's (Header::service_seconds), fed by every process.
  bool early_reject_ = false;
};

}  // namespace concurrency_limiter::detail
