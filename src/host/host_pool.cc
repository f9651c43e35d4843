#include "internal/host_pool.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <stdexcept>
#include <thread>
#include <utility>

namespace concurrency_limiter::detail {
namespace {

using host::Entry;
using host::EntryState;
using host::kMaxProcesses;
using host::kMaxWaiters;
using host::kNone;
using host::Process;
using host::Segment;
using host::SegmentLock;
using NodeState = WaiterNode::State;

// Bumped in every forked child: a pool registered in an older generation
// belongs to the parent and must register again.
std::atomic<std::uint64_t> g_generation{1};

// Pools of this process by name. Never destroyed: segments stay mapped, and
// background threads keep running, until the process exits.
std::mutex& registry_mu() {
  static auto* mu = new std::mutex;
  return *mu;
}
std::map<std::string, std::shared_ptr<HostPool>>& registry() {
  static auto* pools = new std::map<std::string, std::shared_ptr<HostPool>>;
  return *pools;
}

constexpr std::uint32_t as_u32(EntryState s) { return static_cast<std::uint32_t>(s); }

std::int64_t to_ns(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch())
      .count();
}
Clock::time_point from_ns(std::int64_t ns) {
  return Clock::time_point(
      std::chrono::duration_cast<Clock::duration>(std::chrono::nanoseconds(ns)));
}

// Background thread: how long a futex wait lasts before the next sweep for
// dead processes.
constexpr auto kSweepInterval = std::chrono::milliseconds(200);

constexpr bool kStatistics = CL_STATISTICS != 0;

host::Config config_of(const ResourceOptions& o, const LimitAlgorithm* algorithm) {
  return host::Config{
      .capacity = o.capacity,
      .max_waiting = o.max_waiting ? *o.max_waiting : -1,
      .queue = static_cast<std::uint32_t>(o.queue),
      .reserved = 0,
      .target_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(o.adaptive_target).count(),
      .interval_ns =
          std::chrono::duration_cast<std::chrono::nanoseconds>(o.adaptive_interval).count(),
      .limit = host::limit_config_of(algorithm)};
}

}  // namespace

std::shared_ptr<HostPool> HostPool::get(const ResourceOptions& o,
                                         const LimitAlgorithm* algorithm) {
  host::check_name(o.name);
  const host::Config config = config_of(o, algorithm);
  std::lock_guard lock(registry_mu());
  static std::once_flag fork_handlers;
  std::call_once(fork_handlers, [] {
    ::pthread_atfork(&HostPool::before_fork, &HostPool::after_fork_parent,
                     &HostPool::after_fork_child);
  });
  auto it = registry().find(o.name);
  if (it != registry().end() && !host::is_linked(o.name, it->second->inode_)) {
    // Removed (reset) since this process opened it: Resources created from
    // now on use the new one.
    registry().erase(it);
    it = registry().end();
  }
  if (it != registry().end()) {
    // Opened before in this process: same segment, same checks.
    const host::Config& theirs = it->second->seg_->header.config;
    if (!host::same_config(theirs, config)) {
      throw std::invalid_argument(
          "host resource '" + o.name + "' already exists on this host with " +
          host::describe(theirs) + "; this process asks for " + host::describe(config) +
          ". Use the same configuration in every process, or another name");
    }
    return it->second;
  }
  ino_t inode = 0;
  host::Segment* seg = host::open_segment(o.name, &config, &inode);
  auto pool = std::make_shared<HostPool>(o.name, seg, inode, o, config);
  registry().emplace(o.name, pool);
  return pool;
}

std::shared_ptr<HostPool> HostPool::find(const std::string& name) {
  std::lock_guard lock(registry_mu());
  auto it = registry().find(name);
  return it == registry().end() ? nullptr : it->second;
}

HostPool::HostPool(std::string name, host::Segment* segment, ino_t inode, ResourceOptions o,
                   const host::Config& config)
    : name_(std::move(name)),
      seg_(segment),
      inode_(inode),
      capacity_(o.capacity),
      max_waiting_(o.max_waiting ? *o.max_waiting : -1),
      discipline_(o.queue),
      target_ns_(config.target_ns),
      interval_ns_(config.interval_ns),
      algorithm_(config) {
  stats_.name = name_;
  stats_.capacity = capacity_;
  stats_.max_waiting = o.max_waiting;
  stats_.queue = discipline_;
}

// --- fork ------------------------------------------------------------------

void HostPool::before_fork() noexcept {
  // No pool's local state may be mid-update in the child.
  registry_mu().lock();
  for (auto& [name, pool] : registry()) pool->mu_.lock();
}

void HostPool::after_fork_parent() noexcept {
  for (auto& [name, pool] : registry()) pool->mu_.unlock();
  registry_mu().unlock();
}

void HostPool::after_fork_child() noexcept {
  // The child registers as a new process at its first acquisition (it has no
  // background thread yet; starting one here is not safe in every runtime).
  g_generation.fetch_add(1, std::memory_order_relaxed);
  for (auto& [name, pool] : registry()) pool->mu_.unlock();
  registry_mu().unlock();
}

void HostPool::ensure_registered_locked() {
  const std::uint64_t generation = g_generation.load(std::memory_order_relaxed);
  if (me_ != kNone && generation_ == generation) return;
  const pid_t pid = ::getpid();
  const std::uint64_t start = host::start_time_of(pid);
  if (start == 0) {
    throw std::runtime_error("host resource '" + name_ +
                             "': cannot read this process's start time from /proc");
  }
  std::uint32_t slot = kNone;
  NoticeList notices;  // nothing of ours can be queued yet
  {
    Locked locked(*this);
    host::Header& h = seg_->header;
    if (h.retired) {
      throw std::runtime_error("host resource '" + name_ +
                               "' was reset by an operator while this process had it "
                               "open; restart the process to use a new one");
    }
    for (int pass = 0; pass < 2 && slot == kNone; ++pass) {
      for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
        if (seg_->processes[p].pid == 0) {
          slot = p;
          break;
        }
      }
      if (slot == kNone && pass == 0) {
        // Full: reclaim dead processes now rather than at the next sweep.
        for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
          const Process& q = seg_->processes[p];
          if (host::is_dead(q.pid, q.start_time)) {
            reclaim_locked(p, notices, locked.wakes);
          }
        }
      }
    }
    if (slot == kNone) {
      throw std::runtime_error("host resource '" + name_ + "': more than " +
                               std::to_string(kMaxProcesses) +
                               " processes use it at the same time");
    }
    Process& p = seg_->processes[slot];
    p.start_time = start;
    p.incarnation = h.next_incarnation++;
    p.held = 0;
    p.waiting = 0;
    p.decided = {kNone, kNone};
    p.pid = pid;
    incarnation_ = p.incarnation;
  }
  me_ = slot;
  generation_ = generation;
  nodes_.assign(kMaxWaiters, nullptr);
  std::thread([this, slot] { run(slot); }).detach();
}

// --- engine operations -------------------------------------------------------

bool HostPool::mine(const Entry& e) const {
  return e.process == me_ && e.incarnation == incarnation_;
}

std::uint32_t HostPool::allocate_entry_locked() {
  host::Header& h = seg_->header;
  const std::uint32_t i = h.free_head;
  if (i == kNone) return kNone;
  if (i >= kMaxWaiters || seg_->entries[i].state != as_u32(EntryState::kFree)) {
    h.needs_rebuild = 1;
    return kNone;
  }
  h.free_head = seg_->entries[i].next;
  return i;
}

void HostPool::free_entry_locked(std::uint32_t i) {
  Entry& e = seg_->entries[i];
  e.state = as_u32(EntryState::kFree);
  e.process = kNone;
  e.prev = kNone;
  e.next = seg_->header.free_head;
  seg_->header.free_head = i;
}

void HostPool::note_grant_locked(double waited) {
  if constexpr (kStatistics) {
    ++stats_.acquired_total;
    stats_.wait_seconds.observe(waited);
  }
}

void HostPool::note_rejection_locked(Outcome reason) {
  if constexpr (kStatistics) ++stats_.rejected_total[rejection_index(reason)];
}

void HostPool::decide_locked(std::uint32_t i, Outcome outcome, std::int64_t now_ns,
                             NoticeList& notices, Wakes& wakes) {
  host::Header& h = seg_->header;
  Entry& e = seg_->entries[i];
  host::unlink(*seg_, h.queue, i);
  --h.waiting;
  if (e.process < kMaxProcesses) --seg_->processes[e.process].waiting;
  e.decided_ns = now_ns;
  e.outcome = static_cast<std::uint32_t>(outcome);
  e.state = as_u32(outcome == Outcome::kGranted ? EntryState::kGranted : EntryState::kRejected);
  if (mine(e)) {
    if (WaiterNode* node = settle_own_locked(i, notices, wakes)) {
      node->completing_.store(true, std::memory_order_relaxed);  // published by mu_
      notices.push(node);
    }
    return;
  }
  if (e.process >= kMaxProcesses) {  // out of range: dropped by the rebuild
    h.needs_rebuild = 1;
    return;
  }
  // Another process's waiter: its background thread takes it from here.
  host::push_back(*seg_, seg_->processes[e.process].decided, i);
  if (wakes.overflow) return;
  for (std::uint32_t k = 0; k < wakes.count; ++k) {
    if (wakes.procs[k] == e.process) return;
  }
  if (wakes.count == wakes.procs.size()) {
    wakes.overflow = true;
  } else {
    wakes.procs[wakes.count++] = e.process;
  }
}

WaiterNode* HostPool::settle_own_locked(std::uint32_t i, NoticeList& notices,
                                        Wakes& wakes) {
  Entry& e = seg_->entries[i];
  const bool granted = e.state == as_u32(EntryState::kGranted);
  Outcome outcome = static_cast<Outcome>(e.outcome);
  if (!granted && !is_rejection(outcome)) outcome = Outcome::kCancelled;
  const std::int64_t decided_ns = e.decided_ns;
  WaiterNode* node = nodes_[i];
  nodes_[i] = nullptr;
  free_entry_locked(i);
  if (granted) ++me().held;  // from the granted entry to this process
  if (!node) {
    // No local waiter (cannot happen unless the table was rebuilt): a
    // granted slot goes to the next waiter.
    if (granted) {
      --me().held;
      hand_over_locked(decided_ns, notices, wakes);
    }
    return nullptr;
  }
  if (granted) {
    node->state_ = NodeState::kGranted;
    node->outcome_ = Outcome::kGranted;
    node->granted_at_ = from_ns(decided_ns);
    node->measure_ = kStatistics || algorithm_.adaptive();
    note_grant_locked(
        std::max(0.0, std::chrono::duration<double>(node->granted_at_ - node->enqueued_at_)
                          .count()));
  } else {
    node->state_ = NodeState::kRejected;
    node->outcome_ = outcome;
    note_rejection_locked(outcome);
  }
  return node;
}

bool HostPool::standing_locked(std::int64_t now_ns) {
  host::Header& h = seg_->header;
  const std::uint32_t head = h.queue.head;
  if (head >= kMaxWaiters || h.waiting <= limit() ||
      now_ns - seg_->entries[head].enqueued_ns <= target_ns_) {
    h.above_target_since_ns = -1;
    return false;
  }
  if (h.above_target_since_ns < 0) {
    h.above_target_since_ns = seg_->entries[head].enqueued_ns + target_ns_;
  }
  return now_ns - h.above_target_since_ns >= interval_ns_;
}

void HostPool::shed_locked(std::int64_t now_ns, NoticeList& notices, Wakes& wakes) {
  if (discipline_ != QueueDiscipline::kAdaptive || !standing_locked(now_ns)) return;
  host::Header& h = seg_->header;
  for (std::uint32_t steps = 0; steps < kMaxWaiters; ++steps) {
    const std::uint32_t head = h.queue.head;
    if (head >= kMaxWaiters ||
        now_ns - seg_->entries[head].enqueued_ns <= target_ns_ + interval_ns_) {
      return;
    }
    decide_locked(head, Outcome::kShed, now_ns, notices, wakes);
  }
}

std::uint32_t HostPool::pick_locked(std::int64_t now_ns, NoticeList& notices,
                                    Wakes& wakes) {
  host::Header& h = seg_->header;
  std::uint32_t i = kNone;
  switch (discipline_) {
    case QueueDiscipline::kFifo:
      i = h.queue.head;
      break;
    case QueueDiscipline::kLifo:
      i = h.queue.tail;
      break;
    case QueueDiscipline::kAdaptive:
      shed_locked(now_ns, notices, wakes);
      i = standing_locked(now_ns) ? h.queue.tail : h.queue.head;
      break;
  }
  if (i == kNone) return kNone;
  if (i >= kMaxWaiters || seg_->entries[i].state != as_u32(EntryState::kQueued)) {
    h.needs_rebuild = 1;
    return kNone;
  }
  return i;
}

void HostPool::hand_over_locked(std::int64_t now_ns, NoticeList& notices, Wakes& wakes) {
  if (seg_->header.in_use > limit()) {
    // The limit was lowered: retire the slot instead of handing it over.
    --seg_->header.in_use;
    return;
  }
  const std::uint32_t next = pick_locked(now_ns, notices, wakes);
  if (next != kNone) {
    decide_locked(next, Outcome::kGranted, now_ns, notices, wakes);  // in_use stays
  } else {
    --seg_->header.in_use;
  }
}

void HostPool::fill_locked(std::int64_t now_ns, NoticeList& notices, Wakes& wakes) {
  host::Header& h = seg_->header;
  while (h.in_use < limit()) {
    const std::uint32_t next = pick_locked(now_ns, notices, wakes);
    if (next == kNone) return;
    ++h.in_use;
    h.peak_in_use = std::max(h.peak_in_use, h.in_use);
    decide_locked(next, Outcome::kGranted, now_ns, notices, wakes);
  }
}

void HostPool::put_limit_locked(std::int64_t limit, std::int64_t now_ns, NoticeList& notices,
                                Wakes& wakes) {
  seg_->header.limit.store(limit, std::memory_order_relaxed);
  // Raised: the new slots go to waiters of every process at once. Lowered:
  // hand_over_locked() retires released slots until in_use <= limit.
  fill_locked(now_ns, notices, wakes);
}

void HostPool::reclaim_locked(std::uint32_t proc, NoticeList& notices, Wakes& wakes) {
  host::Header& h = seg_->header;
  Process& p = seg_->processes[proc];
  std::int64_t freed = std::clamp<std::int64_t>(p.held, 0, capacity_);
  for (std::uint32_t i = 0; i < kMaxWaiters; ++i) {
    Entry& e = seg_->entries[i];
    if (e.state == as_u32(EntryState::kFree) || e.process != proc) continue;
    if (e.state == as_u32(EntryState::kQueued)) {
      host::unlink(*seg_, h.queue, i);
      --h.waiting;
    } else if (e.state == as_u32(EntryState::kGranted)) {
      ++freed;
    }
    free_entry_locked(i);
  }
  p.pid = 0;
  p.start_time = 0;
  p.held = 0;
  p.waiting = 0;
  p.decided = {kNone, kNone};
  h.in_use = std::max<std::int64_t>(0, h.in_use - freed);
  fill_locked(to_ns(Clock::now()), notices, wakes);
}

bool HostPool::try_grant(bool& measure) noexcept {
  std::lock_guard lock(mu_);
  try {
    ensure_registered_locked();
  } catch (...) {
    return false;  // enqueue() will throw the error
  }
  Locked locked(*this);
  host::Header& h = seg_->header;
  if (h.in_use >= limit() || h.waiting > 0) return false;
  ++h.in_use;
  h.peak_in_use = std::max(h.peak_in_use, h.in_use);
  ++me().held;
  note_grant_locked(0.0);
  // Every hold is timed: the clock read is small next to the shared lock.
  measure = kStatistics || algorithm_.adaptive();
  return true;
}

Outcome HostPool::enqueue(WaiterNode& node, NoticeList& notices) {
  const auto now = Clock::now();
  const std::int64_t now_ns = to_ns(now);
  std::lock_guard lock(mu_);
  ensure_registered_locked();
  Locked locked(*this);
  host::Header& h = seg_->header;
  if (h.in_use < limit() && h.waiting == 0) {
    ++h.in_use;
    h.peak_in_use = std::max(h.peak_in_use, h.in_use);
    ++me().held;
    node.granted_at_ = {};  // granted at once: the hold starts now
    node.measure_ = kStatistics || algorithm_.adaptive();
    node.state_ = NodeState::kGranted;
    node.outcome_ = Outcome::kGranted;
    note_grant_locked(0.0);
    return Outcome::kGranted;
  }
  shed_locked(now_ns, notices, locked.wakes);
  const auto reject = [&] {
    note_rejection_locked(Outcome::kQueueFull);
    node.state_ = NodeState::kRejected;
    node.outcome_ = Outcome::kQueueFull;
    return Outcome::kQueueFull;
  };
  if (max_waiting_ >= 0 && h.waiting >= max_waiting_) {
    const bool newest_first =
        discipline_ == QueueDiscipline::kLifo ||
        (discipline_ == QueueDiscipline::kAdaptive && standing_locked(now_ns));
    if (!newest_first || h.waiting == 0 || h.queue.head >= kMaxWaiters) return reject();
    decide_locked(h.queue.head, Outcome::kQueueFull, now_ns, notices, locked.wakes);
  }
  const std::uint32_t i = allocate_entry_locked();
  if (i == kNone) return reject();  // the waiter table is full
  Entry& e = seg_->entries[i];
  e.process = me_;
  e.incarnation = incarnation_;
  e.ticket = h.next_ticket++;
  e.enqueued_ns = now_ns;
  e.decided_ns = 0;
  e.outcome = static_cast<std::uint32_t>(Outcome::kPending);
  e.state = as_u32(EntryState::kQueued);
  host::push_back(*seg_, h.queue, i);
  ++h.waiting;
  ++me().waiting;
  nodes_[i] = &node;
  node.host_entry_ = i;
  node.enqueued_at_ = now;
  node.state_ = NodeState::kQueued;
  node.outcome_ = Outcome::kPending;
  return Outcome::kPending;
}

NodeState HostPool::abandon(WaiterNode& node, Outcome reason) {
  std::lock_guard lock(mu_);
  if (node.state_ != NodeState::kQueued) return node.state_;  // told already
  const std::uint32_t i = node.host_entry_;
  const auto lost = [&] {
    // The entry is gone (the table was rebuilt from a corrupt state, or this
    // is a wait inherited across fork): the node simply stops waiting.
    node.state_ = NodeState::kRejected;
    node.outcome_ = reason;
    note_rejection_locked(reason);
    return NodeState::kQueued;
  };
  if (generation_ != g_generation.load(std::memory_order_relaxed) || i >= kMaxWaiters ||
      nodes_[i] != &node) {
    return lost();
  }
  Locked locked(*this);
  Entry& e = seg_->entries[i];
  if (!mine(e)) {
    nodes_[i] = nullptr;
    return lost();
  }
  NoticeList unused;  // settling our own entry notifies nobody
  if (e.state == as_u32(EntryState::kQueued)) {
    host::Header& h = seg_->header;
    host::unlink(*seg_, h.queue, i);
    --h.waiting;
    --me().waiting;
    nodes_[i] = nullptr;
    free_entry_locked(i);
    node.state_ = NodeState::kRejected;
    node.outcome_ = reason;
    note_rejection_locked(reason);
    return NodeState::kQueued;
  }
  if (e.state == as_u32(EntryState::kGranted) || e.state == as_u32(EntryState::kRejected)) {
    // Decided by another process, not yet taken by our background thread:
    // take it here, so the thread never tells this node.
    host::unlink(*seg_, me().decided, i);
    settle_own_locked(i, unused, locked.wakes);
    return node.state_;
  }
  nodes_[i] = nullptr;
  return lost();
}

void HostPool::revert_grant(NoticeList& notices) {
  const std::int64_t now_ns = to_ns(Clock::now());
  std::lock_guard lock(mu_);
  if constexpr (kStatistics) {
    --stats_.acquired_total;
    --stats_.wait_seconds.counts[0];
    --stats_.wait_seconds.count;
  }
  Locked locked(*this);
  if (me().held <= 0) return;
  --me().held;
  hand_over_locked(now_ns, notices, locked.wakes);
}

void HostPool::count_rejection(Outcome reason) {
  std::lock_guard lock(mu_);
  note_rejection_locked(reason);
}

void HostPool::release(bool measured, Clock::time_point granted_at, Clock::time_point now,
                       Completion completion, NoticeList& notices) {
  if (!measured) now = Clock::now();
  std::lock_guard lock(mu_);
  if constexpr (kStatistics) {
    if (measured) {
      stats_.hold_seconds.observe(std::chrono::duration<double>(now - granted_at).count());
    }
  }
  // A permit inherited across fork: the slot is the parent's to give back.
  if (me_ == kNone || generation_ != g_generation.load(std::memory_order_relaxed)) return;
  Locked locked(*this);
  if (me().held <= 0) return;
  const std::int64_t in_flight = seg_->header.in_use;  // host-wide, this one included
  --me().held;
  const std::int64_t now_ns = to_ns(now);
  hand_over_locked(now_ns, notices, locked.wakes);
  if (algorithm_.adaptive() && measured && completion != Completion::kIgnored) {
    // Every process's samples feed the one algorithm, under the segment mutex.
    const std::int64_t wanted = algorithm_.update(
        seg_->header, LimitSample{.end = now,
                                  .service_time = now - granted_at,
                                  .in_flight = std::clamp<std::int64_t>(in_flight, 1, capacity_),
                                  .dropped = completion == Completion::kDropped});
    if (wanted != limit()) {
      put_limit_locked(wanted, now_ns, notices, locked.wakes);
    }
  }
}

std::int64_t HostPool::limit() const noexcept {
  // Read from shared memory: bounds-checked like every other value.
  return std::clamp<std::int64_t>(seg_->header.limit.load(std::memory_order_relaxed), 1,
                                  capacity_);
}

void HostPool::set_limit(std::int64_t limit) {
  const Clock::time_point now = Clock::now();
  const std::int64_t now_ns = to_ns(now);
  NoticeList notices;  // fired after every lock is released
  {
    std::lock_guard lock(mu_);
    // Registered (again, in a forked child) so that the grants decided here
    // tell this process's waiters, not the parent's.
    ensure_registered_locked();
    Locked locked(*this);
    // The shared algorithm moves on from `limit` (under the segment mutex,
    // like every update).
    if (algorithm_.adaptive()) algorithm_.set_limit(seg_->header, limit, now);
    put_limit_locked(limit, now_ns, notices, locked.wakes);
  }
  notices.fire();
}

std::int64_t HostPool::in_use() {
  SegmentLock lock(*seg_);
  return seg_->header.in_use;
}

std::int64_t HostPool::waiting() {
  SegmentLock lock(*seg_);
  return seg_->header.waiting;
}

ResourceStatistics HostPool::statistics() {
  std::lock_guard lock(mu_);
  ResourceStatistics s = stats_;
  SegmentLock shared(*seg_);
  s.in_use = seg_->header.in_use;
  s.waiting = seg_->header.waiting;
  s.peak_in_use = seg_->header.peak_in_use;
  s.limit = limit();
  return s;
}

// --- background thread ---------------------------------------------------------

void HostPool::wake(host::Segment* seg, const Wakes& wakes) noexcept {
  if (wakes.overflow) {
    // Every slot (pids are not read without the lock): waking a free slot's
    // word wakes nobody.
    for (std::uint32_t p = 0; p < kMaxProcesses; ++p) host::wake_process(*seg, p);
    return;
  }
  for (std::uint32_t k = 0; k < wakes.count; ++k) host::wake_process(*seg, wakes.procs[k]);
}

void HostPool::deliver() {
  NoticeList notices;  // fired after every lock is released
  {
    std::lock_guard lock(mu_);
    if (me_ == kNone) return;
    Locked locked(*this);
    host::List& decided = me().decided;
    for (std::uint32_t steps = 0; steps < kMaxWaiters && decided.head != kNone; ++steps) {
      const std::uint32_t i = decided.head;
      if (i >= kMaxWaiters || !mine(seg_->entries[i])) {
        seg_->header.needs_rebuild = 1;
        break;
      }
      host::unlink(*seg_, decided, i);
      if (WaiterNode* node = settle_own_locked(i, notices, locked.wakes)) {
        node->completing_.store(true, std::memory_order_relaxed);  // published by mu_
        notices.push(node);
      }
    }
  }
  notices.fire();
}

void HostPool::sweep() {
  struct Registered {
    std::uint32_t slot;
    pid_t pid;
    std::uint64_t start_time;
    std::uint64_t incarnation;
  };
  std::vector<Registered> dead;
  {
    std::vector<Registered> registered;
    {
      SegmentLock lock(*seg_);
      for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
        const Process& q = seg_->processes[p];
        if (q.pid != 0) registered.push_back({p, q.pid, q.start_time, q.incarnation});
      }
    }
    // /proc is read without any lock; the identity is checked again below.
    for (const Registered& r : registered) {
      if (host::is_dead(r.pid, r.start_time)) dead.push_back(r);
    }
  }
  if (dead.empty()) return;
  NoticeList notices;
  {
    std::lock_guard lock(mu_);
    Locked locked(*this);
    for (const Registered& r : dead) {
      const Process& q = seg_->processes[r.slot];
      if (q.pid == r.pid && q.start_time == r.start_time && q.incarnation == r.incarnation) {
        reclaim_locked(r.slot, notices, locked.wakes);
      }
    }
  }
  notices.fire();
}

void HostPool::run(std::uint32_t slot) {
  std::atomic<std::uint32_t>& word = seg_->processes[slot].futex;
  auto last_sweep = Clock::now();
  for (;;) {
    const std::uint32_t seen = word.load(std::memory_order_acquire);
    deliver();
    // A wake-up arriving after `seen` was read makes the wait return at once.
    const timespec timeout{0, std::chrono::nanoseconds(kSweepInterval).count()};
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT, seen, &timeout,
              nullptr, 0);
    const auto now = Clock::now();
    if (now - last_sweep >= kSweepInterval) {
      sweep();
      last_sweep = now;
    }
  }
}

// --- test hooks ------------------------------------------------------------------

void HostPool::hold_lock_forever() {
  // Deliberately never unlocked: the test kills this process next.
  ::pthread_mutex_lock(&seg_->header.mutex);
}

void HostPool::forge_process(pid_t pid, std::uint64_t start_time, std::int64_t held) {
  std::lock_guard lock(mu_);
  Locked locked(*this);
  host::Header& h = seg_->header;
  if (h.in_use + held > capacity_) throw std::logic_error("forge_process: not enough free slots");
  for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
    Process& q = seg_->processes[p];
    if (q.pid != 0) continue;
    q.start_time = start_time;
    q.incarnation = h.next_incarnation++;
    q.held = held;
    q.waiting = 0;
    q.decided = {kNone, kNone};
    q.pid = pid;
    h.in_use += held;
    return;
  }
  throw std::logic_error("forge_process: process table full");
}

void HostPool::sweep_now() { sweep(); }

void HostPool::die_mid_update() {
  // As a process killed in the middle of an algorithm update: the lock is
  // held, the uncommitted copy half written (here: garbage), the commit not
  // done. Deliberately never unlocked: the test kills this process next.
  ::pthread_mutex_lock(&seg_->header.mutex);
  host::Header& h = seg_->header;
  auto& next = h.algorithm[(h.algorithm_current & 1) ^ 1];
  std::memset(static_cast<void*>(&next), 0xff, sizeof next);
}

}  // namespace concurrency_limiter::detail

namespace concurrency_limiter {
namespace {

std::shared_ptr<detail::HostPool> pool_of(const Resource& r) {
  auto pool = detail::HostPool::find(r.name());
  if (!pool || r.scope() != Scope::kHost) {
    throw std::invalid_argument("resource '" + r.name() + "' is not host-scoped");
  }
  return pool;
}

}  // namespace

namespace testing {

void hold_host_lock_forever(const Resource& resource) { pool_of(resource)->hold_lock_forever(); }

void forge_host_process(const Resource& resource, pid_t pid, std::uint64_t start_time,
                        std::int64_t held) {
  pool_of(resource)->forge_process(pid, start_time, held);
}

void sweep_host_processes(const Resource& resource) { pool_of(resource)->sweep_now(); }

void die_in_host_limit_update(const Resource& resource) { pool_of(resource)->die_mid_update(); }

}  // namespace testing
}  // namespace concurrency_limiter
