#include "internal/host_pool.h"
#include "internal/test_hooks.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <limits>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <optional>
#include <stdexcept>
#include <system_error>
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

// Test hook: the next background threads fail to start.
std::atomic<bool> g_fail_thread_start{false};

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
// How long requests are refused at once after the shared state could not be
// reached, unless the background thread reaches it sooner.
// The background thread keeps it open while it cannot reach the lock (each
// of its tries takes up to a second) and closes it as soon as it can.
constexpr auto kUnavailableFor = std::chrono::milliseconds(3000);

constexpr bool kStatistics = CL_STATISTICS != 0;

// The waiter that arrived first, over every class (kNone when none).
std::uint32_t oldest_waiter(const Segment& s) {
  std::uint32_t oldest = kNone;
  for (const host::List& q : s.header.queues) {
    if (q.head >= kMaxWaiters) continue;
    if (oldest == kNone || s.entries[q.head].ticket < s.entries[oldest].ticket) oldest = q.head;
  }
  return oldest;
}

// Slots of class `c` (its index) counted in (`delta` > 0) or out of the
// header's per-class counts (kCritical's is the rest of in_use).
void count_class(host::Header& h, std::size_t c, std::int64_t delta) {
  if (c >= kPriorityCount || c == priority_index(Priority::kCritical)) return;
  h.class_in_use[c] = std::max<std::int64_t>(0, h.class_in_use[c] + delta);
}

// Counts one slot of class `c` out of process `p`'s per-class counts (the
// caller takes it off `held`); returns the class it was counted out of:
// `c`, or another the process holds when its counts do not show a slot of
// `c` (a slot whose class the counts lost counts as kCritical).
std::size_t count_out_of(Process& p, std::size_t c) {
  const std::size_t critical = priority_index(Priority::kCritical);
  if (c < kPriorityCount && c != critical && p.class_held[c] > 0) {
    --p.class_held[c];
    return c;
  }
  std::int64_t others = 0;
  for (std::size_t k = 0; k < kPriorityCount; ++k) {
    if (k != critical) others += std::max<std::int64_t>(p.class_held[k], 0);
  }
  if (p.held > others) return critical;
  for (std::size_t k = 0; k < kPriorityCount; ++k) {
    if (k != critical && p.class_held[k] > 0) {
      --p.class_held[k];
      return k;
    }
  }
  return critical;
}

void count_into(Process& p, std::size_t c) {
  if (c < kPriorityCount && c != priority_index(Priority::kCritical)) ++p.class_held[c];
}

host::Config config_of(const ResourceOptions& o, const LimitAlgorithm* algorithm) {
  host::Config config{
      .capacity = o.capacity,
      .max_waiting = o.max_waiting ? *o.max_waiting : -1,
      .queue = static_cast<std::uint32_t>(o.queue),
      .reserved = 0,
      .target_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(o.adaptive_target).count(),
      .interval_ns =
          std::chrono::duration_cast<std::chrono::nanoseconds>(o.adaptive_interval).count(),
      .limit = host::limit_config_of(algorithm),
      .reserve = {}};
  for (std::size_t c = 0; c < kPriorityCount; ++c) config.reserve[c] = o.reserve[c];
  return config;
}

// "/proc/self/fd/N" without allocating (it is built in a fork child).
void self_fd_path(int fd, char (&out)[32]) {
  static constexpr char kPrefix[] = "/proc/self/fd/";
  std::memcpy(out, kPrefix, sizeof kPrefix - 1);
  char digits[12];
  int n = 0;
  unsigned v = static_cast<unsigned>(fd);
  do {
    digits[n++] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v != 0);
  std::size_t at = sizeof kPrefix - 1;
  while (n > 0) out[at++] = digits[--n];
  out[at] = '\0';
}

}  // namespace

std::shared_ptr<HostPool> HostPool::get(const ResourceOptions& o, const LimitAlgorithm* algorithm,
                                         std::string& note, bool& warning) {
  host::check_name(o.name);
  const host::Config config = config_of(o, algorithm);
  note.clear();
  warning = false;
  std::lock_guard lock(registry_mu());
  static std::once_flag fork_handlers;
  std::call_once(fork_handlers, [] {
    ::pthread_atfork(&HostPool::before_fork, &HostPool::after_fork_parent,
                     &HostPool::after_fork_child);
  });
  auto it = registry().find(o.name);
  if (it != registry().end()) {
    // Opened before in this process. Another configuration: the newest
    // wins here as across processes.
    HostPool& pool = *it->second;
    NoticeList notices;
    {
      std::lock_guard pool_lock(pool.mu_);
      if (o.early_reject) pool.early_reject_ = true;
      if (!host::is_linked(o.name, pool.inode_)) pool.detached_.store(true);
      pool.attach_locked(notices);
      Locked locked(pool);
      if (!host::same_reserve(pool.cfg(), config)) {
        // This process uses it: reserves are refused, never replaced, while
        // a process using them lives (open_segment()).
        throw std::invalid_argument(host::reserve_mismatch(o.name, pool.cfg(), config));
      }
      if (!host::same_config(pool.cfg(), config)) {
        const std::string theirs = host::describe(pool.cfg());
        host::install_config(*pool.seg(), config);
        pool.fill_locked(to_ns(Clock::now()), notices, locked.wakes);
        note = "host resource '" + o.name + "': configuration " + theirs + " replaced by " +
               host::describe(config) +
               " (newest wins: the processes using it follow the new one; slots they hold "
               "stay held)";
        warning = true;
      }
    }
    notices.fire();
    return it->second;
  }
  host::Opened opened = host::open_segment(o.name, config, host::Adopt::kNewestWins);
  note = opened.note;
  warning = opened.others_alive;
  auto pool = std::make_shared<HostPool>(o.name, config, opened);
  NoticeList notices;
  {
    std::lock_guard pool_lock(pool->mu_);
    pool->early_reject_ = o.early_reject;
    try {
      // Registers (`status` lists this process from now on) and starts the
      // background thread.
      pool->attach_locked(notices);
    } catch (const host::Unavailable& e) {
      if (e.corrupt()) {
        pool->close_locked();
        throw;
      }
      // A process stopped inside the lock: this one starts all the same;
      // its background thread registers it once the lock is back, and its
      // requests are refused as unavailable until then.
      pool->mark_unavailable();
      pool->start_thread_locked();
    } catch (...) {
      pool->close_locked();  // nothing registered, no thread: nothing uses it
      throw;
    }
  }
  // In the registry before anything else can fail: its thread uses it.
  registry().emplace(o.name, pool);
  if (!note.empty()) {
    // A configuration that raised the limit grants waiters at once (or the
    // next sweep of any process does).
    try {
      std::lock_guard pool_lock(pool->mu_);
      Locked locked(*pool);
      pool->fill_locked(to_ns(Clock::now()), notices, locked.wakes);
    } catch (const host::Unavailable&) {
    }
  }
  notices.fire();
  return pool;
}

void HostPool::close_locked() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  ::munmap(seg(), sizeof(Segment));
}

std::shared_ptr<HostPool> HostPool::find(const std::string& name) {
  std::lock_guard lock(registry_mu());
  auto it = registry().find(name);
  return it == registry().end() ? nullptr : it->second;
}

HostPool::HostPool(std::string name, const host::Config& config, host::Opened opened)
    : name_(std::move(name)), config_(config), seg_(opened.segment), fd_(opened.fd),
      inode_(opened.inode) {
  stats_.name = name_;
}

void HostPool::fail_thread_start(bool fail) noexcept {
  g_fail_thread_start.store(fail, std::memory_order_relaxed);
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
  // The child registers as a new process at its first operation (it has no
  // background thread yet; starting one here is not safe in every runtime).
  // Its liveness lock must be its own: the inherited descriptor shares the
  // parent's open file description, and with it the parent's lock, so it
  // is replaced by a new description of the same file.
  g_generation.fetch_add(1, std::memory_order_relaxed);
  for (auto& [name, pool] : registry()) {
    if (pool->fd_ >= 0) {
      char path[32];
      self_fd_path(pool->fd_, path);
      const int fresh = ::open(path, O_RDWR | O_CLOEXEC);
      if (fresh >= 0) {
        ::dup3(fresh, pool->fd_, O_CLOEXEC);
        ::close(fresh);
      } else {
        ::close(pool->fd_);
        pool->fd_ = -1;  // opened again at registration
      }
    }
    // What the parent had not applied yet is the parent's (clear() frees
    // nothing).
    pool->pending_releases_ = {};
    pool->orphans_.clear();
    pool->mu_.unlock();
  }
  registry_mu().unlock();
}

// --- attachment --------------------------------------------------------------

bool HostPool::must_attach_locked() const noexcept {
  return me_ == kNone || generation_ != g_generation.load(std::memory_order_relaxed) ||
         detached_.load(std::memory_order_relaxed) ||
         seg()->header.retired.load(std::memory_order_relaxed) != 0;
}

void HostPool::attach_locked(NoticeList& notices) {
  if (!must_attach_locked()) return;
  if (detached_.load(std::memory_order_relaxed) ||
      seg()->header.retired.load(std::memory_order_relaxed) != 0) {
    reattach_locked(notices);
  }
  if (me_ == kNone || generation_ != g_generation.load(std::memory_order_relaxed)) {
    register_locked();
  }
}

void HostPool::reattach_locked(NoticeList& notices) {
  // An operator removed the segment (reset --force) while this process used
  // it. Its waiters there are refused; the slots it holds are carried over
  // (counted in the new segment until released, as if granted there, so
  // every release has one place to go); it attaches to the segment now in
  // place, or creates one with the configuration that was in force.
  host::Config config = config_;
  try {
    SegmentLock lock(*seg(), std::chrono::milliseconds(100));
    config = seg()->header.config;
    host::SharedAlgorithm check(config);  // in range, or this process's own
  } catch (const std::exception&) {
    config = config_;
  }
  nodes_count_ = 0;
  for (std::uint32_t i = 0; i < nodes_.size(); ++i) {
    if (WaiterNode* node = nodes_[i]) {
      nodes_[i] = nullptr;
      node->state_ = NodeState::kRejected;
      node->outcome_ = Outcome::kUnavailable;
      note_rejection_locked(Outcome::kUnavailable, node->priority_);
      node->completing_.store(true, std::memory_order_relaxed);  // published by mu_
      notices.push(node);
    }
  }
  // Closing the old file first drops this process's liveness lock there:
  // anyone still using the old segment reclaims what this process held in
  // it, and the process itself never looks alive to its own probe.
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  host::Opened opened = host::open_segment(name_, config, host::Adopt::kTheirs);
  carried_ = held_local_;
  carried_class_ = held_class_local_;
  held_local_ = 0;
  held_class_local_ = {};
  pending_releases_ = {};  // their slots stay counted: carried over instead
  orphans_.clear();
  fd_ = opened.fd;
  inode_ = opened.inode;
  seg_.store(opened.segment, std::memory_order_release);
  detached_.store(false, std::memory_order_relaxed);
  unavailable_until_ns_.store(0, std::memory_order_relaxed);
  algorithm_.reset();
  algorithm_generation_ = 0;
  me_ = kNone;
}

void HostPool::register_locked() {
  const std::uint64_t generation = g_generation.load(std::memory_order_relaxed);
  if (fd_ < 0) {
    // A fork child whose descriptor could not be renewed: open the file
    // again, if it is still the same one.
    const int fd = ::open(host::segment_path(name_).c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    struct stat st {};
    if (fd < 0 || ::fstat(fd, &st) != 0 || st.st_ino != inode_) {
      const int err = errno;
      if (fd >= 0) ::close(fd);
      if (fd >= 0) {
        detached_.store(true, std::memory_order_relaxed);
        throw std::runtime_error("host resource '" + name_ +
                                 "': its segment was replaced; the next call attaches to it");
      }
      throw std::runtime_error("host resource '" + name_ + "': cannot open " +
                               host::segment_path(name_) + ": " + std::strerror(err));
    }
    fd_ = fd;
  }
  const pid_t pid = ::getpid();
  const std::uint64_t pid_ns = host::pid_namespace();
  std::uint32_t slot = kNone;
  NoticeList notices;  // nothing of ours can be queued yet
  {
    Locked locked(*this);
    const auto take_free_slot = [&] {
      for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
        // A free slot whose lock is still held belongs to a process that
        // registered no further: left alone.
        if (seg()->processes[p].pid == 0 && host::lock_slot(fd_, p)) return p;
      }
      return kNone;
    };
    slot = take_free_slot();
    if (slot == kNone) {
      // Full: reclaim dead processes now rather than at the next sweep.
      for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
        if (seg()->processes[p].pid != 0 && host::liveness(fd_, p) == host::Liveness::kDead) {
          reclaim_locked(p, notices, locked.wakes);
        }
      }
      slot = take_free_slot();
    }
    if (slot == kNone) {
      throw std::runtime_error("host resource '" + name_ + "': more than " +
                               std::to_string(kMaxProcesses) +
                               " processes use it at the same time");
    }
    Process& p = seg()->processes[slot];
    host::Header& h = seg()->header;
    p.pid_namespace = pid_ns;
    p.incarnation = h.next_incarnation++;
    // Slots carried over from a removed segment count here until released
    // (even above the capacity: nothing new is granted until they are),
    // each in its own class.
    p.held = carried_;
    for (std::size_t c = 0; c < kPriorityCount; ++c) {
      p.class_held[c] = 0;
      if (c == priority_index(Priority::kCritical)) continue;
      p.class_held[c] = std::clamp<std::int64_t>(carried_class_[c], 0, carried_);
      count_class(h, c, p.class_held[c]);
    }
    h.in_use += carried_;
    h.held_bound = std::max(h.held_bound, h.in_use);
    p.waiting = 0;
    p.decided = {kNone, kNone};
    p.pid = pid;
    incarnation_ = p.incarnation;
  }
  me_ = slot;
  // A new process (or a fork child): the holds it may give back are those
  // granted from now on (see release()).
  if (generation_ != generation) registered_at_ = Clock::now();
  generation_ = generation;
  held_local_ = carried_;
  held_class_local_ = carried_class_;
  carried_ = 0;
  carried_class_ = {};
  nodes_.assign(kMaxWaiters, nullptr);
  nodes_count_ = 0;
  try {
    start_thread_locked();
  } catch (const std::system_error& e) {
    // Without its thread no grant decided by another process would reach
    // this process: registered it must not stay.
    try {
      Locked locked(*this);
      reclaim_locked(slot, notices, locked.wakes);
    } catch (const host::Unavailable&) {
      // Unlocking its byte below is enough: a sweeper reclaims the slot.
    }
    host::unlock_slot(fd_, slot);
    me_ = kNone;
    throw std::runtime_error("host resource '" + name_ +
                             "': cannot start its background thread (" + e.what() +
                             "); this process is not registered");
  }
}

void HostPool::start_thread_locked() {
  const std::uint64_t generation = g_generation.load(std::memory_order_relaxed);
  if (thread_generation_ == generation) return;  // it follows the new slot
  if (g_fail_thread_start.load(std::memory_order_relaxed)) {
    throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again));
  }
  std::thread([this] { run(); }).detach();
  thread_generation_ = generation;
}

bool HostPool::unavailable_now() const noexcept {
  const std::int64_t until = unavailable_until_ns_.load(std::memory_order_relaxed);
  return until != 0 && to_ns(Clock::now()) < until;
}

void HostPool::mark_unavailable() noexcept {
  unavailable_until_ns_.store(to_ns(Clock::now() + kUnavailableFor), std::memory_order_relaxed);
}

host::SharedAlgorithm* HostPool::algorithm_locked() {
  const host::Header& h = seg()->header;
  if (algorithm_generation_ != h.config_generation) {
    algorithm_.reset();
    try {
      algorithm_.emplace(h.config);
    } catch (const std::invalid_argument&) {
      // Out of range: checked when the segment was opened, so garbage
      // written since; the limit stays where it is.
    }
    algorithm_generation_ = h.config_generation;
  }
  return algorithm_ && algorithm_->adaptive() ? &*algorithm_ : nullptr;
}

std::int64_t HostPool::capacity() const noexcept {
  return std::clamp<std::int64_t>(seg()->header.capacity_now.load(std::memory_order_relaxed), 1,
                                  Resource::kMaxCapacity);
}

std::int64_t HostPool::max_waiting() const noexcept {
  return std::max<std::int64_t>(seg()->header.max_waiting_now.load(std::memory_order_relaxed), -1);
}

QueueDiscipline HostPool::queue() const noexcept {
  const std::uint32_t q = seg()->header.queue_now.load(std::memory_order_relaxed);
  return q <= 2 ? static_cast<QueueDiscipline>(q) : QueueDiscipline::kFifo;
}

// --- engine operations -------------------------------------------------------

bool HostPool::mine(const Entry& e) const {
  return e.process == me_ && e.incarnation == incarnation_;
}

std::uint32_t HostPool::allocate_entry_locked() {
  host::Header& h = seg()->header;
  const std::uint32_t i = h.free_head;
  if (i == kNone) return kNone;
  if (i >= kMaxWaiters || seg()->entries[i].state != as_u32(EntryState::kFree)) {
    h.needs_rebuild = 1;
    return kNone;
  }
  h.free_head = seg()->entries[i].next;
  return i;
}

void HostPool::free_entry_locked(std::uint32_t i) {
  Entry& e = seg()->entries[i];
  e.state = as_u32(EntryState::kFree);
  e.process = kNone;
  e.prev = kNone;
  e.next = seg()->header.free_head;
  seg()->header.free_head = i;
}

bool HostPool::timed_locked() {
  return kStatistics || early_reject_ || algorithm_locked() != nullptr;
}

double HostPool::waiters_ahead_locked(std::size_t own, bool newest_first, double own_weight,
                                      double enough) {
  const host::Header& h = seg()->header;
  const int lowest = host::lowest_waiting_class(*seg());
  if (lowest < 0) return 0.0;
  // Every waiter is of a class above: no walk. So is every waiter of the
  // classes counted when its own class weighs as much as those above.
  if (static_cast<std::size_t>(lowest) > own ||
      (own_weight == 1.0 && !newest_first && static_cast<std::size_t>(lowest) == own)) {
    return static_cast<double>(h.waiting);
  }
  // The segment keeps no count per class: walk the queues counted, from
  // the highest class, no further than `enough`.
  double ahead = 0.0;
  std::uint32_t steps = 0;
  for (std::size_t c = kPriorityCount; c-- > own + (newest_first ? 1 : 0);) {
    const double weight = c == own ? own_weight : 1.0;
    for (std::uint32_t i = h.queues[c].head; i != kNone; i = seg()->entries[i].next) {
      if (i >= kMaxWaiters || ++steps > kMaxWaiters) {  // a bad link: counted so far
        seg()->header.needs_rebuild = 1;
        return ahead;
      }
      ahead += weight;
      if (ahead >= enough) return ahead;
    }
  }
  return ahead;
}

void HostPool::note_grant_locked(double waited, Priority priority) {
  if constexpr (kStatistics) {
    ++stats_.acquired_total;
    ++stats_.classes[priority_index(priority)].acquired_total;
    stats_.wait_seconds.observe(waited);
  }
}

void HostPool::note_rejection_locked(Outcome reason, Priority priority) {
  if constexpr (kStatistics) {
    ++stats_.rejected_total[rejection_index(reason)];
    ++stats_.classes[priority_index(priority)].rejected_total[rejection_index(reason)];
  }
}

void HostPool::decide_locked(std::uint32_t i, Outcome outcome, std::int64_t now_ns,
                             NoticeList& notices, Wakes& wakes) {
  host::Header& h = seg()->header;
  Entry& e = seg()->entries[i];
  host::unlink(*seg(), host::queue_of(*seg(), e), i);
  --h.waiting;
  if (e.process < kMaxProcesses) --seg()->processes[e.process].waiting;
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
  host::push_back(*seg(), seg()->processes[e.process].decided, i);
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
  Entry& e = seg()->entries[i];
  const bool granted = e.state == as_u32(EntryState::kGranted);
  Outcome outcome = static_cast<Outcome>(e.outcome);
  if (!granted && !is_rejection(outcome)) outcome = Outcome::kCancelled;
  const std::int64_t decided_ns = e.decided_ns;
  const std::size_t cls = host::class_of(e);
  WaiterNode* node = nodes_[i];
  nodes_[i] = nullptr;
  if (node) --nodes_count_;
  free_entry_locked(i);
  if (granted) {
    ++me().held;  // from the granted entry to this process
    count_into(me(), cls);
    ++held_local_;
    ++held_class_local_[cls];
  }
  if (!node) {
    // No local waiter (cannot happen unless the table was rebuilt): a
    // granted slot goes to the next waiter.
    if (granted) {
      const std::size_t freed = count_out_of(me(), cls);  // before held drops
      --me().held;
      --held_local_;
      --held_class_local_[cls];
      hand_over_locked(freed, decided_ns, notices, wakes);
    }
    return nullptr;
  }
  if (granted) {
    node->state_ = NodeState::kGranted;
    node->outcome_ = Outcome::kGranted;
    node->granted_at_ = from_ns(decided_ns);
    node->measure_ = timed_locked();
    note_grant_locked(
        std::max(0.0, std::chrono::duration<double>(node->granted_at_ - node->enqueued_at_)
                          .count()),
        node->priority_);
  } else {
    node->state_ = NodeState::kRejected;
    node->outcome_ = outcome;
    note_rejection_locked(outcome, node->priority_);
  }
  return node;
}

bool HostPool::standing_locked(std::int64_t now_ns) {
  host::Header& h = seg()->header;
  const std::uint32_t head = oldest_waiter(*seg());
  if (head >= kMaxWaiters || h.waiting <= limit() ||
      now_ns - seg()->entries[head].enqueued_ns <= cfg().target_ns) {
    h.above_target_since_ns = -1;
    return false;
  }
  if (h.above_target_since_ns < 0) {
    h.above_target_since_ns = seg()->entries[head].enqueued_ns + cfg().target_ns;
  }
  return now_ns - h.above_target_since_ns >= cfg().interval_ns;
}

void HostPool::shed_locked(std::int64_t now_ns, NoticeList& notices, Wakes& wakes,
                           std::size_t below) {
  if (cfg().queue != static_cast<std::uint32_t>(QueueDiscipline::kAdaptive) ||
      !standing_locked(now_ns)) {
    return;
  }
  for (std::uint32_t steps = 0; steps < kMaxWaiters; ++steps) {
    // Served newest first, the oldest waiters would be served last: told
    // now instead of at their timeout. A class is shed only once every
    // lower one is: the oldest waiter of the lowest class waiting, none of a
    // class above a newcomer's (served before it).
    const int lowest = host::lowest_waiting_class(*seg());
    if (lowest < 0 || static_cast<std::size_t>(lowest) > below) return;
    const std::uint32_t head = seg()->header.queues[static_cast<std::size_t>(lowest)].head;
    if (head >= kMaxWaiters ||
        now_ns - seg()->entries[head].enqueued_ns <= cfg().target_ns + cfg().interval_ns) {
      return;
    }
    decide_locked(head, Outcome::kShed, now_ns, notices, wakes);
  }
}

std::uint32_t HostPool::pick_locked(std::int64_t now_ns, NoticeList& notices,
                                    Wakes& wakes) {
  host::Header& h = seg()->header;
  bool from_head = true;
  switch (static_cast<QueueDiscipline>(cfg().queue)) {
    case QueueDiscipline::kFifo:
      break;
    case QueueDiscipline::kLifo:
      from_head = false;
      break;
    case QueueDiscipline::kAdaptive:
      shed_locked(now_ns, notices, wakes);
      from_head = !standing_locked(now_ns);
      break;
    default:  // out of range: garbage written since the segment was opened
      break;
  }
  // The highest class with waiters (with reserves: if it may take a slot;
  // a lower class may not when a higher one may not), then the
  // discipline's end of its queue.
  const int top = host::has_reserve(cfg()) ? host::highest_class_may_take(h, limit())
                                           : host::highest_waiting_class(*seg());
  if (top < 0) return kNone;
  const host::List& q = h.queues[static_cast<std::size_t>(top)];
  const std::uint32_t i = from_head ? q.head : q.tail;
  if (i == kNone) return kNone;
  if (i >= kMaxWaiters || seg()->entries[i].state != as_u32(EntryState::kQueued)) {
    h.needs_rebuild = 1;
    return kNone;
  }
  return i;
}

void HostPool::hand_over_locked(std::size_t freed, std::int64_t now_ns, NoticeList& notices,
                                 Wakes& wakes) {
  // The slot is given back, then granted as a free slot would be: to the
  // highest class waiting (that may take it, with reserves). In use above
  // the limit (it was lowered), nobody is granted: the slot is retired.
  host::Header& h = seg()->header;
  count_class(h, freed, -1);
  h.in_use = std::max<std::int64_t>(0, h.in_use - 1);
  fill_locked(now_ns, notices, wakes);
}

void HostPool::fill_locked(std::int64_t now_ns, NoticeList& notices, Wakes& wakes) {
  host::Header& h = seg()->header;
  while (h.in_use < limit()) {
    const std::uint32_t next = pick_locked(now_ns, notices, wakes);
    if (next == kNone) return;
    ++h.in_use;
    count_class(h, host::class_of(seg()->entries[next]), +1);
    h.peak_in_use = std::max(h.peak_in_use, h.in_use);
    decide_locked(next, Outcome::kGranted, now_ns, notices, wakes);
  }
}

void HostPool::put_limit_locked(std::int64_t limit, std::int64_t now_ns, NoticeList& notices,
                                Wakes& wakes) {
  seg()->header.limit.store(limit, std::memory_order_relaxed);
  // Raised: the new slots go to waiters of every process at once. Lowered:
  // hand_over_locked() retires released slots until in_use <= limit.
  fill_locked(now_ns, notices, wakes);
}

void HostPool::reclaim_locked(std::uint32_t proc, NoticeList& notices, Wakes& wakes) {
  host::Header& h = seg()->header;
  Process& p = seg()->processes[proc];
  std::int64_t freed = std::clamp<std::int64_t>(p.held, 0, h.held_bound);
  // Each class gets its slots back (kCritical's: the rest of in_use).
  const std::array<std::int64_t, kPriorityCount> classes = host::held_by_class(p, h.held_bound);
  for (std::size_t c = 0; c < kPriorityCount; ++c) {
    count_class(h, c, -classes[c]);  // no-op for kCritical
    p.class_held[c] = 0;
  }
  for (std::uint32_t i = 0; i < kMaxWaiters; ++i) {
    Entry& e = seg()->entries[i];
    if (e.state == as_u32(EntryState::kFree) || e.process != proc) continue;
    if (e.state == as_u32(EntryState::kQueued)) {
      host::unlink(*seg(), host::queue_of(*seg(), e), i);
      --h.waiting;
    } else if (e.state == as_u32(EntryState::kGranted)) {
      ++freed;
      count_class(h, host::class_of(e), -1);
    }
    free_entry_locked(i);
  }
  p.pid = 0;
  p.pid_namespace = 0;
  p.held = 0;
  p.waiting = 0;
  p.decided = {kNone, kNone};
  h.in_use = std::max<std::int64_t>(0, h.in_use - freed);
  fill_locked(to_ns(Clock::now()), notices, wakes);
}

void HostPool::take_entry_locked(std::uint32_t i, std::int64_t now_ns, NoticeList& notices,
                                 Wakes& wakes) {
  Entry& e = seg()->entries[i];
  if (mine(e) || e.process >= kMaxProcesses) {
    // This process's own waiter is told at once, and its entry freed.
    decide_locked(i, Outcome::kLowerPriority, now_ns, notices, wakes);
    if (e.state != as_u32(EntryState::kFree)) {  // out of range: dropped by the rebuild
      seg()->header.needs_rebuild = 1;
    }
    return;
  }
  // Another process's waiter: a decided entry would stay that process's
  // until its background thread takes it, so the entry is freed now
  // instead, and that thread, woken, finds its waiter's entry no longer its
  // own and tells it kLowerPriority (deliver(), tell_taken_locked()).
  host::Header& h = seg()->header;
  host::unlink(*seg(), host::queue_of(*seg(), e), i);
  --h.waiting;
  --seg()->processes[e.process].waiting;
  const std::uint32_t owner = e.process;
  free_entry_locked(i);
  if (wakes.overflow) return;
  for (std::uint32_t k = 0; k < wakes.count; ++k) {
    if (wakes.procs[k] == owner) return;
  }
  if (wakes.count == wakes.procs.size()) {
    wakes.overflow = true;
  } else {
    wakes.procs[wakes.count++] = owner;
  }
}

void HostPool::tell_taken_locked(std::uint32_t i, NoticeList& notices) {
  WaiterNode* node = nodes_[i];
  nodes_[i] = nullptr;
  --nodes_count_;
  node->state_ = NodeState::kRejected;
  node->outcome_ = Outcome::kLowerPriority;
  note_rejection_locked(Outcome::kLowerPriority, node->priority_);
  node->completing_.store(true, std::memory_order_relaxed);  // published by mu_
  notices.push(node);
}

Outcome HostPool::refuse_locked(WaiterNode& node, Outcome reason) {
  note_rejection_locked(reason, node.priority_);
  node.state_ = NodeState::kRejected;
  node.outcome_ = reason;
  return reason;
}

bool HostPool::queue_full_for(Priority priority) noexcept {
  if (unavailable_now()) return false;
  try {
    SegmentLock lock(*seg());
    const host::Header& h = seg()->header;
    const std::size_t own = priority_index(priority);
    const int lowest = host::lowest_waiting_class(*seg());
    // As enqueue(): no entry left in the waiter table turns away a request
    // with no waiter of a lower class to push out.
    if (h.free_head == kNone) return lowest < 0 || own <= static_cast<std::size_t>(lowest);
    const std::int64_t max_waiting = cfg().max_waiting;
    if (max_waiting < 0 || h.waiting < max_waiting) return false;
    // Full, and no waiter to push out for this request: none of a lower
    // class or, newest first, of its own (as Resource::refuse_try()).
    if (h.waiting > 0 && lowest >= 0 && own > static_cast<std::size_t>(lowest)) return false;
    const auto discipline = static_cast<QueueDiscipline>(cfg().queue);
    const bool newest_first =
        discipline == QueueDiscipline::kLifo ||
        (discipline == QueueDiscipline::kAdaptive && standing_locked(to_ns(Clock::now())));
    return !newest_first || (h.waiting > 0 && h.queues[own].head == kNone);
  } catch (...) {
    return false;
  }
}

bool HostPool::may_grant_at_once_locked(std::size_t c) const {
  const host::Header& h = seg()->header;
  if (!host::has_reserve(h.config)) return h.in_use < limit() && h.waiting == 0;
  // Reserves: nobody waits who may take the slot. A waiter of a class below
  // `c` waits for slots kept from it (it would have been granted otherwise):
  // one of `c` or above is served first.
  for (std::size_t k = c; k < kPriorityCount; ++k) {
    if (h.queues[k].head != kNone) return false;
  }
  return host::class_may_take(h, c, limit());
}

void HostPool::grant_at_once_locked(Priority priority) {
  host::Header& h = seg()->header;
  ++h.in_use;
  count_class(h, priority_index(priority), +1);
  h.peak_in_use = std::max(h.peak_in_use, h.in_use);
  ++me().held;
  count_into(me(), priority_index(priority));
  ++held_local_;
  ++held_class_local_[priority_index(priority)];
  note_grant_locked(0.0, priority);
}

bool HostPool::try_grant(bool& measure, Priority priority) noexcept {
  std::lock_guard lock(mu_);
  // Anything unusual (registration, a reset, an unreachable lock) is left
  // to enqueue(), which can report it.
  if (must_attach_locked() || unavailable_now()) return false;
  try {
    Locked locked(*this);
    if (!may_grant_at_once_locked(priority_index(priority))) return false;
    grant_at_once_locked(priority);
    // Every hold is timed: the clock read is small next to the shared lock.
    measure = timed_locked();
    return true;
  } catch (...) {
    mark_unavailable();
    return false;
  }
}

Outcome HostPool::enqueue(WaiterNode& node, NoticeList& notices, bool early_reject) {
  const auto now = Clock::now();
  const std::int64_t now_ns = to_ns(now);
  std::lock_guard lock(mu_);
  try {
    if (detached_.load(std::memory_order_relaxed) ||
        seg()->header.retired.load(std::memory_order_relaxed) != 0) {
      attach_locked(notices);  // after a reset: a new segment, the breaker closed
    }
    if (unavailable_now()) return refuse_locked(node, Outcome::kUnavailable);
    attach_locked(notices);  // registers (again after fork)
    Locked locked(*this);
    host::Header& h = seg()->header;
    if (may_grant_at_once_locked(priority_index(node.priority_))) {
      grant_at_once_locked(node.priority_);
      node.granted_at_ = {};  // granted at once: the hold starts now
      node.measure_ = timed_locked();
      node.state_ = NodeState::kGranted;
      node.outcome_ = Outcome::kGranted;
      return Outcome::kGranted;
    }
    shed_locked(now_ns, notices, locked.wakes, priority_index(node.priority_));
    const std::optional<double> service = host::service_estimate(h);
    if (early_reject && service && *service > 0.0 && node.deadline_ != Clock::time_point::max()) {
      // As a process-scoped resource predicts, from the waiters ahead in the
      // grant order and the estimate of service time, both machine-wide.
      const auto discipline = static_cast<QueueDiscipline>(cfg().queue);
      const bool newest_first =
          discipline == QueueDiscipline::kLifo ||
          (discipline == QueueDiscipline::kAdaptive && standing_locked(now_ns));
      const double patience =
          node.deadline_ <= now ? 0.0 : std::chrono::duration<double>(node.deadline_ - now).count();
      // The waiters of the classes above are served by every slot; those of
      // its own class by the slots the class may use: the limit less the
      // reserves above it (scaled as class_may_take() does). So each of its
      // own class counts limit / those slots turns.
      const std::size_t cls = priority_index(node.priority_);
      const std::int64_t lim = limit();
      double own_weight = 1.0;
      if (host::has_reserve(cfg())) {
        // Each brought into range, as class_may_take() does: the segment's
        // values are not trusted.
        const std::int64_t capacity = std::max<std::int64_t>(cfg().capacity, 1);
        std::int64_t reserved_above = 0;
        for (std::size_t c = cls + 1; c < kPriorityCount; ++c) {
          reserved_above += std::clamp<std::int64_t>(cfg().reserve[c], 0, capacity);
        }
        const std::int64_t slots = std::max<std::int64_t>(
            1, lim - scaled_reserve(std::min(reserved_above, capacity), lim, capacity));
        own_weight = static_cast<double>(lim) / static_cast<double>(slots);
      }
      // Predicted to time out from `enough` turns ahead on (a turn: one
      // slot's worth of the limit).
      const double turns = patience * static_cast<double>(lim) / *service;
      const double enough = std::min(turns, static_cast<double>(kMaxWaiters) * own_weight) +
                            1e-9;
      if (static_cast<double>(h.waiting) * own_weight >= enough) {
        const double ahead = waiters_ahead_locked(cls, newest_first, own_weight, enough);
        if (ahead > 0.0 && ahead / static_cast<double>(lim) * *service > patience) {
          // Refused: what it is told to wait counts the whole queue ahead
          // (the walk above stopped once the wait exceeded its time left).
          const double all =
              ahead >= enough ? waiters_ahead_locked(cls, newest_first, own_weight,
                                                     std::numeric_limits<double>::infinity())
                              : ahead;
          node.predicted_wait_ = all / static_cast<double>(lim) * *service;
          return refuse_locked(node, Outcome::kPredictedTimeout);
        }
      }
    }
    const std::size_t own = priority_index(node.priority_);
    if (h.free_head == kNone) {
      // No entry left in the waiter table: the newest waiter of the lowest
      // class below the newcomer gives its entry up, in whichever process
      // (see take_entry_locked()); without one, the newcomer is turned away.
      const int below = host::lowest_waiting_class(*seg());
      if (below < 0 || own <= static_cast<std::size_t>(below)) {
        return refuse_locked(node, Outcome::kQueueFull);
      }
      const std::uint32_t victim = h.queues[static_cast<std::size_t>(below)].tail;
      if (victim >= kMaxWaiters || seg()->entries[victim].state != as_u32(EntryState::kQueued)) {
        h.needs_rebuild = 1;
        return refuse_locked(node, Outcome::kQueueFull);
      }
      take_entry_locked(victim, now_ns, notices, locked.wakes);
    }
    const std::int64_t max_waiting = cfg().max_waiting;
    const int lowest = host::lowest_waiting_class(*seg());
    if (max_waiting >= 0 && h.waiting >= max_waiting && lowest >= 0 &&
        own > static_cast<std::size_t>(lowest)) {
      // A class is shed only once every lower one is: the newest waiter of
      // the lowest class, in whichever process, makes room for a higher one.
      const std::uint32_t victim = h.queues[static_cast<std::size_t>(lowest)].tail;
      if (victim >= kMaxWaiters) {
        h.needs_rebuild = 1;
        return refuse_locked(node, Outcome::kQueueFull);
      }
      decide_locked(victim, Outcome::kLowerPriority, now_ns, notices, locked.wakes);
    } else if (max_waiting >= 0 && h.waiting >= max_waiting) {
      // FIFO order (also the adaptive queue's, until a queue stands) turns
      // the newcomer away; newest-first order pushes the oldest waiter of
      // its class out.
      const auto discipline = static_cast<QueueDiscipline>(cfg().queue);
      const bool newest_first =
          discipline == QueueDiscipline::kLifo ||
          (discipline == QueueDiscipline::kAdaptive && standing_locked(now_ns));
      const std::uint32_t oldest = h.queues[own].head;
      if (!newest_first || h.waiting == 0 || oldest >= kMaxWaiters) {
        return refuse_locked(node, Outcome::kQueueFull);
      }
      decide_locked(oldest, Outcome::kQueueFull, now_ns, notices, locked.wakes);
    }
    const std::uint32_t i = allocate_entry_locked();
    // The waiter table is full.
    if (i == kNone) return refuse_locked(node, Outcome::kQueueFull);
    Entry& e = seg()->entries[i];
    e.process = me_;
    e.incarnation = incarnation_;
    e.ticket = h.next_ticket++;
    e.enqueued_ns = now_ns;
    e.decided_ns = 0;
    e.outcome = static_cast<std::uint32_t>(Outcome::kPending);
    e.priority = static_cast<std::uint32_t>(own);
    e.state = as_u32(EntryState::kQueued);
    host::push_back(*seg(), h.queues[own], i);
    ++h.waiting;
    ++me().waiting;
    if (nodes_[i] != nullptr) {
      // A waiter of this process whose entry another process took (and
      // has given back since): told now, before its place is reused.
      tell_taken_locked(i, notices);
    }
    nodes_[i] = &node;
    ++nodes_count_;
    node.host_entry_ = i;
    node.enqueued_at_ = now;
    node.state_ = NodeState::kQueued;
    node.outcome_ = Outcome::kPending;
    return Outcome::kPending;
  } catch (const host::Unavailable&) {
    mark_unavailable();
    return refuse_locked(node, Outcome::kUnavailable);
  } catch (const std::exception&) {
    // Attaching or registering failed (no descriptor left, no thread): this
    // request is refused, never thrown at (enqueue() may run inside a
    // notice, where an exception would end the process).
    return refuse_locked(node, Outcome::kUnavailable);
  }
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
    note_rejection_locked(reason, node.priority_);
    return NodeState::kQueued;
  };
  if (generation_ != g_generation.load(std::memory_order_relaxed) || i >= kMaxWaiters ||
      nodes_[i] != &node) {
    return lost();
  }
  try {
    Locked locked(*this);
    Entry& e = seg()->entries[i];
    if (!mine(e)) {
      // Pushed out for a higher class by another process (take_entry_locked()),
      // not told yet: that is why it stopped waiting, as deliver() would have
      // told it (an entry dropped by a rebuild from a damaged state is told
      // the same there).
      reason = Outcome::kLowerPriority;
      nodes_[i] = nullptr;
      --nodes_count_;
      return lost();
    }
    NoticeList unused;  // settling our own entry notifies nobody
    if (e.state == as_u32(EntryState::kQueued)) {
      host::Header& h = seg()->header;
      host::unlink(*seg(), host::queue_of(*seg(), e), i);
      --h.waiting;
      --me().waiting;
      nodes_[i] = nullptr;
      --nodes_count_;
      free_entry_locked(i);
      return lost();
    }
    if (e.state == as_u32(EntryState::kGranted) || e.state == as_u32(EntryState::kRejected)) {
      // Decided by another process, not yet taken by our background thread:
      // take it here, so the thread never tells this node.
      host::unlink(*seg(), me().decided, i);
      settle_own_locked(i, unused, locked.wakes);
      return node.state_;
    }
    nodes_[i] = nullptr;
    --nodes_count_;
    return lost();
  } catch (const host::Unavailable&) {
    // The shared queue cannot be reached now: the node stops waiting, and
    // the background thread takes its entry out of the queue (or passes on
    // a slot granted meanwhile) once the lock is back.
    mark_unavailable();
    nodes_[i] = nullptr;
    --nodes_count_;
    orphans_.push_back(i);
    return lost();
  }
}

void HostPool::revert_grant(NoticeList& notices, Priority priority) {
  const std::int64_t now_ns = to_ns(Clock::now());
  std::lock_guard lock(mu_);
  if constexpr (kStatistics) {
    --stats_.acquired_total;
    --stats_.classes[priority_index(priority)].acquired_total;
    --stats_.wait_seconds.counts[0];
    --stats_.wait_seconds.count;
  }
  if (me_ == kNone || generation_ != g_generation.load(std::memory_order_relaxed)) return;
  if (held_local_ <= 0) return;
  --held_local_;
  if (held_class_local_[priority_index(priority)] > 0) --held_class_local_[priority_index(priority)];
  try {
    Locked locked(*this);
    if (me().held <= 0) return;
    const std::size_t freed = count_out_of(me(), priority_index(priority));
    --me().held;
    hand_over_locked(freed, now_ns, notices, locked.wakes);
  } catch (const host::Unavailable&) {
    mark_unavailable();
    ++pending_releases_[priority_index(priority)];
  }
}

void HostPool::count_rejection(Outcome reason, Priority priority) {
  std::lock_guard lock(mu_);
  note_rejection_locked(reason, priority);
}

void HostPool::release(bool measured, Clock::time_point granted_at, Clock::time_point now,
                       Completion completion, NoticeList& notices, Priority priority) {
  if (!measured) now = Clock::now();
  std::lock_guard lock(mu_);
  if constexpr (kStatistics) {
    if (measured) {
      stats_.hold_seconds.observe(std::chrono::duration<double>(now - granted_at).count());
    }
  }
  // A permit inherited across fork: the slot is the parent's to give back,
  // also once the child has registered and holds slots of its own (a timed
  // hold granted before this process registered is one it inherited).
  if (me_ == kNone || generation_ != g_generation.load(std::memory_order_relaxed)) return;
  if (measured && granted_at < registered_at_) return;
  if (held_local_ <= 0) return;
  --held_local_;
  if (held_class_local_[priority_index(priority)] > 0) --held_class_local_[priority_index(priority)];
  try {
    Locked locked(*this);
    if (me().held <= 0) return;
    const std::int64_t in_flight = seg()->header.in_use;  // host-wide, this one included
    const std::size_t freed = count_out_of(me(), priority_index(priority));
    --me().held;
    // Every process's timed holds make the one estimate of service time.
    if (measured && completion != Completion::kIgnored) {
      host::add_service(seg()->header, std::chrono::duration<double>(now - granted_at).count());
    }
    // The sample's time is read under the lock, so that samples reach the
    // shared window in time order whichever process gives them.
    const Clock::time_point end = Clock::now();
    const std::int64_t end_ns = to_ns(end);
    hand_over_locked(freed, end_ns, notices, locked.wakes);
    host::SharedAlgorithm* algorithm = algorithm_locked();
    if (algorithm && measured && completion != Completion::kIgnored) {
      // Every process's samples feed the one algorithm, under the segment mutex.
      const std::int64_t wanted = algorithm->update(
          seg()->header,
          LimitSample{.end = end,
                      .service_time = now - granted_at,
                      .in_flight = std::clamp<std::int64_t>(in_flight, 1, capacity()),
                      .dropped = completion == Completion::kDropped});
      if (wanted != limit()) put_limit_locked(wanted, end_ns, notices, locked.wakes);
    }
  } catch (const host::Unavailable&) {
    // Given back by the background thread once the lock is back.
    mark_unavailable();
    ++pending_releases_[priority_index(priority)];
  }
}

std::int64_t HostPool::limit() const noexcept {
  // Read from shared memory: bounds-checked like every other value.
  return std::clamp<std::int64_t>(seg()->header.limit.load(std::memory_order_relaxed), 1,
                                  capacity());
}

void HostPool::set_limit(std::int64_t limit) {
  const Clock::time_point now = Clock::now();
  const std::int64_t now_ns = to_ns(now);
  NoticeList notices;  // fired after every lock is released
  {
    std::lock_guard lock(mu_);
    // Registered (again, in a forked child) so that the grants decided here
    // tell this process's waiters, not the parent's.
    attach_locked(notices);
    Locked locked(*this);
    if (limit > capacity()) {
      throw std::invalid_argument("limit of resource '" + name_ +
                                  "' must be an integer in [1, capacity=" +
                                  std::to_string(capacity()) + "], got " +
                                  std::to_string(limit));
    }
    // The shared algorithm moves on from `limit` (under the segment mutex,
    // like every update).
    if (host::SharedAlgorithm* algorithm = algorithm_locked()) {
      algorithm->set_limit(seg()->header, limit, now);
    }
    put_limit_locked(limit, now_ns, notices, locked.wakes);
  }
  notices.fire();
}

std::int64_t HostPool::in_use() noexcept {
  if (unavailable_now()) return in_use_snapshot_.load(std::memory_order_relaxed);
  try {
    SegmentLock lock(*seg());
    return seg()->header.in_use;
  } catch (const host::Unavailable&) {
    return in_use_snapshot_.load(std::memory_order_relaxed);
  }
}

std::int64_t HostPool::waiting() noexcept {
  if (unavailable_now()) return waiting_snapshot_.load(std::memory_order_relaxed);
  try {
    SegmentLock lock(*seg());
    return seg()->header.waiting;
  } catch (const host::Unavailable&) {
    return waiting_snapshot_.load(std::memory_order_relaxed);
  }
}

ResourceStatistics HostPool::statistics() {
  std::lock_guard lock(mu_);
  ResourceStatistics s = stats_;
  s.capacity = capacity();
  const std::int64_t max_waiting = this->max_waiting();
  s.max_waiting = max_waiting < 0 ? std::nullopt : std::optional<std::int64_t>(max_waiting);
  s.queue = queue();
  s.limit = limit();
  s.in_use = in_use_snapshot_.load(std::memory_order_relaxed);
  s.waiting = waiting_snapshot_.load(std::memory_order_relaxed);
  // Per class: in_use and waiting host-wide (as the totals), the counters
  // this process's (stats_.classes, as the totals). Unreachable shared
  // state: the last totals known, under the default class.
  const std::size_t critical = priority_index(Priority::kCritical);
  s.classes[critical].in_use = s.in_use;
  s.classes[critical].waiting = s.waiting;
  if (!unavailable_now()) {  // snapshots: never wait on a stuck lock
    try {
      SegmentLock shared(*seg());
      const host::Header& h = seg()->header;
      s.in_use = h.in_use;
      s.waiting = h.waiting;
      s.peak_in_use = h.peak_in_use;
      const std::array<std::int64_t, kPriorityCount> held = host::class_in_use(h);
      for (std::size_t c = 0; c < kPriorityCount; ++c) {
        s.classes[c].in_use = held[c];
        // Counted along its queue (at most the waiter table: statistics are
        // not on any request's path).
        std::int64_t n = 0;
        for (std::uint32_t i = h.queues[c].head; i < kMaxWaiters && n < kMaxWaiters;
             i = seg()->entries[i].next) {
          ++n;
        }
        s.classes[c].waiting = n;
      }
      s.service_seconds = host::service_estimate(h);
    } catch (const host::Unavailable&) {
    }
  }
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

void HostPool::catch_up_locked(NoticeList& notices, Wakes& wakes) {
  // Releases and abandoned waits that could not reach the lock when made.
  const std::int64_t now_ns = to_ns(Clock::now());
  for (std::size_t c = 0; c < kPriorityCount; ++c) {
    for (; pending_releases_[c] > 0; --pending_releases_[c]) {
      if (me().held <= 0) {
        pending_releases_ = {};
        break;
      }
      const std::size_t freed = count_out_of(me(), c);
      --me().held;
      hand_over_locked(freed, now_ns, notices, wakes);
    }
  }
  for (const std::uint32_t i : orphans_) {
    if (i >= kMaxWaiters) continue;
    const Entry& e = seg()->entries[i];
    if (!mine(e) || e.state != as_u32(EntryState::kQueued)) {
      continue;  // decided meanwhile: deliver() passes a grant on (no node)
    }
    host::Header& h = seg()->header;
    host::unlink(*seg(), host::queue_of(*seg(), e), i);
    --h.waiting;
    --me().waiting;
    free_entry_locked(i);
  }
  orphans_.clear();
}

bool HostPool::probe_lock() noexcept {
  // Waits for the segment's lock without holding mu_, so that a lock a
  // stopped process keeps stalls no request behind this thread.
  try {
    SegmentLock lock(*seg());
    return true;
  } catch (const host::Unavailable&) {
    mark_unavailable();
    return false;
  }
}

void HostPool::deliver() {
  if (!probe_lock()) return;
  NoticeList notices;  // fired after every lock is released
  {
    std::lock_guard lock(mu_);
    try {
      // Registration left for later (the lock was out of reach at open),
      // or a new segment after a reset.
      if (must_attach_locked()) attach_locked(notices);
      Locked locked(*this);
      unavailable_until_ns_.store(0, std::memory_order_relaxed);  // reached: close the breaker
      catch_up_locked(notices, locked.wakes);
      host::List& decided = me().decided;
      for (std::uint32_t steps = 0; steps < kMaxWaiters && decided.head != kNone; ++steps) {
        const std::uint32_t i = decided.head;
        if (i >= kMaxWaiters || !mine(seg()->entries[i])) {
          seg()->header.needs_rebuild = 1;
          break;
        }
        host::unlink(*seg(), decided, i);
        if (WaiterNode* node = settle_own_locked(i, notices, locked.wakes)) {
          node->completing_.store(true, std::memory_order_relaxed);  // published by mu_
          notices.push(node);
        }
      }
      // Every decided entry taken, so each waiter left should have a
      // queued entry: more waiters than that means entries were taken by
      // higher-class newcomers of other processes (take_entry_locked()).
      if (nodes_count_ > me().waiting) {
        for (std::uint32_t i = 0; i < kMaxWaiters; ++i) {
          if (nodes_[i] != nullptr && !mine(seg()->entries[i])) tell_taken_locked(i, notices);
        }
      }
    } catch (const host::Unavailable&) {
      mark_unavailable();
    } catch (const std::exception&) {
      // Cannot register now (no descriptor, say): tried again next round.
    }
  }
  notices.fire();
}

void HostPool::sweep() {
  if (!probe_lock()) return;
  NoticeList notices;
  {
    std::lock_guard lock(mu_);
    if (me_ == kNone || generation_ != g_generation.load(std::memory_order_relaxed)) return;
    if (!host::is_linked(name_, inode_)) detached_.store(true, std::memory_order_relaxed);
    try {
      Locked locked(*this);
      // Only proof of death counts: no lock on the process's byte. A check
      // that fails (no descriptor left, say) proves nothing.
      for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
        if (p == me_ || seg()->processes[p].pid == 0) continue;
        if (host::liveness(fd_, p) == host::Liveness::kDead) {
          reclaim_locked(p, notices, locked.wakes);
        }
      }
      // Free slots with waiters (a process that raised the capacity died
      // before granting them, say): granted now.
      fill_locked(to_ns(Clock::now()), notices, locked.wakes);
    } catch (const host::Unavailable&) {
      mark_unavailable();
    }
  }
  notices.fire();
}

void HostPool::run() {
  auto last_sweep = Clock::now();
  for (;;) {
    std::atomic<std::uint32_t>* word = nullptr;
    std::uint32_t seen = 0;
    {
      std::lock_guard lock(mu_);
      if (me_ != kNone) {
        word = &seg()->processes[me_].futex;
        seen = word->load(std::memory_order_acquire);
      }
    }
    deliver();
    const timespec timeout{0, std::chrono::nanoseconds(kSweepInterval).count()};
    if (word) {
      // A wake-up arriving after `seen` was read makes the wait return at once.
      ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAIT, seen, &timeout,
                nullptr, 0);
    } else {
      std::this_thread::sleep_for(kSweepInterval);  // between two attachments
    }
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
  ::pthread_mutex_lock(&seg()->header.mutex);
}

void HostPool::forge_process(pid_t pid, std::int64_t held) {
  std::lock_guard lock(mu_);
  Locked locked(*this);
  host::Header& h = seg()->header;
  if (h.in_use + held > capacity()) {
    throw std::logic_error("forge_process: not enough free slots");
  }
  for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
    Process& q = seg()->processes[p];
    if (q.pid != 0 || host::liveness(fd_, p) != host::Liveness::kDead) continue;
    q.pid_namespace = 0;
    q.incarnation = h.next_incarnation++;
    q.held = held;
    for (std::int64_t& n : q.class_held) n = 0;
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
  ::pthread_mutex_lock(&seg()->header.mutex);
  host::Header& h = seg()->header;
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

void forge_host_process(const Resource& resource, pid_t pid, std::int64_t held) {
  pool_of(resource)->forge_process(pid, held);
}

void sweep_host_processes(const Resource& resource) { pool_of(resource)->sweep_now(); }

void die_in_host_limit_update(const Resource& resource) { pool_of(resource)->die_mid_update(); }

void fail_host_thread_start(bool fail) { detail::HostPool::fail_thread_start(fail); }

}  // namespace testing
}  // namespace concurrency_limiter
