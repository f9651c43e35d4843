// The shared-memory segment of a host-scoped resource: its fixed layout, and
// how it is created, opened, validated and locked.
//
// One file per resource name in a private per-user directory on tmpfs
// (/dev/shm/fcl-host.<uid>, mode 0700, or $FCL_HOST_DIR), mode 0600. A
// segment is built under no name (O_TMPFILE) and linked into place complete,
// so a half-made segment is never visible. Layout: a Header, then
// kMaxProcesses Process slots, then kMaxWaiters Entries. Every field below
// the header's mutex is guarded by that mutex (process-shared, robust,
// taken with a bound: see SegmentLock). Fields are split in two kinds:
//   primary  the facts: which process slots are in use (pid, incarnation),
//            how many slots each holds, and each waiter entry's state,
//            owner, ticket and priority class;
//   derived  counters and links kept for speed (in_use, waiting, the
//            per-class queues, the per-process lists, the free list). rebuild() recomputes
//            them from the primary fields, after a process died inside the
//            lock or when a value read from the segment is out of range.
// A grant is "held" either by the process (Process::held, once its owner has
// taken it) or by a granted Entry (decided, its owner not yet told); so
//   in_use == sum(Process::held) + count(granted entries).
// The limit in force (Header::limit, 1..capacity) bounds new grants; after
// it was lowered (or the capacity was, by a newer configuration), in_use may
// exceed it until enough slots are released.
//
// Liveness: a registered process holds an open-file-description lock
// (F_OFD_SETLK) on one byte of the file, at kLockBase + its slot, for as
// long as it lives; the kernel drops it when the process dies, whatever its
// PID namespace, however it dies. A slot whose byte nobody locks belongs to
// a dead process (proof, not a guess); a failed check proves nothing. PIDs
// are kept for people (status), never for deciding death.
//
// Configuration: the newest process to open a name with another
// configuration wins (Header::config, config_generation): every process
// follows it from its next operation. Lowering revokes no held slot.
//
// Adaptive limits: the state of the resource's one limit algorithm (a
// built-in one, see limit.h) lives in the header, double-buffered: an update
// reads the committed copy, writes the other, then flips
// Header::algorithm_current. A process that dies mid-update leaves the
// committed copy intact (the sample is lost); every copy read is brought
// into range before use (restore()).
#pragma once

#include <pthread.h>
#include <sys/types.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "concurrency_limiter/limit.h"
#include "concurrency_limiter/priority.h"
#include "concurrency_limiter/service_estimate.h"

namespace concurrency_limiter::detail::host {

inline constexpr std::uint64_t kMagic = 0x3130545348434c46ull;  // "FLCHST01"
// 2: limit in force, limit algorithm; 3: cut state; 4: liveness locks,
// configuration that the newest process sets, private directory;
// 5: Gradient2Limit and VegasLimit (their options and state); 6: their
// descent remembers a knee below its start, Gradient2Limit its last cut;
// 7: Outcome::kDeadline, so an entry's stored kPending has another value;
// 8: Outcome::kPredictedTimeout, the same again; 9: Outcome::kLowerPriority,
// the same again; 10: the limit algorithms' windows and descent steps keep
// how much latencies vary; 11: priority classes (each entry's class, one
// queue per class); 12: reserves, slots held per class, the service
// estimate shared by the processes.
inline constexpr std::uint32_t kVersion = 12;
// Processes that may use one host resource at the same time.
inline constexpr std::uint32_t kMaxProcesses = 256;
// Requests that may wait for one host resource at the same time, over all
// processes; beyond it a request is rejected with kQueueFull.
inline constexpr std::uint32_t kMaxWaiters = 4096;
inline constexpr std::uint32_t kNone = 0xffffffffu;
inline constexpr std::size_t kMaxNameLength = 64;
// Liveness locks: process slot p is alive while some open file description
// locks byte kLockBase + p of the segment's file. Past any segment's end
// (locks need no data there), and the same in every layout version, so
// that a process of one version can tell whether one of another is alive.
inline constexpr off_t kLockBase = off_t{1} << 40;

enum class EntryState : std::uint32_t { kFree = 0, kQueued, kGranted, kRejected };

// Which limit algorithm moves the limit (built-in ones only).
enum class LimitKind : std::uint32_t { kNone = 0, kFixed, kAimd, kGradient, kGradient2, kVegas };

struct LimitConfig {
  std::uint32_t kind;  // LimitKind
  std::uint32_t reserved;
  std::int64_t fixed;  // kFixed: FixedLimit::value()
  AimdOptions aimd;    // kAimd
  GradientOptions gradient;  // kGradient
  Gradient2Options gradient2;  // kGradient2
  VegasOptions vegas;          // kVegas
};

struct Config {
  std::int64_t capacity;
  std::int64_t max_waiting;  // -1: unbounded
  std::uint32_t queue;       // QueueDiscipline
  std::uint32_t reserved;
  std::int64_t target_ns;    // adaptive_target
  std::int64_t interval_ns;  // adaptive_interval
  LimitConfig limit;
  // ResourceOptions::reserve, indexed by priority_index(). Every process
  // must pass the same (see open_segment()).
  std::int64_t reserve[kPriorityCount];
};

// The state of the resource's limit algorithm (that of `Config::limit.kind`).
struct AlgorithmState {
  AimdLimit::State aimd;
  GradientLimit::State gradient;
  Gradient2Limit::State gradient2;
  VegasLimit::State vegas;
};

struct List {
  std::uint32_t head;  // oldest; kNone when empty
  std::uint32_t tail;  // newest
};

struct Process {
  std::int32_t pid;  // 0: the slot is free (primary); for people only
  std::uint32_t reserved;
  std::uint64_t pid_namespace;  // inode of its /proc/self/ns/pid, for people
  std::uint64_t incarnation;    // new for each registration (primary)
  std::int64_t held;          // slots the process holds (primary)
  // Of `held`, those of each class, indexed by priority_index() (primary);
  // kCritical's entry is unused: its slots are `held` less the others'.
  std::int64_t class_held[kPriorityCount];
  // Bumped (then FUTEX_WAKE) whenever an entry of this process is decided by
  // another process; the owner's thread waits on it. Shared, not private.
  std::atomic<std::uint32_t> futex;
  std::uint32_t reserved2;
  List decided;         // its granted/rejected entries, not yet taken (derived)
  std::int64_t waiting;  // its queued entries (derived)
};

struct Entry {
  std::uint32_t state;    // EntryState (primary)
  std::uint32_t process;  // owner's index in the process table (primary)
  std::uint64_t incarnation;  // owner's incarnation (primary)
  std::uint64_t ticket;       // arrival order (primary)
  std::int64_t enqueued_ns;   // steady clock (CLOCK_MONOTONIC), machine-wide
  std::int64_t decided_ns;    // when granted or rejected
  std::uint32_t outcome;      // Outcome, once rejected
  std::uint32_t prev;         // links in its class's queue, a decided list
  std::uint32_t next;         // or the free list (derived)
  // Its Priority (primary); a value out of range is read as kCritical (and
  // set so by the rebuild).
  std::uint32_t priority;
};

struct Header {
  std::atomic<std::uint64_t> magic;  // kMagic, stored last by the creator
  std::uint32_t version;
  std::uint32_t header_size;
  std::uint64_t total_size;
  std::uint32_t max_processes;
  std::uint32_t max_waiters;
  std::uint32_t process_size;
  std::uint32_t entry_size;
  std::uint32_t mutex_size;
  std::uint32_t reserved;
  char name[kMaxNameLength + 8];
  // Set by an operator's reset, with or without the mutex: processes attach
  // to a new segment at their next operation.
  std::atomic<std::uint32_t> retired;
  std::uint32_t reserved2;
  // Snapshots of `config` (written under the mutex with it) for readers
  // without the lock: Resource::capacity(), max_waiting(), queue().
  std::atomic<std::int64_t> capacity_now;
  std::atomic<std::int64_t> max_waiting_now;
  std::atomic<std::uint32_t> queue_now;
  std::uint32_t reserved3;
  pthread_mutex_t mutex;  // process-shared, robust
  // Guarded by mutex:
  Config config;                     // the newest process's configuration
  std::uint64_t config_generation;   // bumped when `config` changes
  // Most slots one process may be recorded as holding: the largest capacity
  // this segment has had (held slots outlive a lowered capacity).
  std::int64_t held_bound;
  std::int64_t in_use;       // derived
  std::int64_t waiting;      // derived
  // Of in_use, the slots of each class (held by a process or a granted
  // entry), indexed by priority_index() (derived); kCritical's entry is
  // unused: its slots are in_use less the others'.
  std::int64_t class_in_use[kPriorityCount];
  // The moving estimate of service time, in seconds (ServiceTimeEstimate's
  // rule), of the timed holds of every process; meaningful only while
  // service_known is 1 (0: no hold yet). Read through service_estimate(),
  // which brings a damaged value into range.
  double service_seconds;
  std::uint32_t service_known;
  std::uint32_t reserved4;
  std::int64_t peak_in_use;
  std::uint64_t next_ticket;
  std::uint64_t next_incarnation;
  std::int64_t above_target_since_ns;  // adaptive: -1 when not above target
  std::uint64_t repairs;               // times the state was rebuilt
  // Waiters of each class, indexed by priority_index(), oldest first
  // (derived). A freed slot goes to the highest class with waiters.
  List queues[kPriorityCount];
  std::uint32_t free_head;             // free entries (derived)
  // Set when a link read from the segment was out of range (it is then
  // ignored): the unlocker rebuilds before releasing the mutex.
  std::uint32_t needs_rebuild;
  // Which of `algorithm` is committed (0 or 1; bit 0 is used).
  std::uint32_t algorithm_current;
  // Slots in force, 1..capacity. Written under the mutex; read without it
  // (relaxed) for Resource::limit(), a snapshot.
  std::atomic<std::int64_t> limit;
  AlgorithmState algorithm[2];
};

struct Segment {
  Header header;
  Process processes[kMaxProcesses];
  Entry entries[kMaxWaiters];
};

static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(std::atomic<std::int64_t>::is_always_lock_free);
static_assert(std::is_trivially_copyable_v<AlgorithmState>);
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);
static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));

// Throws std::invalid_argument unless `name` is 1 to 64 letters, digits,
// '_', '-' or '.', and not made of dots only.
void check_name(const std::string& name);
// This user's segment directory: $FCL_HOST_DIR, or /dev/shm/fcl-host.<uid>.
std::string segment_dir();
// The path of the segment of `name` (for messages and tests).
std::string segment_path(const std::string& name);
// Opens this user's segment directory (creating the default one, mode 0700)
// and returns its descriptor. Throws std::runtime_error saying what to fix
// when it is not a directory private to this user (another user created it
// first, a symbolic link, group- or world-writable), or cannot be opened.
// With `create` false and no directory yet, returns -1.
int open_segment_dir(bool create);

// Thrown when the segment's shared state cannot be reached in time (its
// mutex held too long by a process stopped or hung inside it) or at all
// (the mutex is corrupt). Requests are then refused with
// Outcome::kUnavailable; an operator's reset (--force) repairs a corrupt one.
class Unavailable : public std::runtime_error {
 public:
  Unavailable(const std::string& what, bool corrupt)
      : std::runtime_error(what), corrupt_(corrupt) {}
  // True when waiting longer would not help: the mutex itself is broken.
  bool corrupt() const noexcept { return corrupt_; }

 private:
  bool corrupt_;
};

// One opened segment: the mapping (never undone while a process may use it)
// and its file, kept open for the liveness locks.
struct Opened {
  Segment* segment = nullptr;
  int fd = -1;
  ino_t inode = 0;
  // What opening it changed, for the log: a configuration replaced (none of
  // its processes alive) or overridden (others alive: `others_alive`).
  std::string note;
  bool others_alive = false;
};

// How open_segment() treats an existing segment with another configuration.
enum class Adopt {
  kNewestWins,  // this process's configuration replaces it
  kTheirs,      // keep it (re-attaching after a reset)
};

// Maps the segment of `name`, creating it with `config` if there is none.
// An existing one with another configuration: see Adopt. A corrupt one, or
// one of another layout version, is replaced when no process holding a
// liveness lock uses it; otherwise std::runtime_error saying who uses it
// and how to remove it. Throws std::runtime_error if it is not this user's
// or cannot be created; Unavailable if its mutex cannot be taken.
Opened open_segment(const std::string& name, const Config& config, Adopt adopt);
// Maps an existing segment for an operator (status, reset): no
// configuration change, no registration. Throws std::runtime_error ("no
// host resource named ...") if there is none, or if it is not this user's.
// If it is corrupt or of another version, `segment` is null and `note` says
// what is wrong (`fd` is open all the same, for the liveness locks). The
// caller unmaps and closes.
Opened inspect_segment(const std::string& name);
// True while `name` in the directory is still the file with `inode` (not
// removed or replaced by an operator since it was opened). True as well
// when this cannot be checked (no descriptor left): only proof counts.
bool is_linked(const std::string& name, ino_t inode);

// Repairs and rebuilds the derived fields from the primary ones; requires
// the mutex. Also used when a value read from the segment is out of range.
// Allocates nothing (it runs while the mutex is held after EOWNERDEAD).
void rebuild(Segment& s) noexcept;

// Liveness (see the top of this file).
enum class Liveness { kAlive, kDead, kUnknown };
// Takes process slot `slot`'s liveness lock through `fd`, without waiting;
// false if another open file description holds it or it cannot be taken.
bool lock_slot(int fd, std::uint32_t slot) noexcept;
void unlock_slot(int fd, std::uint32_t slot) noexcept;
// Whether the process of `slot` is alive, as seen through `fd`: kDead only
// when no other open file description locks its byte (a lock taken through
// `fd` itself is not seen: never ask about your own slot). kUnknown when
// the check itself fails.
Liveness liveness(int fd, std::uint32_t slot) noexcept;
// Whether any open file description other than `fd`'s locks a liveness byte.
Liveness any_alive(int fd) noexcept;
// This process's PID namespace (inode of /proc/self/ns/pid), 0 if unknown.
std::uint64_t pid_namespace() noexcept;

// Puts `config` in force in `s`: the limit and the algorithm's state start
// anew, held slots stay held. Requires the mutex. Does not grant waiters
// (the caller does, if the limit rose).
void install_config(Segment& s, const Config& config);

std::string describe(const Config& c);
bool same_config(const Config& a, const Config& b);
// Reserves (Config::reserve): whether `a` and `b` have the same, and the
// message of std::invalid_argument when a process asks for other reserves
// than the live processes using `name` have (naming both). Unlike the rest
// of the configuration, reserves are refused, not replaced, when they
// differ: open_segment() throws std::invalid_argument with it while a
// process using the segment is alive (with none alive, the newest wins).
bool same_reserve(const Config& a, const Config& b);
std::string describe_reserve(const Config& c);
std::string reserve_mismatch(const std::string& name, const Config& theirs, const Config& ours);

// The LimitConfig of a resource's `algorithm` (null: none). Throws
// std::invalid_argument for an algorithm that is not a built-in one.
LimitConfig limit_config_of(const LimitAlgorithm* algorithm);

// One process's handle on the resource's shared limit algorithm: a local
// instance of the built-in algorithm of `Config::limit`, loaded from and
// stored back to the segment around each sample.
class SharedAlgorithm {
 public:
  // Throws std::invalid_argument if the configuration is out of range.
  explicit SharedAlgorithm(const Config& config);
  bool adaptive() const noexcept { return kind_ != LimitKind::kNone; }
  // The limit to start from; writes the initial state to `state`.
  std::int64_t start(AlgorithmState& state);
  // Feeds `sample` to the committed state of `h` and commits the new one;
  // returns the limit the algorithm puts in force (1..capacity). Requires
  // the mutex.
  std::int64_t update(Header& h, const LimitSample& sample) noexcept;
  // Resource::set_limit(): the committed state of `h` moves on from `limit`
  // (LimitAlgorithm::on_set_limit), committed like update(). Requires the
  // mutex.
  void set_limit(Header& h, std::int64_t limit, Clock::time_point now) noexcept;

 private:
  LimitKind kind_;
  std::int64_t capacity_;
  std::optional<FixedLimit> fixed_;
  std::optional<AimdLimit> aimd_;
  std::optional<GradientLimit> gradient_;
  std::optional<Gradient2Limit> gradient2_;
  std::optional<VegasLimit> vegas_;
};

// Intrusive lists of entries, through Entry::prev/next; require the mutex.
// A link out of range is treated as the end of the list and sets
// Header::needs_rebuild.
void push_back(Segment& s, List& list, std::uint32_t i);
void unlink(Segment& s, List& list, std::uint32_t i);
// The class index (0..kPriorityCount-1) of entry `e`: kCritical's for a
// value out of range.
inline std::size_t class_of(const Entry& e) noexcept {
  return e.priority < kPriorityCount ? e.priority : priority_index(Priority::kCritical);
}
// The queue of entry `e`'s class.
inline List& queue_of(Segment& s, const Entry& e) noexcept {
  return s.header.queues[class_of(e)];
}
// The highest class with waiters (its index), or -1 when nobody waits.
inline int highest_waiting_class(const Segment& s) noexcept {
  for (std::size_t c = kPriorityCount; c-- > 0;) {
    if (s.header.queues[c].head != kNone) return static_cast<int>(c);
  }
  return -1;
}
// The lowest class with waiters (its index), or -1 when nobody waits.
inline int lowest_waiting_class(const Segment& s) noexcept {
  for (std::size_t c = 0; c < kPriorityCount; ++c) {
    if (s.header.queues[c].head != kNone) return static_cast<int>(c);
  }
  return -1;
}

// The shared estimate of service time (Header::service_seconds), nullopt
// before the first hold or when the stored value is out of range (then
// add_service() starts it again). Requires the mutex.
inline std::optional<double> service_estimate(const Header& h) noexcept {
  const double v = h.service_seconds;
  if (h.service_known != 1 || !std::isfinite(v) || v < 0.0) return std::nullopt;
  return v;
}
// Adds one timed hold of `seconds` to the shared estimate, as
// ServiceTimeEstimate::add() does. Requires the mutex.
inline void add_service(Header& h, double seconds) noexcept {
  if (!(seconds >= 0.0) || !std::isfinite(seconds)) seconds = 0.0;
  const std::optional<double> v = service_estimate(h);
  h.service_seconds = v ? *v + ServiceTimeEstimate::kWeight * (seconds - *v) : seconds;
  h.service_known = 1;
}

// Reserves (Config::reserve): whether any class has one.
inline bool has_reserve(const Config& c) noexcept {
  for (const std::int64_t r : c.reserve) {
    if (r != 0) return true;
  }
  return false;
}
// The slots each class holds host-wide (index: priority_index()), from the
// header's counts brought into range; kCritical's is the rest of in_use.
// The slots process `p` holds in each class, its counts brought into
// range as the repair does: `held` into [0, bound], then each class but
// kCritical in turn (the lowest first) into what is left of it; kCritical
// holds the rest. So the classes always add up to the held slots.
inline std::array<std::int64_t, kPriorityCount> held_by_class(const Process& p,
                                                              std::int64_t bound) noexcept {
  std::array<std::int64_t, kPriorityCount> held{};
  const std::size_t critical = priority_index(Priority::kCritical);
  std::int64_t left = std::clamp<std::int64_t>(p.held, 0, std::max<std::int64_t>(bound, 0));
  for (std::size_t c = 0; c < kPriorityCount; ++c) {
    if (c == critical) continue;
    held[c] = std::clamp<std::int64_t>(p.class_held[c], 0, left);
    left -= held[c];
  }
  held[critical] = left;
  return held;
}
inline std::array<std::int64_t, kPriorityCount> class_in_use(const Header& h) noexcept {
  std::array<std::int64_t, kPriorityCount> held{};
  const std::size_t critical = priority_index(Priority::kCritical);
  std::int64_t others = 0;
  for (std::size_t c = 0; c < kPriorityCount; ++c) {
    if (c == critical) continue;
    held[c] = std::clamp<std::int64_t>(h.class_in_use[c], 0, std::max<std::int64_t>(h.in_use, 0));
    others += held[c];
  }
  held[critical] = std::max<std::int64_t>(0, h.in_use - others);
  return held;
}
// Whether class `c` (its index) may take one more slot under `limit`: a
// slot is free, and with reserves, for every class c' >= c the classes <= c'
// hold fewer than limit - (the reserves of the classes above c', scaled).
// As Resource::class_may_take_locked(). Requires the mutex.
inline bool class_may_take(const Header& h, std::size_t c, std::int64_t limit) noexcept {
  if (h.in_use >= limit) return false;
  if (!has_reserve(h.config)) return true;
  const std::int64_t capacity = std::max<std::int64_t>(h.config.capacity, 1);
  const std::array<std::int64_t, kPriorityCount> held = class_in_use(h);
  std::int64_t reserved_above = 0;
  for (const std::int64_t r : h.config.reserve) reserved_above += std::clamp<std::int64_t>(r, 0, capacity);
  std::int64_t held_up_to = 0;
  for (std::size_t k = 0; k < kPriorityCount; ++k) {
    held_up_to += held[k];
    reserved_above -= std::clamp<std::int64_t>(h.config.reserve[k], 0, capacity);
    if (k >= c && held_up_to + 1 > limit - scaled_reserve(reserved_above, limit, capacity)) {
      return false;
    }
  }
  return true;
}
// The highest class with waiters that may take a slot under `limit` (its
// index), or -1. A lower class may not take a slot that a higher class
// waiting may not take (the reserves keep more from it), so this is the
// highest class waiting, if it may take one.
inline int highest_class_may_take(const Header& h, std::int64_t limit) noexcept {
  for (std::size_t c = kPriorityCount; c-- > 0;) {
    if (h.queues[c].head != kNone) return class_may_take(h, c, limit) ? static_cast<int>(c) : -1;
  }
  return -1;
}

// Locks the segment's mutex, waiting at most `wait` (about a second by
// default: a process stopped or hung inside the lock must not hang every
// other process); if its last holder died inside, rebuilds the state first.
// Throws Unavailable on timeout, or if the mutex is unusable (a corrupt
// segment). The destructor rebuilds if needs_rebuild was set, then unlocks.
inline constexpr std::chrono::milliseconds kLockWait{1000};
class SegmentLock {
 public:
  explicit SegmentLock(Segment& s, std::chrono::nanoseconds wait = kLockWait);
  ~SegmentLock();
  SegmentLock(const SegmentLock&) = delete;
  SegmentLock& operator=(const SegmentLock&) = delete;

 private:
  Segment& s_;
};

// Wakes the background thread of process `p` (bumps its futex word and
// FUTEX_WAKEs it). Safe with or without the mutex.
void wake_process(Segment& s, std::uint32_t p) noexcept;

}  // namespace concurrency_limiter::detail::host
