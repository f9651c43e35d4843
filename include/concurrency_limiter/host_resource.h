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
//   - The name must be 1 to 64 letters, digits, '_', '-' or '.'. Segments
//     are per user ("/dev/shm/fcl-host.<uid>.<name>", mode 0600). Opening an
//     existing name with another capacity, queue, max_waiting or limit
//     algorithm throws
//     std::invalid_argument naming both configurations; a foreign or corrupt
//     segment throws std::runtime_error.
//   - A process that dies (even SIGKILL, even inside the lock) gives its
//     slots back and leaves the queue within about 200 ms: every process's
//     background thread checks the registered processes for positive
//     evidence of death (no such pid, a zombie, or another start time, so a
//     reused pid neither keeps nor steals the slots) and the next locker
//     after a death inside the lock rebuilds the state.
//   - fork(): a child registers as a new process at its first acquisition
//     (so a resource created before fork, as with gunicorn --preload,
//     works). Slots or waits the parent had at the fork stay the parent's.
//   - Bounds: at most 256 processes use one host resource at a time, and at
//     most 4096 requests wait for it at a time over all processes (more are
//     rejected with kQueueFull).
//   - Limit: the limit in force (1..capacity, capacity unless changed) is
//     host-wide. set_limit() in any process changes it for all: raising it
//     grants waiters of every process at once (through the same futex
//     hand-off), lowering it revokes nothing (released slots are retired
//     until in_use <= limit).
//   - Adaptive: with a limit_algorithm, one algorithm moves the host-wide
//     limit, fed by the samples of every process (service time from the
//     grant to the release, drop outcome, in-flight = host-wide in_use). Its
//     state lives in the segment and is updated under the shared mutex at
//     each release, so only the built-in GradientLimit, AimdLimit and
//     FixedLimit are accepted (a custom LimitAlgorithm throws
//     std::invalid_argument); every process must pass the same kind and
//     options (std::invalid_argument naming both otherwise). The process's
//     own instance is used only for its kind and options. A process killed
//     during an update loses that sample and nothing else: the state is
//     double-buffered, and every value read back is brought into range.
//   - Statistics: capacity, limit, in_use, waiting and peak_in_use are
//     machine-wide; acquired_total, rejected_total and the wait and hold
//     histograms count this process's requests.
//   - Each process runs one background thread per host resource it uses.
#pragma once

#include <sys/types.h>

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
  std::int64_t waiting = 0;  // requests it has queued
  bool alive = true;         // false: dead, to be reclaimed
};

// A snapshot of one host resource of this user.
struct HostResourceInfo {
  std::string name;
  std::int64_t capacity = 0;
  std::int64_t limit = 0;     // in force now, 1..capacity
  bool adaptive = false;      // a limit algorithm moves the limit
  std::optional<std::int64_t> max_waiting;
  QueueDiscipline queue = QueueDiscipline::kFifo;
  std::int64_t in_use = 0;
  std::int64_t waiting = 0;
  std::uint64_t repairs = 0;  // times the state was rebuilt after a crash
  std::vector<HostProcessInfo> processes;
};

// This user's host resources on this machine, sorted by name. Segments that
// cannot be read are reported with capacity 0 and no processes.
std::vector<HostResourceInfo> list_host_resources();

// Removes the host resource `name` if no live process is registered with
// it. Throws std::runtime_error naming the live pids otherwise, or if there
// is no such resource; std::invalid_argument for a bad name.
void remove_host_resource(const std::string& name);

namespace testing {
// Test hooks (crash tests): take the shared lock of `resource` and never
// give it back; register a fake process with `held` slots (PID reuse); run
// this process's dead-process sweep now.
void hold_host_lock_forever(const Resource& resource);
void forge_host_process(const Resource& resource, pid_t pid, std::uint64_t start_time,
                        std::int64_t held);
void sweep_host_processes(const Resource& resource);
// Takes the shared lock of `resource`, writes garbage over the uncommitted
// copy of its limit algorithm's state, as a process killed in the middle of
// an update would leave it, and never gives the lock back.
void die_in_host_limit_update(const Resource& resource);
}  // namespace testing

}  // namespace concurrency_limiter
