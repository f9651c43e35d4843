// Host scope under what operations do: forced resets with requests in
// flight, fork after a reset, a lock stuck or poisoned, a rolling upgrade
// from the previous release, a failed open. Multi-process tests use real
// processes (tests/cpp/host_helper.cc) or fork().
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "host_test_util.h"
#include "internal/host_segment.h"
#include "internal/test_hooks.h"
#include "test_util.h"

extern char** environ;

// fork() of a multi-threaded process, then new threads in the child: the
// sanitizers' runtimes do not support it (ThreadSanitizer refuses it;
// AddressSanitizer's can deadlock in the child), so those tests run in the
// plain build only.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define CL_FORK_TESTS 0
#else
#define CL_FORK_TESTS 1
#endif

namespace concurrency_limiter {
namespace {

using namespace std::chrono_literals;
using testing::eventually;

std::string unique_name(const std::string& test) {
  static int runs = 0;
  return "r" + std::to_string(::getpid()) + "." + std::to_string(++runs) + "-" + test;
}

std::string shm_path(const std::string& name) { return detail::host::segment_path(name); }

struct Cleanup {
  std::string name;
  ~Cleanup() { ::unlink(shm_path(name).c_str()); }
};

// The segment of host resource `name`, mapped for writing (to damage it as
// a crash or another program would), unmapped when it goes out of scope.
class MappedSegment {
 public:
  explicit MappedSegment(const std::string& name) {
    const int fd = ::open(shm_path(name).c_str(), O_RDWR);
    if (fd < 0) return;
    void* p = ::mmap(nullptr, sizeof(detail::host::Segment), PROT_READ | PROT_WRITE, MAP_SHARED,
                     fd, 0);
    ::close(fd);
    if (p != MAP_FAILED) seg_ = static_cast<detail::host::Segment*>(p);
  }
  MappedSegment(const MappedSegment&) = delete;
  MappedSegment& operator=(const MappedSegment&) = delete;
  ~MappedSegment() {
    if (seg_ != nullptr) ::munmap(seg_, sizeof(detail::host::Segment));
  }
  detail::host::Segment* get() const { return seg_; }  // null if it could not be mapped
  detail::host::Segment* operator->() const { return seg_; }

 private:
  detail::host::Segment* seg_ = nullptr;
};

std::shared_ptr<Resource> host_resource(const std::string& name, std::int64_t capacity) {
  return std::make_shared<Resource>(
      ResourceOptions{.name = name, .capacity = capacity, .scope = Scope::kHost});
}

HostResourceInfo info_of(const std::string& name) {
  for (auto& info : list_host_resources()) {
    if (info.name == name) return info;
  }
  throw std::runtime_error("no host resource " + name);
}

// A helper process (host_helper) with its stdout on a pipe.
class Child {
 public:
  explicit Child(std::vector<std::string> args, const char* program = HOST_HELPER) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
    args.insert(args.begin(), program);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (::posix_spawn(&pid_, program, &actions, nullptr, argv.data(), environ) != 0) {
      throw std::runtime_error("posix_spawn");
    }
    posix_spawn_file_actions_destroy(&actions);
    ::close(fds[1]);
    fd_ = fds[0];
  }
  Child(const Child&) = delete;
  ~Child() {
    if (pid_ > 0) kill();
    ::close(fd_);
  }
  pid_t pid() const { return pid_; }
  std::string line(std::chrono::milliseconds timeout = 20s) {
    const auto give_up = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const auto nl = buffer_.find('\n');
      if (nl != std::string::npos) {
        std::string out = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        return out;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          give_up - std::chrono::steady_clock::now());
      if (left.count() <= 0) return "";
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) return "";
      char buf[256];
      const ssize_t n = ::read(fd_, buf, sizeof buf);
      if (n <= 0) return "";
      buffer_.append(buf, static_cast<std::size_t>(n));
    }
  }
  void kill() {
    ::kill(pid_, SIGKILL);
    join();
  }
  int join() {
    int status = 0;
    if (pid_ > 0) ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return status;
  }

 private:
  pid_t pid_ = -1;
  int fd_ = -1;
  std::string buffer_;
};

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    return "killed by signal " + std::to_string(WTERMSIG(status)) + " (" +
           strsignal(WTERMSIG(status)) + ")";
  }
  return "status " + std::to_string(status);
}

// Runs `body` in a forked child; returns its wait status. The child's exit
// code is what `body` returns.
template <class Body>
int in_child(Body body) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    int code = 99;
    try {
      code = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child: %s\n", e.what());
      code = 98;
    }
    ::_exit(code);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

// --- slots held across a forced reset ---------------------------------------

// After reset --force, the slots this process held are carried over into
// the new segment: releasing the new permit first gives its slot back at
// once, releasing the old one later gives back the carried slot, and the
// new segment never admits more than its capacity meanwhile.
TEST(HostOperations, AfterAForcedResetReleasingTheNewPermitFirstFreesItsSlot) {
  const std::string name = unique_name("elsewhere-order");
  Cleanup cleanup{name};
  auto db = host_resource(name, 2);
  Permit before = db->try_acquire();
  ASSERT_TRUE(before);
  remove_host_resource(name, /*force=*/true);
  Permit after = db->acquire_for(2s);
  ASSERT_TRUE(after) << to_string(after.outcome());
  EXPECT_EQ(db->in_use(), 2);
  {
    Child full({"wait", name, "2", "fifo", "200", "0"});
    EXPECT_EQ(full.line(), "rejected timeout") << "more holders than the capacity";
  }
  after.release();
  EXPECT_EQ(db->in_use(), 1) << "the new segment still counts the released permit";
  Child other({"wait", name, "2", "fifo", "2000", "0"});
  EXPECT_EQ(other.line().rfind("granted", 0), 0u)
      << "another process cannot get the slot, which nobody holds";
  other.join();
  before.release();
  EXPECT_EQ(db->in_use(), 0);
}

#if CL_FORK_TESTS
// --- fork after a reset, with releases pending -------------------------------

// A process that re-attached after reset --force while holding a slot
// (carried over into the new segment) gives it back, then forks a worker:
// the child's own holds are its own, and nothing inherited is applied.
TEST(HostOperations, AForkChildDoesNotInheritSlotsHeldInARemovedSegment) {
  const std::string name = unique_name("fork-elsewhere");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  Permit old = db->try_acquire();
  ASSERT_TRUE(old);
  remove_host_resource(name, /*force=*/true);
  db->set_limit(1);  // any operation that attaches: now on the new segment
  ASSERT_EQ(db->in_use(), 1);  // carried over
  old.release();
  ASSERT_EQ(db->in_use(), 0);
  const int status = in_child([&] {
    Permit mine = db->acquire_for(5s);
    if (!mine) return 2;
    mine.release();
    // The child holds nothing now: the new segment must say so.
    return eventually([&] { return db->in_use() == 0; }) ? 0 : 1;
  });
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << describe_status(status)
      << " (1: the child's released slot stayed taken in the new segment)";
  old.release();
}

// The parent's release could not reach the shared lock (a process stopped
// inside it): it is pending, for the parent's background thread. A child
// forked meanwhile inherits the pending count and applies it to ITS OWN
// slot once it holds one: it then holds a permit the segment no longer
// counts, and a second request is admitted beyond the capacity.
TEST(HostOperations, AForkChildDoesNotApplyItsParentsPendingReleases) {
  const std::string name = unique_name("fork-pending");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  Permit held = db->try_acquire();
  ASSERT_TRUE(held);
  Child locker({"lock", name, "1", "fifo"});
  ASSERT_EQ(locker.line(), "locked");
  held.release();  // cannot reach the lock: pending
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(go[1]);
    char c;
    if (::read(go[0], &c, 1) != 1) ::_exit(97);
    // Past the breaker inherited from the parent (at most 1 s after fork).
    std::this_thread::sleep_for(1500ms);
    Permit mine;
    const auto give_up = std::chrono::steady_clock::now() + 10s;
    while (!(mine = db->acquire_for(2s))) {
      if (std::chrono::steady_clock::now() > give_up) ::_exit(2);
      std::this_thread::sleep_for(100ms);
    }
    // The child holds the only slot: nobody, itself included, gets another.
    const auto until = std::chrono::steady_clock::now() + 3s;
    while (std::chrono::steady_clock::now() < until) {
      if (Permit extra = db->try_acquire()) ::_exit(1);
      std::this_thread::sleep_for(20ms);
    }
    ::_exit(0);
  }
  ::close(go[0]);
  locker.kill();  // the lock comes back: the parent applies its release
  ASSERT_TRUE(eventually([&] { return db->in_use() == 0; }));
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  ::close(go[1]);
  int status = 0;
  ::waitpid(child, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << describe_status(status)
      << " (1: a second permit was granted with capacity 1: the child applied the "
         "parent's pending release to its own slot)";
}

// --- an exception from a host enqueue inside a noexcept notice -------------

// A request for [process resource, host resource] waits for the first. When
// it is granted, the acquisition advances to the host resource from the
// releasing thread's notice (Acquisition::on_node_complete, noexcept). If
// the host resource must re-attach (reset --force) and cannot (here: the
// process is out of descriptors, as under overload), its enqueue throws
// std::runtime_error through the noexcept function: std::terminate.
TEST(HostOperations, AHostResourceThatCannotReattachDoesNotAbortAWaitingRequest) {
  const std::string name = unique_name("terminate");
  Cleanup cleanup{name};
  const int status = in_child([&] {
    auto local = testing::make_resource("local", 1);
    auto db = host_resource(name, 1);
    Limiter limiter({local, db}, 10s);
    const auto both = limiter.select({local, db});
    Permit first = local->try_acquire();
    if (!first) return 2;
    std::atomic<int> outcome{-1};
    std::thread waiter([&] {
      Permit p = limiter.acquire_for(both, 10s);
      outcome = static_cast<int>(p.outcome());
    });
    if (!eventually([&] { return local->waiting() == 1; })) return 3;
    remove_host_resource(name, /*force=*/true);
    // Out of descriptors, as a worker under overload.
    rlimit limit{};
    ::getrlimit(RLIMIT_NOFILE, &limit);
    limit.rlim_cur = std::min<rlim_t>(limit.rlim_cur, 1024);
    ::setrlimit(RLIMIT_NOFILE, &limit);
    std::vector<int> burnt;
    for (int fd; (fd = ::open("/dev/null", O_RDONLY)) >= 0;) burnt.push_back(fd);
    first.release();  // grants the waiter's first resource: it advances to db
    for (int fd : burnt) ::close(fd);
    waiter.join();
    return 0;  // whatever the outcome: the process is alive
  });
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << describe_status(status);
}

// The same without any reset: a worker forked from a process that opened the
// resource (gunicorn --preload) registers at its first operation. If that
// first operation is the second stage of a [process, host] request, it runs
// inside the noexcept notice; a registration that fails (the background
// thread cannot start: a clear error, never an abort)
// throws through it: std::terminate.
TEST(HostOperations, AForkChildWhoseRegistrationFailsInsideANoticeDoesNotAbort) {
  const std::string name = unique_name("terminate-fork");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);  // opened before fork, as with --preload
  const int status = in_child([&] {
    auto local = testing::make_resource("local", 1);
    Limiter limiter({local, db}, 10s);
    const auto both = limiter.select({local, db});
    Permit first = local->try_acquire();
    if (!first) return 2;
    std::thread waiter([&] { Permit p = limiter.acquire_for(both, 10s); });
    if (!eventually([&] { return local->waiting() == 1; })) return 3;
    testing::fail_host_thread_start(true);  // out of threads
    first.release();  // the waiter advances to db: its first operation here
    testing::fail_host_thread_start(false);
    waiter.join();
    return 0;
  });
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << describe_status(status);
}
#endif

// --- a stuck lock at start-up ---------------------------------------------

// README: while a process stopped inside the shared lock keeps it, requests
// are answered 503 and nothing fails. A worker that starts (or restarts)
// meanwhile must come up and answer 503 too; instead opening the resource
// throws, so the worker fails to boot (and uvicorn/gunicorn respawn it in a
// loop). open_segment() even says "attach anyway", but registration then
// needs the lock.
TEST(HostOperations, OpeningWhileAStoppedProcessHoldsTheLockStartsTheWorker) {
  const std::string name = unique_name("open-stuck");
  Cleanup cleanup{name};
  Child locker({"lock", name, "2", "fifo"});
  ASSERT_EQ(locker.line(), "locked");
  std::shared_ptr<Resource> db;
  try {
    db = host_resource(name, 2);
  } catch (const std::exception& e) {
    FAIL() << "opening the resource threw: " << e.what();
  }
  EXPECT_EQ(db->acquire_for(100ms).outcome(), Outcome::kUnavailable);
  locker.kill();
  Permit p;
  EXPECT_TRUE(eventually([&] { return static_cast<bool>(p = db->acquire_for(1s)); }));
}

// --- "then at once" while the lock is stuck --------------------------------

// README: "requests of the other workers are answered 503 (reason
// unavailable) within about a second and then at once, never hang". The
// background thread waits up to a second for the segment lock while holding
// the pool's mutex (deliver(), sweep()), and the breaker lapses between its
// attempts, so requests after the first keep waiting up to a second each:
// on an event loop, the whole worker stalls.
TEST(HostOperations, WhileTheLockIsStuckRequestsAfterTheFirstAreRefusedAtOnce) {
  const std::string name = unique_name("breaker");
  Cleanup cleanup{name};
  auto db = host_resource(name, 2);
  Child locker({"lock", name, "2", "fifo"});
  ASSERT_EQ(locker.line(), "locked");
  EXPECT_EQ(db->acquire_for(10s).outcome(), Outcome::kUnavailable);  // the first: ~1 s
  auto worst = std::chrono::steady_clock::duration::zero();
  int slow = 0, calls = 0;
  const auto until = std::chrono::steady_clock::now() + 4s;
  while (std::chrono::steady_clock::now() < until) {
    const auto started = std::chrono::steady_clock::now();
    Permit p = db->acquire_for(10s);
    const auto took = std::chrono::steady_clock::now() - started;
    EXPECT_EQ(p.outcome(), Outcome::kUnavailable);
    worst = std::max(worst, took);
    ++calls;
    if (took > 700ms) ++slow;
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_LT(worst, 700ms) << slow << " of " << calls << " requests took over 700 ms, the worst "
                          << std::chrono::duration_cast<std::chrono::milliseconds>(worst).count()
                          << " ms";
}

// in_use(), waiting() and statistics() (Prometheus, health checks, Python's
// resource.in_use on the event loop) ignore the breaker: each call waits the
// full second for the stuck lock.
TEST(HostOperations, WhileTheLockIsStuckInUseAndStatisticsAnswerAtOnce) {
  const std::string name = unique_name("snapshot");
  Cleanup cleanup{name};
  auto db = host_resource(name, 2);
  Child locker({"lock", name, "2", "fifo"});
  ASSERT_EQ(locker.line(), "locked");
  EXPECT_EQ(db->acquire_for(10s).outcome(), Outcome::kUnavailable);  // the breaker is open
  const auto time = [](auto f) {
    const auto started = std::chrono::steady_clock::now();
    f();
    return std::chrono::duration_cast<std::chrono::milliseconds>(
        std::chrono::steady_clock::now() - started);
  };
  const auto in_use = time([&] { (void)db->in_use(); });
  const auto stats = time([&] { (void)db->statistics(); });
  EXPECT_LT(in_use, 700ms) << "in_use() took " << in_use.count() << " ms";
  EXPECT_LT(stats, 700ms) << "statistics() took " << stats.count() << " ms";
}

// --- a poisoned mutex still aborts ---------------------------------------

// Garbage in the mutex must make a corrupt segment, not an
// abort. With the kind of a robust priority-inheritance mutex and a lock
// word naming a thread that does not exist, trylock says EBUSY and
// pthread_mutex_timedlock gets ESRCH from FUTEX_LOCK_PI, on which glibc
// asserts: every worker that opens the resource and `status` abort.
TEST(HostOperations, APoisonedPriorityInheritanceMutexAbortsNobody) {
  const std::string name = unique_name("poison-pi");
  Cleanup cleanup{name};
  pid_t gone = 0;
  {
    Child opener({"open", name, "1", "fifo"});  // creates the segment, exits
    ASSERT_EQ(opener.line(), "ok");
    gone = opener.pid();
    opener.join();  // reaped: its pid names no thread
  }
  {
    MappedSegment seg(name);
    ASSERT_NE(seg.get(), nullptr);
    // glibc x86-64/aarch64 layout: __lock at 0, __owner at 8, __kind at 16.
    // Kind: robust (16) | priority inheritance (32) | process-shared (128).
    char* m = reinterpret_cast<char*>(&seg->header.mutex);
    const std::int32_t lock = gone, kind = 16 | 32 | 128;
    std::memcpy(m + 0, &lock, sizeof lock);
    std::memcpy(m + 8, &lock, sizeof lock);
    std::memcpy(m + 16, &kind, sizeof kind);
  }

  const int status_status = in_child([&] {
    (void)list_host_resources();
    return 0;
  });
  EXPECT_TRUE(WIFEXITED(status_status) && WEXITSTATUS(status_status) == 0)
      << "status " << describe_status(status_status);
  // No live process used it: the worker replaces the corrupt segment (and
  // is granted), or refuses as unavailable; it never aborts.
  Child worker({"wait", name, "1", "fifo", "300", "0"});
  const std::string said = worker.line();
  const int worker_status = worker.join();
  EXPECT_TRUE(said.rfind("granted", 0) == 0 || said == "rejected unavailable")
      << said << "; the worker " << describe_status(worker_status);

  remove_host_resource(name, /*force=*/true);  // needs no lock
}

// --- a forced reset forgets the newest configuration ---------------------

// The newest configuration wins: a worker started with capacity 3 follows
// capacity 5 once a newer worker opens the name with it. After reset
// --force, the first process to re-attach creates the new segment with the
// configuration IT was constructed with (HostPool::config_), not the one in
// force, and the others adopt that (Adopt::kTheirs): capacity 3 is back
// although the newest worker, alive, asked for 5, and it stays after the old
// worker is gone.
TEST(HostOperations, AForcedResetKeepsTheConfigurationInForce) {
  const std::string name = unique_name("reset-config");
  Cleanup cleanup{name};
  auto db = host_resource(name, 3);  // an old worker
  Child newest({"hold", name, "5", "fifo", "0", "-1"});  // a newer worker: capacity 5
  ASSERT_EQ(newest.line(), "ready");
  ASSERT_EQ(db->capacity(), 5);
  remove_host_resource(name, /*force=*/true);
  Permit p = db->acquire_for(2s);  // the old worker re-attaches first
  ASSERT_TRUE(p);
  EXPECT_EQ(db->capacity(), 5);
  EXPECT_EQ(info_of(name).capacity, 5);
}


// --- a stale limit algorithm after re-attaching ----------------------------

// HostPool keeps its SharedAlgorithm for a configuration generation number,
// and generation numbers are per segment: a new segment starts at 1 again.
// After reset --force, a process whose old segment was at generation 1
// re-attaches to a new one at generation 1 made with another configuration
// (here: not adaptive) and keeps feeding its samples to its old AIMD
// instance, which moves the limit of a resource that has no algorithm.
TEST(HostOperations, AfterAForcedResetTheLimitAlgorithmIsTheNewSegments) {
  const std::string name = unique_name("stale-algorithm");
  Cleanup cleanup{name};
  auto db = std::make_shared<Resource>(ResourceOptions{.name = name,
                                                       .capacity = 8,
                                                       .limit_algorithm = testing_host_aimd(),
                                                       .scope = Scope::kHost});
  {
    Permit p = db->try_acquire();  // builds this process's algorithm (generation 1)
    ASSERT_TRUE(p);
    p.release(Completion::kSuccess);
  }
  remove_host_resource(name, /*force=*/true);
  Child plain({"hold", name, "8", "fifo", "0", "-1"});  // the new segment: not adaptive
  ASSERT_EQ(plain.line(), "ready");
  ASSERT_FALSE(info_of(name).adaptive);
  for (int i = 0; i < 2; ++i) {  // one window of the tests' AIMD, with drops
    Permit p = db->acquire_for(2s);
    ASSERT_TRUE(p) << to_string(p.outcome());
    p.release(Completion::kDropped);
  }
  EXPECT_EQ(info_of(name).limit, 8) << "a resource without an algorithm had its limit moved";
  EXPECT_EQ(db->limit(), 8);
}


// --- a failed open leaks its descriptor and mapping -------------------------

int open_descriptors() {
  int n = 0;
  for (int fd = 0; fd < 4096; ++fd) {
    if (::fcntl(fd, F_GETFD) >= 0) ++n;
  }
  return n;
}

// When opening fails after the segment was opened (here: the background
// thread cannot start, as when the process is out of threads), the HostPool
// is dropped without closing its file or unmapping the segment (it has no
// destructor): each failed attempt leaks a descriptor and the mapping, so
// an application that retries runs out of descriptors.
TEST(HostOperations, AFailedOpenLeaksNoDescriptor) {
  const std::string name = unique_name("open-leak");
  Cleanup cleanup{name};
  const int before = open_descriptors();
  testing::fail_host_thread_start(true);
  for (int i = 0; i < 5; ++i) {
    EXPECT_THROW(host_resource(name, 1), std::runtime_error);
  }
  testing::fail_host_thread_start(false);
  EXPECT_EQ(open_descriptors(), before) << "descriptors leaked by 5 failed opens";
}


// --- a retired segment still in place ---------------------------------------

// remove_host_resource() marks the segment retired, then unlinks it. A
// process whose next operation falls between the two (or after an unlink
// that failed: reset then reports an error, but the mark stays) re-attaches
// by opening the same file again, finds it retired, and refuses it because
// "a live process still uses it": itself, through its old descriptor's
// liveness lock. Every operation then throws std::runtime_error (a 500, or
// std::terminate inside a notice, see above) until the file is gone.
TEST(HostOperations, AProcessReattachingToARetiredSegmentStillLinkedDoesNotFail) {
  const std::string name = unique_name("retired-linked");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  {
    MappedSegment seg(name);
    ASSERT_NE(seg.get(), nullptr);
    seg->header.retired.store(1);  // as reset does first
  }
  try {
    Permit p = db->acquire_for(1s);
    EXPECT_TRUE(p) << to_string(p.outcome());
  } catch (const std::exception& e) {
    ADD_FAILURE() << "the request threw: " << e.what();
  }
}


// --- a rolling upgrade from the previous release ------------------------------

// The previous release kept a segment at /dev/shm/fcl-host.<uid>.<name>
// (shm_open); this one at /dev/shm/fcl-host.<uid>/<name>, and never looks at
// the old place. During a rolling upgrade (gunicorn HUP: new workers start
// with the new code while old ones drain) old and new workers use two
// independent pools: up to twice the capacity reaches the database, with no
// error and no log. README: "one of another layout version ... if a live
// process uses it, start-up fails with an error saying which".
// A worker of the previous release maps /dev/shm/fcl-host.<uid>.<name>
// (simulated by the helper's "oldrelease" mode: what is checked is that
// some live process maps that file).
TEST(HostOperations, ARollingUpgradeFromThePreviousReleaseNeverDoublesTheCapacity) {
  const std::string name = unique_name("upgrade");
  Cleanup cleanup{name};
  const std::string flat = "/dev/shm/fcl-host." + std::to_string(::getuid()) + "." + name;
  struct FlatCleanup {
    std::string path;
    ~FlatCleanup() { ::unlink(path.c_str()); }
  } flat_cleanup{flat};
  {
    Child previous({"oldrelease", name});
    ASSERT_EQ(previous.line(), "ready");
    try {
      auto db = host_resource(name, 1);  // a new worker of the same deployment
      FAIL() << "opened while a worker of the previous release uses " << flat;
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("older release"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(std::to_string(previous.pid())), std::string::npos)
          << e.what();
    }
  }  // the old worker is gone: its file is removed, the new one opens
  auto db = host_resource(name, 1);
  EXPECT_NE(db->host_note().find("older release"), std::string::npos) << db->host_note();
  EXPECT_NE(::access(flat.c_str(), F_OK), 0);
  EXPECT_TRUE(db->try_acquire());
}


// `status` figures from a damaged segment: the per-class counts of a
// process are brought into range as the repair would bring them, so they
// never add up to more than the process holds nor go below zero.
detail::host::Process* own_entry(detail::host::Segment* seg) {
  for (auto& p : seg->processes) {
    if (p.pid == ::getpid()) return &p;
  }
  return nullptr;
}

HostProcessInfo own_status(const std::string& name) {
  for (const HostResourceInfo& info : list_host_resources()) {
    if (info.name != name) continue;
    for (const HostProcessInfo& p : info.processes) {
      if (p.pid == ::getpid()) return p;
    }
  }
  throw std::runtime_error("not listed");
}

std::int64_t total(const HostProcessInfo& p) {
  std::int64_t sum = 0;
  for (const std::int64_t n : p.held_by_class) {
    EXPECT_GE(n, 0);
    sum += n;
  }
  return sum;
}

TEST(HostOperations, StatusSplitsDamagedClassCountsAsTheRepairWould) {
  const std::string name = unique_name("status-classes");
  Cleanup cleanup{name};
  auto db = std::make_shared<Resource>(
      ResourceOptions{.name = name, .capacity = 4, .scope = Scope::kHost});
  Limiter limiter({db}, std::chrono::seconds(1));
  const auto set = limiter.select({db});
  Permit a = limiter.acquire(set, std::nullopt, Priority::kSheddable);
  Permit b = limiter.acquire(set, std::nullopt, Priority::kSheddable);
  ASSERT_TRUE(a && b);
  {
    const HostProcessInfo p = own_status(name);
    EXPECT_EQ(p.held, 2);
    EXPECT_EQ(p.held_by_class[priority_index(Priority::kSheddable)], 2);
    EXPECT_EQ(total(p), 2);
  }
  MappedSegment seg(name);
  ASSERT_NE(seg.get(), nullptr);
  detail::host::Process* me = own_entry(seg.get());
  ASSERT_NE(me, nullptr);
  const std::size_t plus = priority_index(Priority::kCriticalPlus);
  // Two critical_plus slots besides the two sheddable ones, of two held.
  me->class_held[plus] = 2;
  HostProcessInfo p = own_status(name);
  EXPECT_EQ(p.held, 2);
  EXPECT_EQ(total(p), 2);
  EXPECT_EQ(p.held_by_class[priority_index(Priority::kSheddable)], 2);
  me->class_held[plus] = 0;
  // A negative count of held slots: nothing held, in any class.
  const std::int64_t held = me->held;
  me->held = -1;
  p = own_status(name);
  EXPECT_EQ(p.held, 0);
  EXPECT_EQ(total(p), 0);
  me->held = held;
}

}  // namespace
}  // namespace concurrency_limiter
