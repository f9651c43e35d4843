// The shared-memory segment of a host-scoped resource: its fixed layout, and
// how it is created, opened, validated and locked.
//
// One segment per resource name and user, in /dev/shm, mode 0600. Layout:
// a Header, then kMaxProcesses Process slots, then kMaxWaiters Entries. Every
// field below the header's mutex is guarded by that mutex (process-shared,
// robust). Fields are split in two kinds:
//   primary  the facts: which process slots are in use (pid, start time,
//            incarnation), how many slots each holds, and each waiter
//            entry's state, owner and ticket;
//   derived  counters and links kept for speed (in_use, waiting, the queue
//            and per-process lists, the free list). rebuild() recomputes
//            them from the primary fields, after a process died inside the
//            lock or when a value read from the segment is out of range.
// A grant is "held" either by the process (Process::held, once its owner has
// taken it) or by a granted Entry (decided, its owner not yet told); so
//   in_use == sum(Process::held) + count(granted entries) <= capacity.
// The limit in force (Header::limit, 1..capacity) bounds new grants; after
// it was lowered, in_use may exceed it until enough slots are released.
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

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "concurrency_limiter/limit.h"

namespace concurrency_limiter::detail::host {

inline constexpr std::uint64_t kMagic = 0x3130545348434c46ull;  // "FLCHST01"
inline constexpr std::uint32_t kVersion = 3;  // 2: limit in force, limit algorithm; 3: cut state
// Processes that may use one host resource at the same time.
inline constexpr std::uint32_t kMaxProcesses = 256;
// Requests that may wait for one host resource at the same time, over all
// processes; beyond it a request is rejected with kQueueFull.
inline constexpr std::uint32_t kMaxWaiters = 4096;
inline constexpr std::uint32_t kNone = 0xffffffffu;
inline constexpr std::size_t kMaxNameLength = 64;

enum class EntryState : std::uint32_t { kFree = 0, kQueued, kGranted, kRejected };

// Which limit algorithm moves the limit (built-in ones only).
enum class LimitKind : std::uint32_t { kNone = 0, kFixed, kAimd, kGradient };

struct LimitConfig {
  std::uint32_t kind;  // LimitKind
  std::uint32_t reserved;
  std::int64_t fixed;  // kFixed: FixedLimit::value()
  AimdOptions aimd;    // kAimd
  GradientOptions gradient;  // kGradient
};

struct Config {
  std::int64_t capacity;
  std::int64_t max_waiting;  // -1: unbounded
  std::uint32_t queue;       // QueueDiscipline
  std::uint32_t reserved;
  std::int64_t target_ns;    // adaptive_target
  std::int64_t interval_ns;  // adaptive_interval
  LimitConfig limit;
};

// The state of the resource's limit algorithm (that of `Config::limit.kind`).
struct AlgorithmState {
  AimdLimit::State aimd;
  GradientLimit::State gradient;
};

struct List {
  std::uint32_t head;  // oldest; kNone when empty
  std::uint32_t tail;  // newest
};

struct Process {
  std::int32_t pid;  // 0: the slot is free (primary)
  std::uint32_t reserved;
  std::uint64_t start_time;   // field 22 of /proc/PID/stat (primary)
  std::uint64_t incarnation;  // new for each registration (primary)
  std::int64_t held;          // slots the process holds (primary)
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
  std::uint32_t prev;         // links in the queue, a decided list or the
  std::uint32_t next;         // free list (derived)
  std::uint32_t reserved;
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
  Config config;
  char name[kMaxNameLength + 8];
  pthread_mutex_t mutex;  // process-shared, robust
  // Guarded by mutex:
  std::uint32_t retired;  // set by remove(): openers must create a new one
  std::uint32_t reserved2;
  std::int64_t in_use;       // derived
  std::int64_t waiting;      // derived
  std::int64_t peak_in_use;
  std::uint64_t next_ticket;
  std::uint64_t next_incarnation;
  std::int64_t above_target_since_ns;  // adaptive: -1 when not above target
  std::uint64_t repairs;               // times the state was rebuilt
  List queue;                          // waiters, oldest first (derived)
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
// '_', '-' or '.'.
void check_name(const std::string& name);
// The segment's name for shm_open: "/fcl-host.<uid>.<name>".
std::string segment_name(const std::string& name);
// Prefix of this user's segments in /dev/shm.
std::string segment_prefix();

// Maps the segment of `name`, creating and initialising it with `config` if
// it does not exist. `config` null: open an existing one for inspection only
// (throws std::runtime_error if there is none). Throws std::invalid_argument
// if it exists with another configuration (naming both), std::runtime_error
// if it is foreign, corrupt or not this user's. The mapping is never undone.
// `inode`, if given, receives the segment's inode (see is_linked()).
Segment* open_segment(const std::string& name, const Config* config,
                      ino_t* inode = nullptr);
// True while the segment of `name` in /dev/shm is still the one with
// `inode` (not removed by an operator since it was opened).
bool is_linked(const std::string& name, ino_t inode);

// Repairs and rebuilds the derived fields from the primary ones; requires
// the mutex. Also used when a value read from the segment is out of range.
void rebuild(Segment& s);

// Process identity: the start time of `pid` (field 22 of /proc/PID/stat), or
// 0 if the process does not exist or is a zombie.
std::uint64_t start_time_of(pid_t pid);
// True only on positive evidence that the process registered as (pid,
// start_time) is gone: no such pid, a zombie, or another start time.
bool is_dead(pid_t pid, std::uint64_t start_time);

std::string describe(const Config& c);
bool same_config(const Config& a, const Config& b);

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
};

// Intrusive lists of entries, through Entry::prev/next; require the mutex.
// A link out of range is treated as the end of the list and sets
// Header::needs_rebuild.
void push_back(Segment& s, List& list, std::uint32_t i);
void unlink(Segment& s, List& list, std::uint32_t i);

// Locks the segment's mutex; if its last holder died inside, rebuilds the
// state first. The destructor rebuilds if needs_rebuild was set, then
// unlocks. Aborts the process if the mutex is unusable (cannot happen unless
// the segment was overwritten).
class SegmentLock {
 public:
  explicit SegmentLock(Segment& s);
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
