// Host-scoped resources: one pool of slots for every worker process of a
// machine.
//
// A prefork server (several worker processes) that gives each worker a
// Resource of capacity 5 lets 5 requests per worker reach the database. With
// Scope::kHost, every process of the same user on the same machine that
// opens a resource of the same name shares one pool of `capacity` slots and
// one queue:
//
//   auto db = std::make_shared<Resource>(ResourceOptions{
//       .name = "db", .capacity = 5, .scope = Scope::kHost});
//   if (Permit p = db->acquire_for(std::chrono::seconds(2))) { run_query(); }
//
// Everything else is as for a process-scoped Resource: Limiter, Permit,
// Acquisition, the blocking calls, timeouts, cancel, max_waiting, and host and
// process resources mixed in one acquisition.
//
// Semantics:
//   - One queue for all processes, served in the resource's discipline
//     (kFifo: the waiter that arrived first on the machine is served first;
//     kLifo; kAdaptive) with the machine-wide monotonic clock. max_waiting
//     bounds the total. A release hands the slot directly to the chosen
//     waiter, in whichever process: a waiter of another process is told by
//     that process's background thread, woken through a futex (no polling).
//   - Every decision (grant, timeout, cancel, shed) is made under one
//     process-shared robust mutex, held for a few instructions; a grant that
//     races with a timeout or cancel is decided once, and a loser passes the
//     slot on.
//   - The name must be 1 to 64 letters, digits, '_', '-' or '.', not dots
//     only. Segments are per user: files of mode 0600 in a directory of
//     mode 0700, /dev/shm/fcl-host.<uid>/<name> (FCL_HOST_DIR chooses
//     another directory; every process sharing a resource must use the
//     same). A directory or file that another user created first, a
//     symbolic link, or a file others can read is refused with a
//     std::runtime_error that names its owner and what to do. A segment is
//     built under no name and linked into place complete: a creator killed
//     half-way leaves nothing, and a slow one makes nobody wait.
//   - Configuration: the newest process wins. A process that opens the
//     name with another capacity, queue, max_waiting or limit algorithm puts
//     its configuration in force for every process (host_note() says so);
//     the others follow it from their next operation (capacity(), limit(),
//     statistics() read it). Raising the capacity grants waiters at once;
//     lowering it revokes no held slot (released slots are retired until
//     in_use <= the new limit). So a redeploy with a changed capacity, or a
//     graceful reload (gunicorn HUP) whose new workers start while old ones
//     drain, keeps serving; once the reload is over, the new capacity is in
//     force everywhere.
//   - A corrupt segment, or one of another layout version, is replaced when
//     no live process uses it; otherwise opening throws std::runtime_error
//     saying so (a mixed-version deploy cannot share one pool).
//   - A process that dies (even SIGKILL, even inside the lock) gives its
//     slots back and leaves the queue within about 200 ms: every process's
//     background thread checks the registered processes, and the next
//     locker after a death inside the lock rebuilds the state. Death is
//     proved, never guessed: each registered process holds a kernel lock
//     (an open-file-description lock on its byte of the segment's file)
//     for as long as it lives, which the kernel drops when it dies. A
//     process out of file descriptors, one whose main thread has exited, a
//     reused pid, or a process in another PID namespace sharing /dev/shm
//     (containers of one pod) are all judged correctly.
//   - A process registers when it opens the resource (so `status` lists it
//     and `reset` refuses while it lives); if its background thread cannot
//     start, opening throws and nothing stays registered.
//   - fork(): a child registers as a new process at its first operation
//     (so a resource created before fork, as with gunicorn --preload,
//     works). Slots or waits the parent had at the fork stay the parent's:
//     a child that releases a permit it inherited gives back nothing, also
//     after taking slots of its own (told apart by the hold's start, before
//     the child registered; with CL_STATISTICS off, a resource without
//     early rejection or an adaptive limit does not time its holds, and
//     such a release then gives back one of the child's own slots).
//   - The shared mutex is taken with a bound of about one second: while a
//     process stopped or hung inside it keeps it (or if it is corrupt),
//     requests are refused with Outcome::kUnavailable (the first within
//     about a second, then at once until the background thread reaches the
//     lock again), releases are applied later by the background thread,
//     statistics answer from snapshots, and a process that opens the name
//     meanwhile starts and registers once the lock is back.
//   - Reset: remove_host_resource() refuses while a live process uses the
//     name; with `force`, it removes it anyway, and each live process
//     attaches to a new segment at once (its background thread does; its
//     waiters are refused with kUnavailable; the slots it holds are carried
//     over and count in the new segment until released).
//   - Upgrade: the previous release kept segments at
//     /dev/shm/fcl-host.<uid>.<name>. While a process still maps that file,
//     opening the name throws std::runtime_error (two releases cannot share
//     one limit); an unused one is removed (host_note() says so).
//   - Bounds: at most 256 processes use one host resource at a time, and at
//     most 4096 requests wait for it at a time over all processes (more are
//     rejected with kQueueFull, unless a waiter of a lower class gives its
//     place up: see "Priority classes" below).
//   - Limit: the limit in force (1..capacity, capacity unless changed) is
//     host-wide. set_limit() in any process changes it for all: raising it
//     grants waiters of every process at once (through the same futex
//     hand-off), lowering it revokes nothing (released slots are retired
//     until in_use <= limit).
//   - Adaptive: with a limit_algorithm, one algorithm moves the host-wide
//     limit, fed by the samples of every process (service time from the
//     grant to the release, drop outcome, in-flight = host-wide in_use). Its
//     state lives in the segment and is updated under the shared mutex at
//     each release, so only the built-in Gradient2Limit, VegasLimit,
//     GradientLimit, AimdLimit and FixedLimit are accepted (a custom LimitAlgorithm throws
//     std::invalid_argument); every process must pass the same kind and
//     options (std::invalid_argument naming both otherwise). The process's
//     own instance is used only for its kind and options. A process killed
//     during an update loses that sample and nothing else: the state is
//     double-buffered, and every value read back is brought into range.
//   - Statistics: capacity, limit, in_use, waiting and peak_in_use are
//     machine-wide; acquired_total, rejected_total and the wait and hold
//     histograms count this process's requests; service_seconds is the
//     machine's estimate (see "Early rejection" below).
//   - Priority classes (priority.h): each queued request's class is kept in
//     the shared queue, one list per class. A freed slot goes to the
//     highest class waiting in any process, then the discipline within the
//     class (the adaptive queue's "standing" test looks at the oldest
//     waiter of every class; its shedding, as a Resource's, takes the
//     oldest of the lowest class waiting, a class only once every lower one
//     is shed). With max_waiting, a full queue
//     pushes out the newest waiter of the lowest class below the newcomer,
//     whichever process it waits in (Outcome::kLowerPriority, told to it
//     through its process's background thread); otherwise as without
//     classes, within the newcomer's class. A process killed while its
//     requests wait, even inside the lock, leaves the per-class queues
//     consistent (they are rebuilt from each entry's class). The free-slot
//     path costs the same for every class.
//     Reserves (ResourceOptions::reserve) follow resource.h's rule
//     machine-wide: the segment keeps the slots each process holds per
//     class, a freed slot goes to the highest class waiting in any process
//     if it may take it (else it stays free for the class it is kept for),
//     and a newcomer takes a free slot when its class may take it and
//     nobody of its class or above waits. A process killed while holding
//     slots gives each back to its class. Every process must pass the same
//     reserves: opening a name whose live processes have others throws
//     std::invalid_argument naming both (with none alive, the newest
//     wins, as for the rest of the configuration). Without reserves, a
//     grant and a release cost what they did (one more counter, under the
//     lock they take anyway).
//     Statistics per class (ResourceStatistics::classes): in_use and
//     waiting machine-wide, as in_use and waiting are; acquired_total and
//     rejected_total count this process's requests, as the totals do.
//     The 4096-entry waiter table (whatever max_waiting is) is shed by
//     class the same way: when it is full, the newest waiter of the lowest
//     class below a newcomer gives its place up (Outcome::kLowerPriority, in
//     whichever process it waits: that process's background thread tells
//     it, woken through its futex), and a newcomer with no lower class to
//     push out gets kQueueFull.
//   - Early rejection (ResourceOptions::early_reject, service_estimate.h):
//     as for a Resource, a request that would wait is refused at once with
//     Outcome::kPredictedTimeout when the waiters ahead of it / the limit
//     in force x the service estimate exceed the time to its deadline. The
//     waiters ahead are those of every process (of the classes above its
//     own, and of its own class unless served newest first: LIFO, a
//     standing adaptive queue), over the host-wide limit; with reserves,
//     those of its own class over the slots it may use, as for a Resource.
//     The estimate is the machine's: the moving average of the timed holds
//     (grant to release) of every process, kept in the shared segment and
//     updated at release under the lock the release takes anyway. So a
//     process predicts from the holds of the others too (one whose first
//     hold was slow learns from the others' quick ones instead of refusing
//     everything for good), and nothing is refused early before a hold was
//     released on the machine. statistics().service_seconds is that
//     estimate. Every hold of a process with such a Resource of the name is
//     timed (host holds are anyway while statistics are compiled in); a
//     damaged value that is not a finite number >= 0 is dropped when read
//     (the estimate then starts again). The prediction counts
//     the waiters ahead under the shared mutex a waiting request takes
//     anyway (a walk of the queues of the classes counted, only while a
//     lower class waits too or with reserves, and no further than the count
//     that decides).
//     Off by default, as for a Resource; a Resource of the name without it
//     is unchanged.
//   - Each process runs one background thread per host resource it uses.
//   - close() is local: it refuses the new requests made through that
//     Resource object (kUnavailable), and nothing else. Requests already
//     waiting, in this process as in others, keep waiting until granted,
//     timed out or cancelled (so one may still be granted a slot after the
//     close), and other processes, and other Resource objects of the name
//     in this process, go on as before. To end this process's waiters
//     sooner, cancel them (a stop_token, Acquisition::cancel()) or wait with
//     short timeouts.
//   - Lifetime: a host-scoped Resource not owned by a shared_ptr aborts the
//     program, naming it, if destroyed while a Permit holds a slot through it
//     or a request waits through it, as a process-scoped one does.
//
// Thread safety: a host-scoped Resource is used from any thread like any
// other (resource.h); list_host_resources() and remove_host_resource() may
// be called from any thread, concurrently with everything else.
#pragma once

#include <sys/types.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "concurrency_limiter/resource.h"
#include "concurrency_limiter/statistics.h"

namespace concurrency_limiter {

// One registered process of a host resource.
struct HostProcessInfo {
  pid_t pid = 0;
  std::int64_t held = 0;     // slots it holds
  // Of them, those held by requests of each priority class (indexed by
  // priority_index(): sheddable first); a slot carried over by a forced
  // reset counts in the class it was held in.
  std::array<std::int64_t, kPriorityCount> held_by_class{};
  std::int64_t waiting = 0;  // requests it has queued
  bool alive = true;         // false: dead, to be reclaimed
  // Registered from another PID namespace than the caller's (its pid is
  // that namespace's).
  bool other_pid_namespace = false;
};

// A snapshot of one host resource of this user.
struct HostResourceInfo {
  std::string name;
  std::int64_t capacity = 0;
  std::int64_t limit = 0;     // in force now, 1..capacity
  bool adaptive = false;      // a limit algorithm moves the limit
  std::optional<std::int64_t> max_waiting;
  QueueDiscipline queue = QueueDiscipline::kFifo;
  // Slots reserved for each priority class and those above it
  // (ResourceOptions::reserve), indexed by priority_index().
  std::array<std::int64_t, kPriorityCount> reserve{};
  std::int64_t in_use = 0;
  std::int64_t waiting = 0;
  std::uint64_t repairs = 0;  // times the state was rebuilt after a crash
  std::vector<HostProcessInfo> processes;
  // Empty, or why the fields above are not known: the segment is corrupt or
  // of another version (capacity 0), or its lock was not free within a
  // second (a process stopped inside it?).
  std::string problem;
};

// This user's host resources on this machine, sorted by name: files in the
// segment directory that have a valid name and belong to this user (others
// are ignored). A segment that cannot be read is reported with capacity 0
// and its `problem`. Never waits more than about a second per segment.
std::vector<HostResourceInfo> list_host_resources();

// Removes the host resource `name` if no live process uses it; with
// `force`, even then (they attach to a new one at their next operation).
// Needs no lock (works on a corrupt segment, or one whose lock a stopped
// process holds). Throws std::runtime_error naming the live pids when
// refused, if there is no such resource, or if the file cannot be removed
// (naming its owner); std::invalid_argument for a bad name.
void remove_host_resource(const std::string& name, bool force = false);

}  // namespace concurrency_limiter
