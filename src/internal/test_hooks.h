// Test hooks of the host scope, for the crash tests (tests/cpp/host_*_test.cc
// and their helper process, tests/cpp/host_helper.cc), and of reserves, for
// the priority stress test (tests/cpp/priority_test.cc). Not installed: they
// are not part of the library's API. Defined in src/host/host_pool.cc and
// src/resource.cc.
#pragma once

#include <sys/types.h>

#include <array>
#include <cstdint>

#include "concurrency_limiter/resource.h"

namespace concurrency_limiter::testing {

// Take the shared lock of `resource` and never give it back (a process
// stopped inside the lock). Throws std::invalid_argument if `resource` is not
// host-scoped, as do the other hooks taking a resource.
void hold_host_lock_forever(const Resource& resource);
// Register a fake process with `held` slots whose liveness lock nobody
// holds, as a dead one (PID reuse).
void forge_host_process(const Resource& resource, pid_t pid, std::int64_t held);
// Run this process's dead-process sweep now.
void sweep_host_processes(const Resource& resource);
// Takes the shared lock of `resource`, writes garbage over the uncommitted
// copy of its limit algorithm's state, as a process killed in the middle of
// an update would leave it, and never gives the lock back.
void die_in_host_limit_update(const Resource& resource);
// While `fail` is set, a host resource's background thread fails to start
// (as when the process is out of threads).
void fail_host_thread_start(bool fail);

// Called under the resource's mutex right after every grant of a resource
// with reserves (ResourceOptions::reserve), with the slots each class holds
// then (indexed by priority_index()) and the limit in force; null (the
// default): nothing is called. Set it while no resource with reserves is in
// use.
using ReserveGrantHook = void (*)(const Resource& resource,
                                  const std::array<std::int64_t, kPriorityCount>& held,
                                  std::int64_t limit);
void set_reserve_grant_hook(ReserveGrantHook hook);

}  // namespace concurrency_limiter::testing
