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
  // segment on first use. Throws as host::open_segment().
  // `algorithm`: the resource's limit algorithm, or null; only its kind and
  // options are used (throws std::invalid_argument for a custom one).
  static std::shared_ptr<HostPool> get(const ResourceOptions& options,
                                       const LimitAlgorithm* algorithm);
  // The pool of `name` if this process opened it; else null.
  static std::shared_ptr<HostPool> find(const std::string& name);

  // Takes a free slot if nobody waits; never throws (false instead: the
  // slow path, enqueue(), reports the error). Sets `measure` (always timed).
  bool try_grant(bool& measure) noexcept;
  Outcome enqueue(WaiterNode& node, NoticeList& notices);
  WaiterNode::State abandon(WaiterNode& node, Outcome reason);
  void revert_grant(NoticeList& notices);
  void count_rejection(Outcome reason);
  // A measured hold (every hold of an adaptive resource is) feeds the shared
  // limit algorithm unless `completion` is kIgnored.
  void release(bool measured, Clock::time_point granted_at, Clock::time_point now,
               Completion completion, NoticeList& notices);
  // The limit in force host-wide (a snapshot, no lock), and setting it:
  // raising it grants waiters of every process at once; lowering it retires
  // slots as they are released.
  std::int64_t limit() const noexcept;
  void set_limit(std::int64_t limit);
  std::int64_t in_use();
  std::int64_t waiting();
  ResourceStatistics statistics();

  // Fork handlers (pthread_atfork), for every pool of the process.
  static void before_fork() noexcept;
  static void after_fork_parent() noexcept;
  static void after_fork_child() noexcept;

  // Test hooks.
  void hold_lock_forever();
  void forge_process(pid_t pid, std::uint64_t start_time, std::int64_t held);
  void sweep_now();
  void die_mid_update();

  HostPool(std::string name, host::Segment* segment, ino_t inode, ResourceOptions options,
           const host::Config& config);

 private:
  // Processes to FUTEX_WAKE once the segment's mutex is released.
  struct Wakes {
    std::array<std::uint32_t, 16> procs{};
    std::uint32_t count = 0;
    bool overflow = false;  // too many: wake every registered process
  };
  // Holds the segment mutex; repairs the state if its last holder died.
  class Locked {
   public:
    explicit Locked(HostPool& pool) : seg_(pool.seg_) { lock_.emplace(*seg_); }
    ~Locked() {
      lock_.reset();
      HostPool::wake(seg_, wakes);
    }
    Locked(const Locked&) = delete;
    Locked& operator=(const Locked&) = delete;
    Wakes wakes;

   private:
    host::Segment* seg_;
    std::optional<host::SegmentLock> lock_;
  };

  // Require mu_.
  void ensure_registered_locked();
  // Require mu_ and the segment mutex.
  host::Process& me() { return seg_->processes[me_]; }
  bool valid_entry(std::uint32_t i) const { return i < host::kMaxWaiters; }
  std::uint32_t allocate_entry_locked();
  void free_entry_locked(std::uint32_t i);
  void decide_locked(std::uint32_t i, Outcome outcome, std::int64_t now_ns,
                     NoticeList& notices, Wakes& wakes);
  // Takes this process's decided entry `i` (already off every list) and
  // applies it to its local node; returns the node, or null if it has none.
  WaiterNode* settle_own_locked(std::uint32_t i, NoticeList& notices, Wakes& wakes);
  bool mine(const host::Entry& e) const;
  void hand_over_locked(std::int64_t now_ns, NoticeList& notices, Wakes& wakes);
  void fill_locked(std::int64_t now_ns, NoticeList& notices, Wakes& wakes);
  void put_limit_locked(std::int64_t limit, std::int64_t now_ns, NoticeList& notices,
                        Wakes& wakes);
  bool standing_locked(std::int64_t now_ns);
  void shed_locked(std::int64_t now_ns, NoticeList& notices, Wakes& wakes);
  std::uint32_t pick_locked(std::int64_t now_ns, NoticeList& notices, Wakes& wakes);
  void reclaim_locked(std::uint32_t proc, NoticeList& notices, Wakes& wakes);
  void note_grant_locked(double waited);
  void note_rejection_locked(Outcome reason);

  // Background thread: takes this process's decided entries, sweeps dead
  // processes every 200 ms.
  void run(std::uint32_t slot);
  void deliver();
  void sweep();
  static void wake(host::Segment* seg, const Wakes& wakes) noexcept;

  const std::string name_;
  host::Segment* const seg_;
  const ino_t inode_;  // of the segment's file, to notice its removal
  const std::int64_t capacity_;
  const std::int64_t max_waiting_;
  const QueueDiscipline discipline_;
  const std::int64_t target_ns_;
  const std::int64_t interval_ns_;

  std::mutex mu_;
  // This process's instance of the shared limit algorithm; guarded by mu_
  // (and used under the segment mutex).
  host::SharedAlgorithm algorithm_;
  // Process slot and registration; guarded by mu_.
  std::uint32_t me_ = host::kNone;
  std::uint64_t incarnation_ = 0;
  std::uint64_t generation_ = 0;  // fork generation it was registered in
  // The local node of each of this process's entries; guarded by mu_.
  std::vector<WaiterNode*> nodes_;
  ResourceStatistics stats_;  // this process's counters; guarded by mu_
};

}  // namespace concurrency_limiter::detail
