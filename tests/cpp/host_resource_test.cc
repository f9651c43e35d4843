// Host scope: one pool of slots for every process of the machine. The
// multi-process tests start real processes (tests/cpp/host_helper.cc).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <stop_token>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "host_test_util.h"
#include "internal/host_segment.h"
#include "internal/test_hooks.h"
#include "test_util.h"

extern char** environ;

namespace concurrency_limiter {
namespace {

using namespace std::chrono_literals;
using testing::eventually;

std::string unique_name(const std::string& test) {
  static int runs = 0;  // --gtest_repeat runs a test again in this process
  return "t" + std::to_string(::getpid()) + "." + std::to_string(++runs) + "-" + test;
}

std::string shm_path(const std::string& name) { return detail::host::segment_path(name); }

// Removes the segment when the test ends (this process may still map it).
struct Cleanup {
  std::string name;
  ~Cleanup() { ::unlink(shm_path(name).c_str()); }
};

std::shared_ptr<Resource> host_resource(const std::string& name, std::int64_t capacity,
                                        QueueDiscipline queue = QueueDiscipline::kFifo,
                                        std::optional<std::int64_t> max_waiting = {}) {
  return std::make_shared<Resource>(ResourceOptions{.name = name,
                                                    .capacity = capacity,
                                                    .max_waiting = max_waiting,
                                                    .queue = queue,
                                                    .scope = Scope::kHost});
}

// A helper process with its stdout on a pipe.
class Child {
 public:
  explicit Child(std::vector<std::string> args) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
    args.insert(args.begin(), HOST_HELPER);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (::posix_spawn(&pid_, HOST_HELPER, &actions, nullptr, argv.data(), environ) != 0) {
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

  // The next line it prints, or "" after `timeout` or at its exit.
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

std::int64_t ns_of(const std::string& granted_line) {
  return std::stoll(granted_line.substr(granted_line.find(' ') + 1));
}

// The machine-wide view of one resource.
HostResourceInfo info_of(const std::string& name) {
  for (auto& info : list_host_resources()) {
    if (info.name == name) return info;
  }
  throw std::runtime_error("no host resource " + name);
}

// free + held by live processes == capacity, and nobody dead still counted.
void expect_invariant(const std::string& name) {
  const HostResourceInfo info = info_of(name);
  std::int64_t held = 0;
  for (const auto& p : info.processes) {
    if (p.alive) held += p.held;
  }
  EXPECT_LE(info.in_use, info.capacity);
  EXPECT_GE(info.in_use, held);  // granted entries not yet taken count too
}

TEST(HostResource, AcquiresAndReleasesLikeAProcessResource) {
  const std::string name = unique_name("basic");
  Cleanup cleanup{name};
  auto db = host_resource(name, 2);
  EXPECT_EQ(db->scope(), Scope::kHost);
  Permit a = db->try_acquire();
  Permit b = db->acquire_for(1s);
  ASSERT_TRUE(a);
  ASSERT_TRUE(b);
  EXPECT_EQ(db->in_use(), 2);
  Permit c = db->acquire_for(20ms);
  EXPECT_FALSE(c);
  EXPECT_EQ(c.outcome(), Outcome::kTimeout);
  EXPECT_EQ(c.refused_by_name(), name);
  a.release();
  EXPECT_EQ(db->in_use(), 1);
  const ResourceStatistics s = db->statistics();
  EXPECT_EQ(s.acquired_total, 2u);
  EXPECT_EQ(s.rejected(Outcome::kTimeout), 1u);
  EXPECT_EQ(s.peak_in_use, 2);
}

TEST(HostResource, HandsOffToAWaitingThreadAndPassesOnACancelledGrant) {
  const std::string name = unique_name("handoff");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  auto set = std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  Permit held = db->try_acquire();
  testing::Recorder rec;
  Acquisition waiter(set);
  ASSERT_EQ(waiter.start(rec.callback()), Outcome::kPending);
  EXPECT_EQ(db->waiting(), 1);
  held.release();
  ASSERT_TRUE(eventually([&] { return waiter.state() == Acquisition::State::kGranted; }));
  // A grant racing with a cancel: the cancel loses and the slot is passed on.
  Acquisition second(set);
  ASSERT_EQ(second.start([](Outcome) {}), Outcome::kPending);
  waiter.release();                 // grants `second`
  second.cancel(Outcome::kTimeout);  // too late: it holds the slot
  EXPECT_EQ(second.state(), Acquisition::State::kGranted);
  second.release();
  EXPECT_EQ(db->in_use(), 0);
  EXPECT_EQ(db->waiting(), 0);
}

TEST(HostResource, MixesWithProcessResourcesInOneLimiter) {
  const std::string name = unique_name("mixed");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  auto local = testing::make_resource("local", 1);
  Limiter limiter({local, db}, 1s);
  auto both = limiter.select({local, db});
  Permit p = limiter.acquire(both);
  ASSERT_TRUE(p);
  Permit q = limiter.acquire_for(both, 20ms);
  EXPECT_FALSE(q);
  EXPECT_EQ(q.outcome(), Outcome::kTimeout);
  EXPECT_EQ(q.refused_by_name(), "local");
  // Stuck on the host resource while holding the local one: the local slot
  // comes back with the timeout.
  Permit only_db = db->try_acquire();
  EXPECT_FALSE(only_db);
  p.release();
  Permit r = db->try_acquire();
  ASSERT_TRUE(r);
  Permit s = limiter.acquire_for(both, 20ms);
  EXPECT_FALSE(s);
  EXPECT_EQ(s.refused_by_name(), name);
  EXPECT_EQ(local->in_use(), 0);
}

TEST(HostResource, MaxWaitingBoundsTheQueue) {
  const std::string name = unique_name("bounded");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1, QueueDiscipline::kFifo, 1);
  auto set = std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  Permit held = db->try_acquire();
  Acquisition first(set), second(set);
  EXPECT_EQ(first.start([](Outcome) {}), Outcome::kPending);
  EXPECT_EQ(second.start([](Outcome) {}), Outcome::kQueueFull);
  EXPECT_EQ(db->statistics().rejected(Outcome::kQueueFull), 1u);
}

TEST(HostResource, SameNameInOneProcessSharesThePool) {
  const std::string name = unique_name("twice");
  Cleanup cleanup{name};
  auto a = host_resource(name, 1);
  auto b = host_resource(name, 1);
  Permit p = a->try_acquire();
  EXPECT_TRUE(p);
  EXPECT_FALSE(b->try_acquire());
  EXPECT_EQ(b->in_use(), 1);
}

// close() of a host resource refuses new requests only (host_resource.h):
// a request already waiting keeps waiting and may still be granted.
TEST(HostResource, CloseRefusesNewRequestsAndLeavesQueuedOnesWaiting) {
  const std::string name = unique_name("close");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  auto set = std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  Permit held = db->try_acquire();
  testing::Recorder rec;
  Acquisition waiter(set);
  ASSERT_EQ(waiter.start(rec.callback()), Outcome::kPending);
  db->close();
  EXPECT_TRUE(db->closed());
  EXPECT_EQ(db->try_acquire().outcome(), Outcome::kUnavailable);
  EXPECT_EQ(db->acquire_for(10s).outcome(), Outcome::kUnavailable);
  EXPECT_TRUE(rec.outcomes.empty());
  EXPECT_EQ(db->waiting(), 1);
  held.release();
  ASSERT_TRUE(eventually([&] { return waiter.state() == Acquisition::State::kGranted; }));
  waiter.release();
  EXPECT_EQ(db->in_use(), 0);
}

// A host resource not owned by a shared_ptr, destroyed with nothing held
// through it: no abort, and a Permit it refused still names it.
TEST(HostResource, ALocalResourceWithNothingHeldGoesQuietly) {
  const std::string name = unique_name("local-quiet");
  Cleanup cleanup{name};
  Permit refused;
  {
    Resource local(ResourceOptions{.name = name, .capacity = 1, .scope = Scope::kHost});
    Permit held = local.try_acquire();
    ASSERT_TRUE(held);
    refused = local.try_acquire();
  }
  EXPECT_EQ(refused.outcome(), Outcome::kTimeout);
  EXPECT_EQ(refused.refused_by_name(), name);
}

#if !defined(__SANITIZE_THREAD__)
// The slot would be released through freed memory: abort, naming it.
TEST(HostResourceDeathTest, DestroyingALocalResourceWithASlotHeldAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const std::string name = unique_name("local-held");
  Cleanup cleanup{name};
  EXPECT_DEATH(
      {
        Permit outlives;
        {
          Resource local(ResourceOptions{.name = name, .capacity = 2, .scope = Scope::kHost});
          outlives = local.acquire_for(1s);
        }
      },
      "host-scoped resource '.*-local-held' destroyed while slots are held");
}
#endif

TEST(HostResource, BadNamesAreRejectedNamingTheParameter) {
  for (const std::string& bad : {std::string(""), std::string("a/b"), std::string(65, 'x'),
                                std::string("sp ace"), std::string("caf\xc3\xa9")}) {
    try {
      host_resource(bad, 1);
      FAIL() << "accepted name '" << bad << "'";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("name"), std::string::npos) << e.what();
    }
  }
}

// A redeploy or a reload with another configuration: the newest process's
// configuration is in force for every process, named in its note.
TEST(HostResource, TheNewestConfigurationWins) {
  const std::string name = unique_name("newest");
  Cleanup cleanup{name};
  auto a = host_resource(name, 2);
  EXPECT_EQ(a->host_note(), "");
  Permit p1 = a->try_acquire(), p2 = a->try_acquire();
  ASSERT_TRUE(p1 && p2);
  // In this process: capacity 3 now, for both Resources; one more slot.
  auto b = host_resource(name, 3);
  EXPECT_NE(b->host_note().find("capacity=2"), std::string::npos) << b->host_note();
  EXPECT_NE(b->host_note().find("capacity=3"), std::string::npos) << b->host_note();
  EXPECT_EQ(a->capacity(), 3);
  EXPECT_EQ(a->limit(), 3);
  Permit p3 = a->try_acquire();
  EXPECT_TRUE(p3);
  EXPECT_FALSE(a->try_acquire());
  // Another process lowers it to 1: held slots stay held, none is granted
  // until all but one are back.
  Child other({"open", name, "1", "lifo"});
  EXPECT_EQ(other.line(), "ok");
  EXPECT_EQ(a->capacity(), 1);
  EXPECT_EQ(a->queue(), QueueDiscipline::kLifo);
  EXPECT_EQ(a->in_use(), 3);
  p1.release();
  p2.release();
  EXPECT_FALSE(a->try_acquire());
  p3.release();
  EXPECT_TRUE(a->try_acquire());
}

// A segment that no live process uses is replaced, whatever state it is in
// (a creator killed half-way leaves none: it is made under no name); one
// that a live process uses is refused with a clear error.
TEST(HostResource, CorruptOrForeignSegmentsAreReplacedUnlessInUse) {
  const std::string name = unique_name("corrupt");
  Cleanup cleanup{name};
  const auto write_segment = [&](std::size_t size, char fill) {
    ::unlink(shm_path(name).c_str());
    const int fd = ::open(shm_path(name).c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0);
    std::vector<char> bytes(size, fill);
    ASSERT_EQ(::write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
    ::close(fd);
  };
  ::mkdir(detail::host::segment_dir().c_str(), 0700);
  write_segment(100, 'x');
  Child small({"open", name, "1", "fifo"});
  EXPECT_EQ(small.line(), "ok");
  // What a creator killed between sizing and initialising used to leave:
  // the right size, all zeros. Replaced at once, not after a wait.
  write_segment(sizeof(detail::host::Segment), '\0');
  const auto started = std::chrono::steady_clock::now();
  Child zeros({"open", name, "1", "fifo"});
  EXPECT_EQ(zeros.line(), "ok");
  EXPECT_LT(std::chrono::steady_clock::now() - started, 1500ms);
  // A foreign header while a live process holds a liveness lock on it.
  write_segment(sizeof(detail::host::Segment), '\x5a');
  // Close-on-exec: a helper spawned meanwhile must not share its lock.
  const int user = ::open(shm_path(name).c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_TRUE(detail::host::lock_slot(user, 7));
  Child foreign({"open", name, "1", "fifo"});
  const std::string refused = foreign.line();
  EXPECT_NE(refused.find("a live process still uses it"), std::string::npos) << refused;
  EXPECT_NE(refused.find("reset --force"), std::string::npos) << refused;
  // Until the refused process has exited (slowly under a sanitizer's exit
  // checks), it too holds a liveness lock on the segment.
  EXPECT_EQ(foreign.line(), "");
  ::close(user);
  // A segment that others can read is refused too.
  Child fresh({"open", name, "1", "fifo"});
  EXPECT_EQ(fresh.line(), "ok");
  ::chmod(shm_path(name).c_str(), 0644);
  Child shared({"open", name, "1", "fifo"});
  EXPECT_NE(shared.line().find("not a file private"), std::string::npos);
}

// Garbage in the tables (not the header) must never crash a process: every
// index read from the segment is checked, and the state is rebuilt.
TEST(HostResource, GarbageInTheTablesNeverCrashes) {
  const std::string name = unique_name("garbage");
  Cleanup cleanup{name};
  auto db = host_resource(name, 2);
  Permit p = db->try_acquire();
  const int fd = ::open(shm_path(name).c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  const off_t size = ::lseek(fd, 0, SEEK_END);
  auto* bytes = static_cast<unsigned char*>(
      ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  ::close(fd);
  ASSERT_NE(bytes, MAP_FAILED);
  std::mt19937 rng(7);
  // Past the header (a few hundred bytes): the process and waiter tables.
  for (off_t i = 1024; i < size; i += 1 + static_cast<off_t>(rng() % 64)) {
    bytes[i] = static_cast<unsigned char>(rng());
  }
  for (int i = 0; i < 50; ++i) {
    Permit q = db->acquire_for(1ms);
    auto set = std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
    Acquisition a(set);
    a.start([](Outcome) {});
    a.cancel();
    a.release();
  }
  testing::sweep_host_processes(*db);
  p.release();
  (void)db->statistics();
  (void)list_host_resources();
  ::munmap(bytes, static_cast<std::size_t>(size));
}

// Waiters queued from two processes in a known order are served in the
// discipline's order.
void check_order(QueueDiscipline queue, const std::string& queue_name, bool first_wins) {
  const std::string name = unique_name("order-" + queue_name);
  Cleanup cleanup{name};
  auto db = host_resource(name, 1, queue);
  Permit held = db->try_acquire();
  ASSERT_TRUE(held);
  Child first({"wait", name, "1", queue_name, "20000", "20"});
  ASSERT_TRUE(eventually([&] { return db->waiting() == 1; }));
  Child second({"wait", name, "1", queue_name, "20000", "20"});
  ASSERT_TRUE(eventually([&] { return db->waiting() == 2; }));
  held.release();
  const std::string a = first.line(), b = second.line();
  ASSERT_EQ(a.rfind("granted ", 0), 0u) << a;
  ASSERT_EQ(b.rfind("granted ", 0), 0u) << b;
  if (first_wins) {
    EXPECT_LT(ns_of(a), ns_of(b));
  } else {
    EXPECT_GT(ns_of(a), ns_of(b));
  }
  first.join();
  second.join();
  EXPECT_EQ(db->in_use(), 0);
}

TEST(HostResource, FifoOrderAcrossProcesses) { check_order(QueueDiscipline::kFifo, "fifo", true); }
TEST(HostResource, LifoOrderAcrossProcesses) { check_order(QueueDiscipline::kLifo, "lifo", false); }

TEST(HostResource, WaiterInAnotherProcessTimesOut) {
  const std::string name = unique_name("timeout");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  Permit held = db->try_acquire();
  Child waiter({"wait", name, "1", "fifo", "50", "0"});
  EXPECT_EQ(waiter.line(), "rejected timeout");
  waiter.join();
  EXPECT_EQ(db->waiting(), 0);
  held.release();
  EXPECT_EQ(db->in_use(), 0);
}

// Death is the kernel's word (the liveness lock), not the pid's: a
// registered process whose lock nobody holds is reclaimed even though its
// pid is alive (here: this process's own pid, as after PID reuse); a live
// one is kept, whatever the sweepers see.
TEST(HostResource, PidReuseNeitherStealsNorLeaks) {
  const std::string name = unique_name("pidreuse");
  Cleanup cleanup{name};
  auto db = host_resource(name, 3);
  Permit mine = db->try_acquire();
  testing::forge_host_process(*db, ::getpid(), 1);
  Child live({"hold", name, "3", "fifo", "1", "-1"});
  ASSERT_EQ(live.line(), "ready");
  EXPECT_EQ(db->in_use(), 3);
  testing::sweep_host_processes(*db);
  EXPECT_EQ(db->in_use(), 2);  // the impostor's slot is back, nothing else
  live.kill();
  testing::sweep_host_processes(*db);
  EXPECT_EQ(db->in_use(), 1);  // the dead one's slot is back
  // This process kept its own slot throughout.
  mine.release();
  EXPECT_EQ(db->in_use(), 0);
}

// A process out of file descriptors (overload!) proves nobody dead: its
// sweeper runs and leaves every live holder alone.
TEST(HostResource, AProcessOutOfDescriptorsReclaimsNobody) {
  const std::string name = unique_name("nofds");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  Permit held = db->try_acquire();
  ASSERT_TRUE(held);
  Child starved({"nofds", name, "1", "fifo", "800"});
  ASSERT_EQ(starved.line(), "exhausted");
  EXPECT_EQ(starved.line(), "done");  // its background thread swept 4 times
  Child third({"wait", name, "1", "fifo", "200", "0"});
  EXPECT_EQ(third.line(), "rejected timeout");
  EXPECT_EQ(db->in_use(), 1);
  held.release();
  Child fourth({"wait", name, "1", "fifo", "5000", "0"});
  EXPECT_EQ(fourth.line().rfind("granted", 0), 0u);
}

// A process whose main thread exited (its /proc entry shows a zombie
// leader) is alive while another thread runs.
TEST(HostResource, AProcessWhoseMainThreadExitedIsAlive) {
  const std::string name = unique_name("mainexit");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  Child child({"mainexit", name, "1", "fifo"});
  ASSERT_EQ(child.line(), "ready");
  std::this_thread::sleep_for(600ms);  // every process's sweeper runs
  testing::sweep_host_processes(*db);
  EXPECT_EQ(db->in_use(), 1);
  EXPECT_FALSE(db->acquire_for(100ms));
  child.kill();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0; }));
}

// Containers that share /dev/shm but not a PID namespace: a process of
// another namespace neither takes nor is robbed of slots.
TEST(HostResource, AnotherPidNamespaceReclaimsNobody) {
  if (::geteuid() != 0 || ::access("/usr/bin/unshare", X_OK) != 0) {
    GTEST_SKIP() << "needs root and unshare";
  }
  const std::string name = unique_name("pidns");
  Cleanup cleanup{name};
  auto db = host_resource(name, 2);
  Permit a = db->try_acquire(), b = db->try_acquire();
  ASSERT_TRUE(a && b);
  {
    // Lives 600 ms in its own PID namespace: registered, its sweeper runs.
    Child other({"--unshare", name, "2", "fifo", "600", "0"});
    const std::string got = other.line();
    if (got.rfind("error unshare", 0) == 0) GTEST_SKIP() << got;
    EXPECT_EQ(got, "rejected timeout");
  }
  Child third({"wait", name, "2", "fifo", "200", "0"});
  EXPECT_EQ(third.line(), "rejected timeout");
  EXPECT_EQ(db->in_use(), 2);
}

// Registration happens at open; if the background thread cannot start,
// opening fails with a clear error and nothing stays registered.
TEST(HostResource, AThreadThatCannotStartFailsTheOpenAndRegistersNothing) {
  const std::string name = unique_name("nothread");
  Cleanup cleanup{name};
  testing::fail_host_thread_start(true);
  try {
    host_resource(name, 1);
    testing::fail_host_thread_start(false);
    FAIL() << "opened without a thread";
  } catch (const std::runtime_error& e) {
    testing::fail_host_thread_start(false);
    EXPECT_NE(std::string(e.what()).find("background thread"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(info_of(name).processes.empty());
  EXPECT_EQ(info_of(name).in_use, 0);
}

// SIGKILL a process that holds slots, waits, or is inside the shared lock;
// after every cycle the other processes proceed, and the invariant holds.
TEST(HostResource, CrashLoop) {
  const std::string name = unique_name("crash");
  Cleanup cleanup{name};
  constexpr std::int64_t kCapacity = 2;
  auto db = host_resource(name, kCapacity);
  Permit registered = db->try_acquire();  // registers this process (its sweeper)
  registered.release();
  std::mt19937 rng(12345);
  auto slowest = std::chrono::steady_clock::duration::zero();
  constexpr int kCycles = 200;
  for (int cycle = 0; cycle < kCycles; ++cycle) {
    const int mode = static_cast<int>(rng() % 3);
    const std::string n = std::to_string(1 + rng() % kCapacity);
    if (mode == 0) {
      // A holder dies; a waiter in a third process gets its slot.
      Child holder({"hold", name, "2", "fifo", std::to_string(kCapacity), "-1"});
      ASSERT_EQ(holder.line(), "ready") << "cycle " << cycle;
      Child waiter({"wait", name, "2", "fifo", "10000", "0"});
      ASSERT_TRUE(eventually([&] { return db->waiting() == 1; }));
      const auto killed = std::chrono::steady_clock::now();
      holder.kill();
      const std::string got = waiter.line();
      ASSERT_EQ(got.rfind("granted", 0), 0u) << "cycle " << cycle << ": " << got;
      slowest = std::max(slowest, std::chrono::steady_clock::now() - killed);
      waiter.join();
    } else if (mode == 1) {
      // A waiter dies in the queue; it leaves it.
      Permit p1 = db->try_acquire(), p2 = db->try_acquire();
      Child waiter({"wait", name, "2", "fifo", "10000", "0"});
      ASSERT_TRUE(eventually([&] { return db->waiting() == 1; })) << "cycle " << cycle;
      waiter.kill();
      const auto killed = std::chrono::steady_clock::now();
      ASSERT_TRUE(eventually([&] { return db->waiting() == 0; })) << "cycle " << cycle;
      slowest = std::max(slowest, std::chrono::steady_clock::now() - killed);
    } else {
      // A process dies inside the shared lock; the next locker repairs.
      Child locker({"lock", name, "2", "fifo"});
      ASSERT_EQ(locker.line(), "locked") << "cycle " << cycle;
      locker.kill();
      Permit p = db->acquire_for(5s);
      ASSERT_TRUE(p) << "cycle " << cycle;
    }
    ASSERT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }))
        << "cycle " << cycle << " in_use " << db->in_use();
    expect_invariant(name);
  }
  const HostResourceInfo info = info_of(name);
  EXPECT_EQ(info.in_use, 0);
  EXPECT_EQ(info.waiting, 0);
  EXPECT_GT(info.repairs, 0u);
  for (const auto& p : info.processes) EXPECT_TRUE(p.alive) << p.pid;
  std::printf("slowest recovery after a SIGKILL: %.0f ms\n",
              std::chrono::duration<double, std::milli>(slowest).count());
  EXPECT_LT(slowest, 1s);
}

// Counters in a file that the test and its child processes map (see
// kSharedCountersBytes): the requests holding a slot now and their peak,
// in total and for the classes <= each class.
class SharedCounters {
 public:
  SharedCounters() {
    fd_ = ::mkstemp(path_);
    if (fd_ >= 0 && ::ftruncate(fd_, kSharedCountersBytes) == 0) {
      void* p = ::mmap(nullptr, kSharedCountersBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
      if (p != MAP_FAILED) counter_ = static_cast<std::atomic<std::int64_t>*>(p);
    }
  }
  ~SharedCounters() {
    if (counter_ != nullptr) ::munmap(counter_, kSharedCountersBytes);
    if (fd_ >= 0) {
      ::close(fd_);
      ::unlink(path_);
    }
  }
  SharedCounters(const SharedCounters&) = delete;
  SharedCounters& operator=(const SharedCounters&) = delete;

  bool ok() const { return counter_ != nullptr; }
  const char* path() const { return path_; }
  std::int64_t running() const { return counter_[0].load(); }
  std::int64_t peak() const { return counter_[1].load(); }
  // The holders of the classes <= `c` now, and their peak.
  std::int64_t running_up_to(Priority c) const { return counter_[2 + priority_index(c)].load(); }
  std::int64_t peak_up_to(Priority c) const {
    return counter_[2 + kPriorityCount + priority_index(c)].load();
  }

  // Holds a counted slot for a random short time (as host_helper's
  // count_holder()), of class `priority` if given.
  void hold(std::mt19937& rng, std::optional<Priority> priority = std::nullopt) {
    count_hold(counter_, priority, +1);
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 500));
    count_hold(counter_, priority, -1);
  }

 private:
  char path_[32] = "/tmp/fcl-churn-XXXXXX";
  int fd_ = -1;
  std::atomic<std::int64_t>* counter_ = nullptr;
};

// Processes and threads acquiring with short random timeouts, some
// cancelled: never more holders than capacity, everything back at the end.
TEST(HostResource, ChurnAcrossProcessesAndThreads) {
  for (const auto& [queue, queue_name] :
       {std::pair{QueueDiscipline::kFifo, "fifo"}, std::pair{QueueDiscipline::kLifo, "lifo"},
        std::pair{QueueDiscipline::kAdaptive, "adaptive"}}) {
    const std::string name = unique_name(std::string("churn-") + queue_name);
    Cleanup cleanup{name};
    constexpr std::int64_t kCapacity = 3;
    auto db = std::make_shared<Resource>(ResourceOptions{.name = name,
                                                         .capacity = kCapacity,
                                                         .queue = queue,
                                                         .adaptive_target = 1ms,
                                                         .adaptive_interval = 2ms,
                                                         .scope = Scope::kHost});
    SharedCounters counter;
    ASSERT_TRUE(counter.ok());
    std::vector<std::unique_ptr<Child>> children;
    for (int i = 0; i < 2; ++i) {
      children.push_back(std::make_unique<Child>(
          std::vector<std::string>{"churn", name, "3", queue_name, "300", counter.path()}));
    }
    std::vector<std::thread> threads;
    for (int t = 0; t < 3; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937 rng(t);
        for (int i = 0; i < 300; ++i) {
          std::stop_source stop;
          std::thread canceller;
          if (i % 7 == 0) canceller = std::thread([&] { stop.request_stop(); });
          Permit p = db->acquire_for(std::chrono::microseconds(rng() % 3000), stop.get_token());
          if (canceller.joinable()) canceller.join();
          if (p) counter.hold(rng);
        }
      });
    }
    for (auto& t : threads) t.join();
    for (auto& c : children) EXPECT_EQ(c->line(60s), "done");
    EXPECT_LE(counter.peak(), kCapacity) << queue_name;
    EXPECT_GE(counter.peak(), 2) << queue_name;
    EXPECT_EQ(counter.running(), 0);
    EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }))
        << queue_name << ": in_use " << db->in_use() << ", waiting " << db->waiting();
  }
}

// ---- The limit in force and the adaptive limit, host-wide ----

std::shared_ptr<Resource> adaptive_host_resource(const std::string& name,
                                                 std::int64_t capacity) {
  return std::make_shared<Resource>(ResourceOptions{.name = name,
                                                    .capacity = capacity,
                                                    .limit_algorithm = testing_host_aimd(),
                                                    .scope = Scope::kHost});
}

TEST(HostResource, SetLimitInOneProcessIsTheLimitOfEveryProcess) {
  const std::string name = unique_name("setlimit");
  Cleanup cleanup{name};
  auto db = host_resource(name, 4);
  EXPECT_EQ(db->limit(), 4);
  db->set_limit(1);
  Child reader({"limit", name, "4", "fifo"});
  EXPECT_EQ(reader.line(), "limit 1");
  // A limit set by another process is in force here: one slot, then none.
  Child setter({"setlimit", name, "4", "fifo", "2"});
  EXPECT_EQ(setter.line(), "limit 2");
  EXPECT_EQ(db->limit(), 2);
  EXPECT_EQ(db->statistics().limit, 2);
  Permit a = db->try_acquire(), b = db->try_acquire(), c = db->try_acquire();
  EXPECT_TRUE(a);
  EXPECT_TRUE(b);
  EXPECT_FALSE(c);
  EXPECT_EQ(info_of(name).in_use, 2);
  EXPECT_EQ(info_of(name).limit, 2);
  EXPECT_FALSE(info_of(name).adaptive);
  EXPECT_THROW(db->set_limit(5), std::invalid_argument);
  EXPECT_THROW(db->set_limit(0), std::invalid_argument);
}

TEST(HostResource, RaisingTheLimitWakesAWaiterInAnotherProcess) {
  const std::string name = unique_name("raise");
  Cleanup cleanup{name};
  auto db = host_resource(name, 4);
  db->set_limit(1);
  Permit held = db->try_acquire();
  ASSERT_TRUE(held);
  Child waiter({"wait", name, "4", "fifo", "20000", "-1"});
  ASSERT_TRUE(eventually([&] { return db->waiting() == 1; }));
  // The slot is still held here: only the new limit can let the waiter in.
  db->set_limit(2);
  EXPECT_EQ(waiter.line().rfind("granted ", 0), 0u);
  EXPECT_EQ(db->in_use(), 2);
  EXPECT_EQ(db->waiting(), 0);
  // Lowering it revokes nothing; the released slot is retired.
  db->set_limit(1);
  EXPECT_EQ(db->in_use(), 2);
  Child blocked({"wait", name, "4", "fifo", "20000", "0"});
  ASSERT_TRUE(eventually([&] { return db->waiting() == 1; }));
  held.release();  // in_use 2 > limit 1: retired, not handed over
  EXPECT_EQ(db->in_use(), 1);
  EXPECT_EQ(db->waiting(), 1);
  waiter.kill();  // its slot comes back through the sweep and goes to `blocked`
  EXPECT_EQ(blocked.line().rfind("granted ", 0), 0u);
  blocked.join();
  ASSERT_TRUE(eventually([&] { return db->in_use() == 0; }));
}

TEST(HostResource, SamplesOfEveryProcessFeedOneAlgorithm) {
  const std::string name = unique_name("shared-aimd");
  Cleanup cleanup{name};
  auto db = adaptive_host_resource(name, 8);
  EXPECT_TRUE(db->adaptive());
  EXPECT_TRUE(info_of(name).adaptive);
  EXPECT_EQ(db->limit(), 8);
  // A window is 2 samples. One drop here and one in another process close
  // one window with drops: the shared limit halves. Separate algorithms
  // would each have seen half a window and kept 8.
  Permit p = db->try_acquire();
  ASSERT_TRUE(p);
  p.release(Completion::kDropped);
  EXPECT_EQ(db->limit(), 8);
  Child other({"drop", name, "8", "fifo+aimd", "1"});
  EXPECT_EQ(other.line(), "limit 4");
  EXPECT_EQ(db->limit(), 4);
  EXPECT_EQ(db->statistics().limit, 4);
  // And the other way round: two more drops from another process halve it.
  Child third({"drop", name, "8", "fifo+aimd", "2"});
  EXPECT_EQ(third.line(), "limit 2");
  EXPECT_EQ(db->limit(), 2);
  Child reader({"limit", name, "8", "fifo+aimd"});
  EXPECT_EQ(reader.line(), "limit 2");
}

// set_limit() moves the shared algorithm too: every process's samples carry
// on from the set limit, not from the algorithm's limit before it.
TEST(HostResource, SetLimitIsWhereTheSharedAlgorithmMovesOnFrom) {
  const std::string name = unique_name("setlimit-aimd");
  Cleanup cleanup{name};
  auto db = adaptive_host_resource(name, 8);
  ASSERT_EQ(db->limit(), 8);
  db->set_limit(4);
  EXPECT_EQ(db->limit(), 4);
  // Two successes close a window that used 1 of 4: no change (the
  // algorithm's own limit was 8).
  db->try_acquire().release();
  db->try_acquire().release();
  EXPECT_EQ(db->limit(), 4);
  // Two drops in another process: halved from 4.
  Child other({"drop", name, "8", "fifo+aimd", "2"});
  EXPECT_EQ(other.line(), "limit 2");
  EXPECT_EQ(db->limit(), 2);
}

TEST(HostResource, AdaptiveSettingsFollowTheNewestAndMustBeBuiltIn) {
  const std::string name = unique_name("adaptive-newest");
  Cleanup cleanup{name};
  auto db = adaptive_host_resource(name, 8);
  // Another process opens it without an algorithm: a fixed limit of 8 now.
  Child plain({"open", name, "8", "fifo"});
  ASSERT_EQ(plain.line(), "ok");
  db->acquire_for(1s).release(Completion::kDropped);
  db->acquire_for(1s).release(Completion::kDropped);
  EXPECT_EQ(db->limit(), 8);  // drops move nothing
  // And back: the tests' AIMD from its start, halved by a window of drops.
  Child aimd({"drop", name, "8", "fifo+aimd", "2"});
  EXPECT_EQ(aimd.line(), "limit 4");
  EXPECT_EQ(db->limit(), 4);

  struct Custom final : LimitAlgorithm {
    std::int64_t start(std::int64_t capacity) override { return capacity; }
    std::int64_t update(const LimitSample&) noexcept override { return 1; }
  };
  try {
    std::make_shared<Resource>(ResourceOptions{.name = unique_name("custom"),
                                               .capacity = 4,
                                               .limit_algorithm = std::make_shared<Custom>(),
                                               .scope = Scope::kHost});
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("GradientLimit, AimdLimit or FixedLimit"),
              std::string::npos)
        << e.what();
  }
}

TEST(HostResource, AProcessKilledInsideAnAlgorithmUpdateLeavesAValidState) {
  const std::string name = unique_name("die-update");
  Cleanup cleanup{name};
  auto db = adaptive_host_resource(name, 8);
  // Half a window: one dropped sample, committed.
  Permit p = db->try_acquire();
  p.release(Completion::kDropped);
  const std::uint64_t repairs = info_of(name).repairs;
  {
    Child dying({"dieupdate", name, "8", "fifo+aimd"});
    ASSERT_EQ(dying.line(), "locked");
  }  // SIGKILLed with the lock held and the uncommitted copy garbage
  // The next locker repairs; the committed state (8, one drop pending)
  // carries on: one more drop closes the window and halves the limit.
  Permit q = db->acquire_for(10s);
  ASSERT_TRUE(q);
  EXPECT_GT(info_of(name).repairs, repairs);
  q.release(Completion::kDropped);
  EXPECT_EQ(db->limit(), 4);
  for (int i = 0; i < 2; ++i) db->acquire_for(10s).release(Completion::kDropped);
  EXPECT_EQ(db->limit(), 2);
}

TEST(HostResource, GarbageInTheAlgorithmStateIsBroughtIntoRange) {
  const std::string name = unique_name("algorithm-garbage");
  Cleanup cleanup{name};
  auto db = adaptive_host_resource(name, 8);
  const int fd = ::open(shm_path(name).c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  const off_t size = ::lseek(fd, 0, SEEK_END);
  auto* bytes = static_cast<unsigned char*>(
      ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  ::close(fd);
  ASSERT_NE(bytes, MAP_FAILED);
  // The limit in force and both copies of the algorithm's state.
  const std::size_t from = offsetof(detail::host::Header, limit);
  const std::size_t to = sizeof(detail::host::Header);
  std::mt19937 rng(11);
  for (int round = 0; round < 20; ++round) {
    for (std::size_t i = from; i < to; ++i) {
      if (rng() % 4 == 0) bytes[i] = static_cast<unsigned char>(rng());
    }
    for (int i = 0; i < 6; ++i) {
      Permit q = db->acquire_for(1ms);
      if (q) q.release(i % 2 ? Completion::kDropped : Completion::kSuccess);
    }
    EXPECT_GE(db->limit(), 1);
    EXPECT_LE(db->limit(), 8);
    EXPECT_LE(db->in_use(), 8);
  }
  ::munmap(bytes, static_cast<std::size_t>(size));
}

TEST(HostResource, ResetRefusesWhileInUse) {
  const std::string name = unique_name("reset");
  Cleanup cleanup{name};
  {
    Child holder({"hold", name, "1", "fifo", "1", "-1"});
    ASSERT_EQ(holder.line(), "ready");
    try {
      remove_host_resource(name);
      FAIL();
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(std::to_string(holder.pid())), std::string::npos);
    }
  }  // killed
  remove_host_resource(name);
  EXPECT_THROW(info_of(name), std::runtime_error);
  EXPECT_THROW(remove_host_resource(name), std::runtime_error);  // nothing left to remove
}

// A process that opened a resource is registered before its first request:
// reset refuses; forced, the process attaches to a new segment at its next
// request instead of failing forever.
TEST(HostResource, AForcedResetIsSurvivedByLiveProcesses) {
  const std::string name = unique_name("reset-force");
  Cleanup cleanup{name};
  auto db = host_resource(name, 2);
  const auto mine = [&] {
    for (const auto& p : info_of(name).processes) {
      if (p.pid == ::getpid() && p.alive) return true;
    }
    return false;
  };
  EXPECT_TRUE(mine());  // registered at open, nothing acquired yet
  EXPECT_THROW(remove_host_resource(name), std::runtime_error);
  Permit before = db->try_acquire();
  ASSERT_TRUE(before);
  remove_host_resource(name, /*force=*/true);
  EXPECT_THROW(info_of(name), std::runtime_error);
  Permit after = db->acquire_for(1s);
  ASSERT_TRUE(after);
  EXPECT_TRUE(mine());
  EXPECT_EQ(db->in_use(), 2);  // what was held before the reset is carried over
  EXPECT_FALSE(db->try_acquire());
  before.release();
  EXPECT_EQ(db->in_use(), 1);
  after.release();
  EXPECT_EQ(db->in_use(), 0);
}

// A process that keeps the shared lock (stopped, hung) must not hang the
// others: requests are refused as unavailable within about a second, then
// at once, and everything works again once the lock is back.
TEST(HostResource, AHeldLockMakesRequestsUnavailableNotStuck) {
  const std::string name = unique_name("stuck-lock");
  Cleanup cleanup{name};
  auto db = host_resource(name, 2);
  Child locker({"lock", name, "2", "fifo"});
  ASSERT_EQ(locker.line(), "locked");
  const auto started = std::chrono::steady_clock::now();
  Permit first = db->acquire_for(10s);
  EXPECT_EQ(first.outcome(), Outcome::kUnavailable);
  Permit second = db->acquire_for(10s);
  EXPECT_EQ(second.outcome(), Outcome::kUnavailable);
  EXPECT_LT(std::chrono::steady_clock::now() - started, 5s);
  const auto listed = std::chrono::steady_clock::now();
  EXPECT_FALSE(info_of(name).problem.empty());
  EXPECT_LT(std::chrono::steady_clock::now() - listed, 5s);
  locker.kill();  // the lock comes back (EOWNERDEAD), repaired
  Permit later;
  EXPECT_TRUE(eventually([&] { return static_cast<bool>(later = db->acquire_for(1s)); }));
  later.release();
  EXPECT_EQ(db->in_use(), 0);
}

// A corrupt mutex (garbage in its kind) is a corrupt segment: requests are
// refused as unavailable, status and reset work, and a forced reset brings
// the live process back to a working segment. Nothing aborts.
TEST(HostResource, APoisonedMutexIsACorruptSegmentNotAnAbort) {
  const std::string name = unique_name("poison");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  const int fd = ::open(shm_path(name).c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  auto* seg = static_cast<detail::host::Segment*>(::mmap(
      nullptr, sizeof(detail::host::Segment), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  ::close(fd);
  ASSERT_NE(seg, MAP_FAILED);
  // glibc keeps the mutex kind at byte 16; 127 is no kind it knows.
  std::int32_t garbage = 127;
  std::memcpy(reinterpret_cast<char*>(&seg->header.mutex) + 16, &garbage, sizeof garbage);
  ::munmap(seg, sizeof(detail::host::Segment));
  EXPECT_EQ(db->acquire_for(1s).outcome(), Outcome::kUnavailable);
  const HostResourceInfo info = info_of(name);
  EXPECT_NE(info.problem.find("corrupt"), std::string::npos) << info.problem;
  EXPECT_THROW(remove_host_resource(name), std::runtime_error);  // this process uses it
  remove_host_resource(name, /*force=*/true);
  Permit p;
  EXPECT_TRUE(eventually([&] { return static_cast<bool>(p = db->acquire_for(1s)); }));
}

#if !defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__)
// A resource created before fork() (gunicorn --preload): the child registers
// as a process of its own. (Plain build only, as the fork tests of
// host_operations_test.cc: TSan does not support threads started after a
// multi-threaded fork, and ASan's runtime can deadlock in the child: the
// child then waited forever in a futex, 2 runs in 11 on a busy machine.)
TEST(HostResource, WorksInAForkedChild) {
  const std::string name = unique_name("fork");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  Permit held = db->try_acquire();
  const pid_t child = ::fork();
  if (child == 0) {
    Permit p = db->acquire_for(10s);  // waits for the parent's release
    const bool granted = static_cast<bool>(p);
    p.release();
    ::_exit(granted ? 0 : 1);
  }
  ASSERT_TRUE(eventually([&] { return db->waiting() == 1; }));
  held.release();
  int status = 0;
  ::waitpid(child, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_EQ(db->in_use(), 0);
}
#endif

// ---- Priority classes, host-wide ----

// A waiter in a helper process of class `cls`, queued before this returns.
std::unique_ptr<Child> queued_waiter(const std::string& name, const std::string& cls,
                                     const std::string& max_waiting = "-1",
                                     const std::string& hold_ms = "20") {
  auto child = std::make_unique<Child>(
      std::vector<std::string>{"pwait", name, "1", "fifo", max_waiting, cls, "20000", hold_ms});
  EXPECT_EQ(child->line(), "queued") << cls;
  return child;
}

// A holder here, waiters of every class in four other processes, arriving
// lowest class first but one: the slot goes to the highest class waiting
// in any process, then to the next.
TEST(HostPriority, AFreedSlotGoesToTheHighestClassWaitingInAnyProcess) {
  const std::string name = unique_name("prio-order");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  Permit held = db->try_acquire();
  ASSERT_TRUE(held);
  const std::vector<std::string> arrival{"sheddable", "critical", "critical_plus",
                                         "sheddable_plus"};
  std::vector<std::unique_ptr<Child>> waiters;
  for (const auto& cls : arrival) waiters.push_back(queued_waiter(name, cls));
  EXPECT_EQ(db->waiting(), 4);
  held.release();
  std::map<std::string, std::int64_t> granted;
  for (std::size_t k = 0; k < arrival.size(); ++k) {
    const std::string got = waiters[k]->line();
    ASSERT_EQ(got.rfind("granted ", 0), 0u) << arrival[k] << ": " << got;
    granted[arrival[k]] = ns_of(got);
  }
  EXPECT_LT(granted["critical_plus"], granted["critical"]);
  EXPECT_LT(granted["critical"], granted["sheddable_plus"]);
  EXPECT_LT(granted["sheddable_plus"], granted["sheddable"]);
  for (auto& w : waiters) w->join();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
}

// A full queue pushes out the newest waiter of the lowest class below the
// newcomer, in whichever process it waits; a newcomer of the lowest class
// is turned away.
TEST(HostPriority, AFullQueuePushesOutTheNewestLowerWaiterOfAnotherProcess) {
  const std::string name = unique_name("prio-shed");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1, QueueDiscipline::kFifo, 2);
  Permit held = db->try_acquire();
  ASSERT_TRUE(held);
  auto older = queued_waiter(name, "sheddable", "2", "0");
  auto newer = queued_waiter(name, "sheddable", "2", "0");
  auto critical = queued_waiter(name, "critical", "2", "0");
  EXPECT_EQ(newer->line(), "rejected lower_priority");
  Child late({"pwait", name, "1", "fifo", "2", "sheddable", "20000", "0"});
  EXPECT_EQ(late.line(), "rejected queue_full");
  EXPECT_EQ(db->waiting(), 2);
  // A zero-timeout try says why it would have been refused: by the full
  // queue for the lowest class; for a higher class it would have queued.
  const auto set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  EXPECT_EQ(Acquisition(set, std::nullopt, Priority::kSheddable).try_once(),
            Outcome::kQueueFull);
  EXPECT_EQ(Acquisition(set, std::nullopt, Priority::kCriticalPlus).try_once(),
            Outcome::kTimeout);
  // A newcomer of this process pushes out the other process's last
  // lower-class waiter the same way.
  Limiter limiter({db}, 10s);
  std::thread plus([&] {
    Permit p = limiter.acquire(limiter.select({db}), std::nullopt, Priority::kCriticalPlus);
    EXPECT_TRUE(p);
  });
  EXPECT_EQ(older->line(), "rejected lower_priority");
  held.release();
  plus.join();
  EXPECT_EQ(critical->line().rfind("granted ", 0), 0u);
  for (auto* c : {older.get(), newer.get(), critical.get()}) c->join();
  late.join();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
  const ResourceStatistics s = db->statistics();
  EXPECT_EQ(s.in_use, 0);
}

// A waiter of the highest class killed while queued leaves its class's
// queue: the slot goes to the lower class.
TEST(HostPriority, AKilledHighClassWaiterDoesNotBlockTheLowerClasses) {
  const std::string name = unique_name("prio-kill");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  Permit held = db->try_acquire();
  ASSERT_TRUE(held);
  auto plus = queued_waiter(name, "critical_plus");
  auto low = queued_waiter(name, "sheddable");
  plus->kill();
  ASSERT_TRUE(eventually([&] { return db->waiting() == 1; }));
  held.release();
  const std::string got = low->line();
  EXPECT_EQ(got.rfind("granted ", 0), 0u) << got;
  low->join();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
  expect_invariant(name);
}

// A process killed inside the shared lock: the repair rebuilds the queue of
// each class, so the grant order by class survives it.
TEST(HostPriority, TheRepairAfterADeathInsideTheLockKeepsTheClasses) {
  const std::string name = unique_name("prio-repair");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1);
  Permit held = db->try_acquire();
  ASSERT_TRUE(held);
  auto low = queued_waiter(name, "sheddable");
  auto plus = queued_waiter(name, "critical_plus");
  const std::uint64_t repairs = info_of(name).repairs;
  {
    Child locker({"lock", name, "1", "fifo"});
    ASSERT_EQ(locker.line(), "locked");
    locker.kill();
  }
  held.release();  // the first locker after the death repairs, then hands over
  const std::string a = plus->line(), b = low->line();
  ASSERT_EQ(a.rfind("granted ", 0), 0u) << a;
  ASSERT_EQ(b.rfind("granted ", 0), 0u) << b;
  EXPECT_LT(ns_of(a), ns_of(b));
  EXPECT_GT(info_of(name).repairs, repairs);
  plus->join();
  low->join();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
}

// Processes and threads acquiring with random classes, short random
// timeouts and cancellations through a bounded queue (so waiters are pushed
// out for higher classes): never more holders than capacity, everything
// back at the end.
TEST(HostPriority, ChurnWithRandomClassesAcrossProcessesAndThreads) {
  const std::string name = unique_name("prio-churn");
  Cleanup cleanup{name};
  constexpr std::int64_t kCapacity = 2;
  auto db = std::make_shared<Resource>(ResourceOptions{.name = name,
                                                       .capacity = kCapacity,
                                                       .max_waiting = 1,  // as host_helper pchurn
                                                       .adaptive_target = 1ms,
                                                       .adaptive_interval = 2ms,
                                                       .scope = Scope::kHost});
  SharedCounters counter;
  ASSERT_TRUE(counter.ok());
  std::vector<std::unique_ptr<Child>> children;
  for (int i = 0; i < 2; ++i) {
    children.push_back(std::make_unique<Child>(
        std::vector<std::string>{"pchurn", name, "2", "fifo", "300", counter.path()}));
  }
  Limiter limiter({db}, 1s);
  const auto set = limiter.select({db});
  std::atomic<int> pushed_out{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 300; ++i) {
        std::stop_source stop;
        std::thread canceller;
        if (i % 7 == 0) canceller = std::thread([&] { stop.request_stop(); });
        const auto priority = static_cast<Priority>(rng() % kPriorityCount);
        Permit p = limiter.acquire_for(set, std::nullopt, priority,
                                       std::chrono::microseconds(rng() % 3000), stop.get_token());
        if (canceller.joinable()) canceller.join();
        if (p.outcome() == Outcome::kLowerPriority) pushed_out.fetch_add(1);
        if (p) counter.hold(rng);
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& c : children) EXPECT_EQ(c->line(60s), "done");
  EXPECT_LE(counter.peak(), kCapacity);
  EXPECT_GE(counter.peak(), 2);
  EXPECT_EQ(counter.running(), 0);
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }))
      << "in_use " << db->in_use() << ", waiting " << db->waiting();
  expect_invariant(name);
  std::printf("waiters pushed out for a higher class here: %d\n", pushed_out.load());
}

// The machine-wide waiter table (kMaxWaiters entries) full of sheddable
// waiters of this process: a critical newcomer of another process takes the
// place of the newest of them, which is told kLowerPriority here (by this
// process's background thread), and waits; a sheddable newcomer is turned
// away (kQueueFull), as a try of that class is; a critical_plus newcomer of
// this process pushes out the next newest the same way. Then the grants go
// by class.
TEST(HostPriority, AFullWaiterTableMakesRoomForAHigherClassInAnyProcess) {
  const std::string name = unique_name("prio-table");
  Cleanup cleanup{name};
  constexpr std::int64_t kTable = detail::host::kMaxWaiters;
  auto db = host_resource(name, 1, QueueDiscipline::kFifo, kTable);
  Permit held = db->try_acquire();
  ASSERT_TRUE(held);
  const auto set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  // kMaxWaiters sheddable waiters in this process, without threads; the
  // index of each one pushed out, in order.
  struct PushedOut {
    std::mutex mu;
    std::vector<std::int64_t> which;
  };
  auto pushed_out = std::make_shared<PushedOut>();
  const auto count = [&] {
    std::lock_guard lock(pushed_out->mu);
    return pushed_out->which.size();
  };
  std::vector<std::unique_ptr<Acquisition>> waiters;
  for (std::int64_t k = 0; k < kTable; ++k) {
    waiters.push_back(std::make_unique<Acquisition>(set, std::nullopt, Priority::kSheddable));
    ASSERT_EQ(waiters.back()->start([pushed_out, k](Outcome o) {
      if (o != Outcome::kLowerPriority) return;
      std::lock_guard lock(pushed_out->mu);
      pushed_out->which.push_back(k);
    }),
              Outcome::kPending);
  }
  ASSERT_EQ(db->waiting(), kTable);
  Child newcomer({"pwait", name, "1", "fifo", std::to_string(kTable), "critical", "20000", "0"});
  ASSERT_EQ(newcomer.line(), "queued");
  ASSERT_TRUE(eventually([&] { return count() == 1; }));
  EXPECT_EQ(pushed_out->which[0], kTable - 1);  // the newest
  EXPECT_EQ(db->waiting(), kTable);
  Child late({"pwait", name, "1", "fifo", std::to_string(kTable), "sheddable", "20000", "0"});
  EXPECT_EQ(late.line(), "rejected queue_full");
  EXPECT_EQ(Acquisition(set, std::nullopt, Priority::kSheddable).try_once(),
            Outcome::kQueueFull);
  EXPECT_EQ(Acquisition(set, std::nullopt, Priority::kCriticalPlus).try_once(),
            Outcome::kTimeout);  // it would have waited
  auto plus_outcome = std::make_shared<std::atomic<int>>(-1);
  Acquisition plus(set, std::nullopt, Priority::kCriticalPlus);
  EXPECT_EQ(plus.start([plus_outcome](Outcome o) { plus_outcome->store(static_cast<int>(o)); }),
            Outcome::kPending);
  ASSERT_EQ(count(), 2u);  // told at once: it waited in this process
  EXPECT_EQ(pushed_out->which[1], kTable - 2);
  EXPECT_EQ(db->waiting(), kTable);
  for (auto& w : waiters) w->cancel();
  EXPECT_EQ(db->waiting(), 2);
  held.release();
  EXPECT_EQ(plus_outcome->load(), static_cast<int>(Outcome::kGranted));
  plus.release();
  EXPECT_EQ(newcomer.line().rfind("granted ", 0), 0u);
  newcomer.join();
  late.join();
  EXPECT_EQ(count(), 2u);
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
  expect_invariant(name);
}

// A try (zero timeout) on a host resource with max_waiting=0
// that finds no free slot reports kTimeout, while a waiting acquire is
// refused kQueueFull; before this change (and in process scope) the try
// reported kQueueFull too. queue_full_for() returns false whenever nobody
// waits (h.waiting == 0), which with max_waiting 0 is always.
TEST(HostPriority, ATryOnAQueuelessHostResourceSaysQueueFullAsAnAcquireDoes) {
  const std::string name = unique_name("prio-queueless");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1, QueueDiscipline::kFifo, 0);
  Permit held = db->try_acquire();
  ASSERT_TRUE(held);
  EXPECT_EQ(db->acquire_for(100ms).outcome(), Outcome::kQueueFull);
  const auto set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  EXPECT_EQ(Acquisition(set).try_once(), Outcome::kQueueFull);
  EXPECT_EQ(Acquisition(set, std::nullopt, Priority::kCriticalPlus).try_once(),
            Outcome::kQueueFull);
  // Process scope, same options: kQueueFull.
  auto local = std::make_shared<Resource>(ResourceOptions{.capacity = 1, .max_waiting = 0});
  Permit local_held = local->try_acquire();
  const auto local_set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{local});
  EXPECT_EQ(Acquisition(local_set).try_once(), Outcome::kQueueFull);
}

// A standing adaptive queue sheds (kShed) its oldest waiters of
// any class, here the only CRITICAL_PLUS waiter, the very one the next
// freed slot would go to, while a SHEDDABLE waiter stays queued. The
// issue's rule: a class is shed only once every lower one is. (Process
// scope does the same: resource.cc shed_locked() sheds head_.)
TEST(HostPriority, AStandingAdaptiveQueueShedsNoHigherClassBeforeTheLowerOnes) {
  for (const Scope scope : {Scope::kHost, Scope::kProcess}) {
  const std::string name = unique_name("prio-adaptive");
  Cleanup cleanup{name};
  auto db = std::make_shared<Resource>(ResourceOptions{.name = name,
                                                       .capacity = 1,
                                                       .queue = QueueDiscipline::kAdaptive,
                                                       .adaptive_target = 1ms,
                                                       .adaptive_interval = 2ms,
                                                       .scope = scope});
  Permit held = db->try_acquire();
  ASSERT_TRUE(held);
  const auto set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  std::map<std::string, std::shared_ptr<std::atomic<int>>> outcome;
  std::vector<std::unique_ptr<Acquisition>> acqs;
  const auto start = [&](const std::string& label, Priority p) {
    auto o = std::make_shared<std::atomic<int>>(-1);
    outcome[label] = o;
    acqs.push_back(std::make_unique<Acquisition>(set, std::nullopt, p));
    EXPECT_EQ(acqs.back()->start([o](Outcome r) { o->store(static_cast<int>(r)); }),
              Outcome::kPending);
  };
  start("critical_plus", Priority::kCriticalPlus);
  start("sheddable-old", Priority::kSheddable);
  std::this_thread::sleep_for(30ms);  // the queue stands
  start("sheddable-new", Priority::kSheddable);
  std::this_thread::sleep_for(50ms);
  const auto seen = [&](const std::string& label) {
    const int o = outcome[label]->load();
    return o < 0 ? std::string("pending") : std::string(to_string(static_cast<Outcome>(o)));
  };
  // Whatever is shed, no CRITICAL_PLUS request is while a SHEDDABLE one waits.
  if (seen("critical_plus") == "shed") {
    EXPECT_NE(seen("sheddable-new"), "pending")
        << "critical_plus shed while a sheddable request still waits ("
        << (scope == Scope::kHost ? "host" : "process") << " scope)";
  }
  for (auto& a : acqs) a->cancel();
  held.release();
  for (auto& a : acqs) a->release();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
  }
}


// A damaged class byte, and timeouts of
// a waiter of each class.
detail::host::Segment* map_segment_rw(const std::string& name) {
  const int fd = ::open(shm_path(name).c_str(), O_RDWR);
  if (fd < 0) return nullptr;
  void* p = ::mmap(nullptr, sizeof(detail::host::Segment), PROT_READ | PROT_WRITE, MAP_SHARED,
                   fd, 0);
  ::close(fd);
  return p == MAP_FAILED ? nullptr : static_cast<detail::host::Segment*>(p);
}

TEST(HostPriorityChecks, ADamagedClassByteLeavesNothingStuck) {
  for (const std::uint32_t garbage : {3u, 1u, 0xffffffffu}) {
    const std::string name = unique_name("prio-damage");
    Cleanup cleanup{name};
    auto db = host_resource(name, 1);
    Permit held = db->try_acquire();
    ASSERT_TRUE(held);
    auto a = queued_waiter(name, "sheddable", "-1", "5");
    auto b = queued_waiter(name, "sheddable", "-1", "5");
    auto c = queued_waiter(name, "sheddable_plus", "-1", "5");
    auto* seg = map_segment_rw(name);
    ASSERT_NE(seg, nullptr);
    // The head of the sheddable queue, and the tail, claim another class.
    const auto& q = seg->header.queues[0];
    seg->entries[q.head].priority = garbage;
    seg->entries[q.tail].priority = garbage;
    ::munmap(seg, sizeof(detail::host::Segment));
    held.release();
    for (auto* w : {a.get(), b.get(), c.get()}) {
      const std::string got = w->line();
      EXPECT_EQ(got.rfind("granted ", 0), 0u) << garbage << ": " << got;
    }
    for (auto* w : {a.get(), b.get(), c.get()}) w->join();
    EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
    expect_invariant(name);
  }
}

TEST(HostPriorityChecks, AWaiterOfEachClassTimesOutAndLeavesNothing) {
  const std::string name = unique_name("prio-timeouts");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1, QueueDiscipline::kLifo, 8);
  Permit held = db->try_acquire();
  ASSERT_TRUE(held);
  std::vector<std::unique_ptr<Child>> waiters;
  for (const char* cls : {"critical_plus", "sheddable", "critical", "sheddable_plus"}) {
    waiters.push_back(std::make_unique<Child>(
        std::vector<std::string>{"pwait", name, "1", "lifo", "8", cls, "200", "0"}));
    EXPECT_EQ(waiters.back()->line(), "queued");
  }
  for (auto& w : waiters) EXPECT_EQ(w->line(), "rejected timeout");
  for (auto& w : waiters) w->join();
  EXPECT_EQ(db->waiting(), 0);
  held.release();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
  expect_invariant(name);
}

TEST(HostPriorityChecks, LifoAcrossProcessesServesTheNewestOfTheHighestClass) {
  const std::string name = unique_name("prio-lifo");
  Cleanup cleanup{name};
  auto db = host_resource(name, 1, QueueDiscipline::kLifo);
  Permit held = db->try_acquire();
  ASSERT_TRUE(held);
  const std::vector<std::string> arrival{"sheddable", "critical", "sheddable", "critical"};
  std::vector<std::unique_ptr<Child>> waiters;
  for (const auto& cls : arrival) {
    waiters.push_back(std::make_unique<Child>(
        std::vector<std::string>{"pwait", name, "1", "lifo", "-1", cls, "20000", "20"}));
    ASSERT_EQ(waiters.back()->line(), "queued");
  }
  held.release();
  std::vector<std::int64_t> at;
  for (auto& w : waiters) {
    const std::string got = w->line();
    ASSERT_EQ(got.rfind("granted ", 0), 0u) << got;
    at.push_back(ns_of(got));
  }
  EXPECT_LT(at[3], at[1]);  // critical, newest first
  EXPECT_LT(at[1], at[2]);  // then sheddable, newest first
  EXPECT_LT(at[2], at[0]);
  for (auto& w : waiters) w->join();
  expect_invariant(name);
}

// ---- Reserves and per-class statistics, host-wide ----

std::shared_ptr<Resource> reserved_host_resource(const std::string& name, std::int64_t capacity,
                                                 std::array<std::int64_t, kPriorityCount> reserve,
                                                 std::optional<std::int64_t> max_waiting = {}) {
  return std::make_shared<Resource>(ResourceOptions{.name = name,
                                                    .capacity = capacity,
                                                    .max_waiting = max_waiting,
                                                    .adaptive_target = 1ms,
                                                    .adaptive_interval = 2ms,
                                                    .scope = Scope::kHost,
                                                    .reserve = reserve});
}

// One slot of 3 kept for critical_plus: two critical holders in one
// process, then a sheddable and a critical waiter in two others stay
// queued while the reserved slot is free; a critical_plus request in a
// fourth process takes it at once. Freed slots go to the waiters, never
// the reserved one.
TEST(HostReserve, AReserveIsNeverLentToALowerClassAcrossProcesses) {
  const std::string name = unique_name("res-lend");
  Cleanup cleanup{name};
  const std::string queue = "fifo+r0,0,0,1";
  auto db = reserved_host_resource(name, 3, {0, 0, 0, 1});
  Child holders({"phold", name, "3", queue, "2", "critical", "-1"});
  ASSERT_EQ(holders.line(), "ready");
  Child low({"pwait", name, "3", queue, "-1", "sheddable", "20000", "0"});
  ASSERT_EQ(low.line(), "queued");
  Child mid({"pwait", name, "3", queue, "-1", "critical", "20000", "0"});
  ASSERT_EQ(mid.line(), "queued");
  EXPECT_EQ(db->in_use(), 2);
  EXPECT_EQ(db->waiting(), 2);
  // A try of either class here is refused too: the free slot is not theirs.
  const auto set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  EXPECT_EQ(Acquisition(set, std::nullopt, Priority::kCritical).try_once(), Outcome::kTimeout);
  {
    Child top({"pwait", name, "3", queue, "-1", "critical_plus", "20000", "0"});
    const std::string got = top.line();
    EXPECT_EQ(got.rfind("granted ", 0), 0u) << "critical_plus waited: " << got;
    top.join();
  }
  // Given back: still the reserve's, the waiters still wait.
  ASSERT_TRUE(eventually([&] { return db->in_use() == 2; }));
  EXPECT_EQ(db->waiting(), 2);
  // The holders die: both waiters get a slot (the classes <= critical may
  // hold 2), the reserved one stays free.
  holders.kill();
  const std::string a = mid.line(), b = low.line();
  ASSERT_EQ(a.rfind("granted ", 0), 0u) << a;
  ASSERT_EQ(b.rfind("granted ", 0), 0u) << b;
  mid.join();
  low.join();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
  expect_invariant(name);
}

// A holder of the reserved slot killed with SIGKILL: the slot goes back to
// its class (critical_plus), not to the critical class, whose waiter stays
// queued; a critical_plus request takes it at once.
TEST(HostReserve, AKilledHolderOfAReservedSlotGivesItBackToItsClass) {
  const std::string name = unique_name("res-kill");
  Cleanup cleanup{name};
  const std::string queue = "fifo+r0,0,0,1";
  auto db = reserved_host_resource(name, 2, {0, 0, 0, 1});
  Child top({"phold", name, "2", queue, "1", "critical_plus", "-1"});
  ASSERT_EQ(top.line(), "ready");
  Child mid({"phold", name, "2", queue, "1", "critical", "-1"});
  ASSERT_EQ(mid.line(), "ready");
  Child waiter({"pwait", name, "2", queue, "-1", "critical", "20000", "0"});
  ASSERT_EQ(waiter.line(), "queued");
  constexpr auto CP = priority_index(Priority::kCriticalPlus);
  constexpr auto C = priority_index(Priority::kCritical);
  EXPECT_EQ(db->statistics().classes[CP].in_use, 1);
  top.kill();
  ASSERT_TRUE(eventually([&] { return db->in_use() == 1; }));
  const ResourceStatistics s = db->statistics();
  EXPECT_EQ(s.classes[CP].in_use, 0);
  EXPECT_EQ(s.classes[C].in_use, 1);
  EXPECT_EQ(s.classes[C].waiting, 1) << "the critical waiter took the reserved slot";
  const auto set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  Acquisition plus(set, std::nullopt, Priority::kCriticalPlus);
  EXPECT_EQ(plus.try_once(), Outcome::kGranted);
  plus.release();
  mid.kill();
  const std::string got = waiter.line();
  EXPECT_EQ(got.rfind("granted ", 0), 0u) << got;
  waiter.join();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
  expect_invariant(name);
}

// A process killed inside the shared lock: the repair rebuilds each
// class's count from the slots each process holds, so the reserve still
// holds afterwards.
TEST(HostReserve, TheRepairAfterADeathInsideTheLockKeepsEachClassesSlots) {
  const std::string name = unique_name("res-repair");
  Cleanup cleanup{name};
  const std::string queue = "fifo+r0,0,0,1";
  auto db = reserved_host_resource(name, 3, {0, 0, 0, 1});
  Child top({"phold", name, "3", queue, "1", "critical_plus", "-1"});
  ASSERT_EQ(top.line(), "ready");
  Child mid({"phold", name, "3", queue, "2", "critical", "-1"});
  ASSERT_EQ(mid.line(), "ready");
  const std::uint64_t repairs = info_of(name).repairs;
  {
    Child locker({"lock", name, "3", queue});
    ASSERT_EQ(locker.line(), "locked");
    locker.kill();
  }
  constexpr auto CP = priority_index(Priority::kCriticalPlus);
  constexpr auto C = priority_index(Priority::kCritical);
  const ResourceStatistics s = db->statistics();  // the first locker repairs
  EXPECT_GT(info_of(name).repairs, repairs);
  EXPECT_EQ(s.classes[CP].in_use, 1);
  EXPECT_EQ(s.classes[C].in_use, 2);
  // The critical_plus holder dies: its slot is critical_plus's again, and
  // a critical request may not take it.
  top.kill();
  ASSERT_TRUE(eventually([&] { return db->in_use() == 2; }));
  const auto set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  EXPECT_EQ(Acquisition(set, std::nullopt, Priority::kCritical).try_once(), Outcome::kTimeout);
  Acquisition plus(set, std::nullopt, Priority::kCriticalPlus);
  EXPECT_EQ(plus.try_once(), Outcome::kGranted);
  plus.release();
  mid.kill();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
}

// Every process must pass the same reserves: another is refused, naming
// both (in another process and in this one); the same ones are fine.
TEST(HostReserve, MismatchedReservesAreRefusedNamingBoth) {
  const std::string name = unique_name("res-mismatch");
  Cleanup cleanup{name};
  auto db = reserved_host_resource(name, 4, {0, 0, 0, 1});
  {
    Child other({"open", name, "4", "fifo+r0,0,2,0"});
    const std::string got = other.line();
    EXPECT_EQ(got.rfind("error reserve of host resource '" + name + "'", 0), 0u) << got;
    EXPECT_NE(got.find("have reserve={critical_plus: 1}"), std::string::npos) << got;
    EXPECT_NE(got.find("asks for reserve={critical: 2}"), std::string::npos) << got;
  }
  {
    Child none({"open", name, "4", "fifo"});
    const std::string got = none.line();
    EXPECT_NE(got.find("asks for reserve={}"), std::string::npos) << got;
  }
  {
    Child same({"open", name, "4", "fifo+r0,0,0,1"});
    EXPECT_EQ(same.line(), "ok");
  }
  try {
    reserved_host_resource(name, 4, {0, 1, 0, 0});
    ADD_FAILURE() << "other reserves accepted in the same process";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("asks for reserve={sheddable_plus: 1}"),
              std::string::npos)
        << e.what();
  }
  // Nothing was replaced: the reserve still holds.
  EXPECT_EQ(db->reserve()[priority_index(Priority::kCriticalPlus)], 1);
  EXPECT_EQ(info_of(name).capacity, 4);
}

// Per-class statistics of a host resource: in_use and waiting machine-wide,
// acquired and rejected counting this process's requests.
TEST(HostReserve, StatisticsPerClassAcrossTwoProcesses) {
  const std::string name = unique_name("res-stats");
  Cleanup cleanup{name};
  auto db = host_resource(name, 2);
  Child holder({"phold", name, "2", "fifo", "1", "sheddable", "-1"});
  ASSERT_EQ(holder.line(), "ready");
  Limiter limiter({db}, 10s);
  const auto set = limiter.select({db});
  Permit mine = limiter.acquire(set, std::nullopt, Priority::kCriticalPlus);
  ASSERT_TRUE(mine);
  Child waiter({"pwait", name, "2", "fifo", "-1", "sheddable_plus", "20000", "0"});
  ASSERT_EQ(waiter.line(), "queued");
  EXPECT_EQ(Acquisition(set, std::nullopt, Priority::kSheddable).try_once(), Outcome::kTimeout);
  constexpr auto S = priority_index(Priority::kSheddable);
  constexpr auto SP = priority_index(Priority::kSheddablePlus);
  constexpr auto C = priority_index(Priority::kCritical);
  constexpr auto CP = priority_index(Priority::kCriticalPlus);
  const ResourceStatistics s = db->statistics();
  EXPECT_EQ(s.in_use, 2);
  EXPECT_EQ(s.classes[S].in_use, 1);  // the other process's
  EXPECT_EQ(s.classes[CP].in_use, 1);
  EXPECT_EQ(s.classes[C].in_use, 0);
  EXPECT_EQ(s.classes[SP].waiting, 1);
  EXPECT_EQ(s.classes[C].waiting, 0);
  EXPECT_EQ(s.classes[CP].acquired_total, 1);
  EXPECT_EQ(s.classes[S].acquired_total, 0);  // granted in the other process
  EXPECT_EQ(s.classes[C].acquired_total, 0);
  EXPECT_EQ(s.classes[S].rejected(Outcome::kTimeout), 1);
  EXPECT_EQ(s.classes[C].rejected(Outcome::kTimeout), 0);
  mine.release();
  const std::string got = waiter.line();
  EXPECT_EQ(got.rfind("granted ", 0), 0u) << got;
  waiter.join();
  holder.kill();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
  for (const ClassStatistics& c : db->statistics().classes) EXPECT_EQ(c.in_use, 0);
}

// The churn of HostPriority.ChurnWithRandomClassesAcrossProcessesAndThreads
// with reserves (capacity 4, one slot each kept for critical and
// critical_plus): the classes <= sheddable_plus never hold more than 2
// slots, those <= critical never more than 3; nothing held or queued
// afterwards, in any class.
TEST(HostReserve, ChurnWithRandomClassesAndReservesAcrossProcessesAndThreads) {
  const std::string name = unique_name("res-churn");
  Cleanup cleanup{name};
  constexpr std::int64_t kCapacity = 4;
  auto db = reserved_host_resource(name, kCapacity, {0, 0, 1, 1}, 1);  // as pchurn
  SharedCounters counter;
  ASSERT_TRUE(counter.ok());
  std::vector<std::unique_ptr<Child>> children;
  for (int i = 0; i < 2; ++i) {
    children.push_back(std::make_unique<Child>(std::vector<std::string>{
        "pchurn", name, "4", "fifo+r0,0,1,1", "200", counter.path()}));
  }
  Limiter limiter({db}, 1s);
  const auto set = limiter.select({db});
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 200; ++i) {
        std::stop_source stop;
        std::thread canceller;
        if (i % 7 == 0) canceller = std::thread([&] { stop.request_stop(); });
        const auto priority = static_cast<Priority>(rng() % kPriorityCount);
        Permit p = limiter.acquire_for(set, std::nullopt, priority,
                                       std::chrono::microseconds(rng() % 3000), stop.get_token());
        if (canceller.joinable()) canceller.join();
        if (p) counter.hold(rng, priority);
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& c : children) EXPECT_EQ(c->line(60s), "done");
  EXPECT_LE(counter.peak(), kCapacity);
  EXPECT_LE(counter.peak_up_to(Priority::kSheddable), 2);
  EXPECT_LE(counter.peak_up_to(Priority::kSheddablePlus), 2);
  EXPECT_LE(counter.peak_up_to(Priority::kCritical), 3);
  EXPECT_LE(counter.peak_up_to(Priority::kCriticalPlus), kCapacity);
  EXPECT_GE(counter.peak(), 2);
  EXPECT_EQ(counter.running(), 0);
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }))
      << "in_use " << db->in_use() << ", waiting " << db->waiting();
  const ResourceStatistics s = db->statistics();
  for (std::size_t c = 0; c < kPriorityCount; ++c) {
    EXPECT_EQ(s.classes[c].in_use, 0) << c;
    EXPECT_EQ(s.classes[c].waiting, 0) << c;
  }
  expect_invariant(name);
  std::printf("peak holders, classes <= sheddable_plus: %lld, <= critical: %lld\n",
              static_cast<long long>(counter.peak_up_to(Priority::kSheddablePlus)),
              static_cast<long long>(counter.peak_up_to(Priority::kCritical)));
}

// Early rejection on host scope: a holder in one process, 100 sheddable
// waiters (no deadline) in another, and this process's own service
// estimate, at least 100 ms (one hold). A sheddable newcomer with 1 s left
// is predicted to wait >= 100 / 1 x 0.1 s = 10 s: refused at arrival
// (kPredictedTimeout, not queued). A critical_plus newcomer with the same
// second is not: no waiter of its class or above is ahead of it. A
// sheddable one with a minute waits, and is granted once the others are
// gone.
TEST(HostEarlyReject, RefusesAtArrivalFromTheWaitersOfEveryProcess) {
  const std::string name = unique_name("early");
  Cleanup cleanup{name};
  auto db = std::make_shared<Resource>(ResourceOptions{
      .name = name, .capacity = 1, .scope = Scope::kHost, .early_reject = true});
  EXPECT_TRUE(db->early_reject());
  EXPECT_FALSE(db->statistics().service_seconds.has_value());  // no hold yet
  {
    Permit p = db->try_acquire();
    ASSERT_TRUE(p);
    std::this_thread::sleep_for(100ms);
  }
  const std::optional<double> estimate = db->statistics().service_seconds;
  ASSERT_TRUE(estimate.has_value());
  EXPECT_GE(*estimate, 0.1);
  Child holder({"hold", name, "1", "fifo", "1", "-1"});
  ASSERT_EQ(holder.line(), "ready");
  Child queue({"pqueue", name, "1", "fifo", "100", "sheddable"});
  ASSERT_EQ(queue.line(), "queued");
  ASSERT_EQ(db->waiting(), 100);
  const auto set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  const auto ignore = [](Outcome) {};
  Acquisition hasty(set, std::nullopt, Priority::kSheddable);
  EXPECT_EQ(hasty.start(ignore, Clock::now() + 1s), Outcome::kPredictedTimeout);
  // The wait it predicted: every one of the 100 ahead (one class, FIFO).
  ASSERT_TRUE(hasty.predicted_wait().has_value());
  EXPECT_DOUBLE_EQ(*hasty.predicted_wait(), 100.0 * *estimate);
  EXPECT_EQ(db->waiting(), 100);
  Acquisition plus(set, std::nullopt, Priority::kCriticalPlus);
  EXPECT_EQ(plus.start(ignore, Clock::now() + 1s), Outcome::kPending);
  plus.cancel();
  auto outcome = std::make_shared<std::atomic<int>>(-1);
  Acquisition patient(set, std::nullopt, Priority::kSheddable);
  EXPECT_EQ(patient.start([outcome](Outcome o) { outcome->store(static_cast<int>(o)); },
                          Clock::now() + 60s),
            Outcome::kPending);
  queue.kill();
  holder.kill();  // their waits and slot are reclaimed: the patient one is next
  EXPECT_TRUE(eventually([&] { return outcome->load() >= 0; }));
  EXPECT_EQ(outcome->load(), static_cast<int>(Outcome::kGranted));
  patient.release();
  const ResourceStatistics s = db->statistics();
  EXPECT_EQ(s.rejected_total[rejection_index(Outcome::kPredictedTimeout)], 1u);
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
}

}  // namespace
// With reserves, early rejection counts the waiters of the newcomer's own
// class over the slots that class may use, as a Resource does: capacity 2,
// one slot kept for critical_plus, so 40 sheddable waiters ahead take 40
// turns of the one slot sheddable requests may use (not 20 of the two). A
// sheddable newcomer whose time left is 0.75x that prediction is refused at
// once; one with 1.25x waits.
TEST(HostEarlyReject, CountsItsOwnClassOverTheSlotsTheReservesLeaveIt) {
  const std::string name = unique_name("early_reserve");
  Cleanup cleanup{name};
  auto db = std::make_shared<Resource>(ResourceOptions{.name = name,
                                                       .capacity = 2,
                                                       .scope = Scope::kHost,
                                                       .early_reject = true,
                                                       .reserve = {0, 0, 0, 1}});
  {
    Permit p = db->try_acquire();
    ASSERT_TRUE(p);
    std::this_thread::sleep_for(100ms);
  }
  Child holder({"phold", name, "2", "fifo+r0,0,0,1", "2", "critical_plus", "-1"});
  ASSERT_EQ(holder.line(), "ready");
  Child queue({"pqueue", name, "2", "fifo+r0,0,0,1", "40", "sheddable"});
  ASSERT_EQ(queue.line(), "queued");
  ASSERT_EQ(db->waiting(), 40);
  const std::optional<double> estimate = db->statistics().service_seconds;
  ASSERT_TRUE(estimate.has_value());
  const double predicted = 40.0 * *estimate;  // 40 turns of the one slot
  const auto set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  const auto ignore = [](Outcome) {};
  const auto in = [](double s) {
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                              std::chrono::duration<double>(s));
  };
  Acquisition hasty(set, std::nullopt, Priority::kSheddable);
  EXPECT_EQ(hasty.start(ignore, in(0.75 * predicted)), Outcome::kPredictedTimeout);
  // What it is told counts the whole queue ahead, not only as far as the
  // decision needed.
  ASSERT_TRUE(hasty.predicted_wait().has_value());
  EXPECT_DOUBLE_EQ(*hasty.predicted_wait(), predicted);
  Acquisition patient(set, std::nullopt, Priority::kSheddable);
  EXPECT_EQ(patient.start(ignore, in(1.25 * predicted)), Outcome::kPending);
  patient.cancel();
  EXPECT_EQ(db->waiting(), 40);
  queue.kill();
  holder.kill();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
}

// The estimate of service time is the machine's, fed by the holds of every
// process: a worker whose one hold was slow (a cold start: 1 s) learns from
// the quick holds of the others (40 of about 0 s) and does not go on
// predicting a wait of 3 x 1 s behind three waiters; a process that only
// counted its own holds would refuse every request for good, never holding
// again to learn otherwise.
TEST(HostEarlyReject, TheEstimateLearnsFromTheHoldsOfEveryProcess) {
  const std::string name = unique_name("early_shared");
  Cleanup cleanup{name};
  auto db = std::make_shared<Resource>(ResourceOptions{
      .name = name, .capacity = 1, .scope = Scope::kHost, .early_reject = true});
  {
    Permit p = db->try_acquire();
    ASSERT_TRUE(p);
    std::this_thread::sleep_for(1s);
  }
  ASSERT_GE(db->statistics().service_seconds.value_or(0.0), 1.0);
  Child quick({"drop", name, "1", "fifo", "40"});  // 40 holds of about 0 s
  EXPECT_EQ(quick.line().rfind("limit ", 0), 0u);
  quick.join();
  const std::optional<double> estimate = db->statistics().service_seconds;
  ASSERT_TRUE(estimate.has_value());
  EXPECT_LT(*estimate, 0.2);  // (15/16)^40 of 1 s, and 40 quick holds
  Child holder({"hold", name, "1", "fifo", "1", "-1"});
  ASSERT_EQ(holder.line(), "ready");
  Child queue({"pqueue", name, "1", "fifo", "3", "critical"});
  ASSERT_EQ(queue.line(), "queued");
  const auto set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  Acquisition mine(set);
  EXPECT_EQ(mine.start([](Outcome) {}, Clock::now() + 1s), Outcome::kPending);
  mine.cancel();
  queue.kill();
  holder.kill();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
}

// LIFO across processes: the newcomer's own class is not ahead of it, the
// classes above are.
TEST(HostEarlyReject, LifoCountsNoWaiterOfItsOwnClass) {
  const std::string name = unique_name("early-lifo");
  Cleanup cleanup{name};
  auto db = std::make_shared<Resource>(ResourceOptions{.name = name,
                                                       .capacity = 1,
                                                       .queue = QueueDiscipline::kLifo,
                                                       .scope = Scope::kHost,
                                                       .early_reject = true});
  {
    Permit p = db->try_acquire();
    ASSERT_TRUE(p);
    std::this_thread::sleep_for(100ms);
  }
  Child holder({"hold", name, "1", "lifo", "1", "-1"});
  ASSERT_EQ(holder.line(), "ready");
  Child queue({"pqueue", name, "1", "lifo", "100", "sheddable"});
  ASSERT_EQ(queue.line(), "queued");
  Child high({"pqueue", name, "1", "lifo", "30", "critical"});
  ASSERT_EQ(high.line(), "queued");
  const auto set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  const auto ignore = [](Outcome) {};
  Acquisition same(set, std::nullopt, Priority::kSheddable);  // 30 ahead: 3 s > 1 s
  EXPECT_EQ(same.start(ignore, Clock::now() + 1s), Outcome::kPredictedTimeout);
  Acquisition crit(set, std::nullopt, Priority::kCritical);  // nobody ahead in LIFO
  EXPECT_EQ(crit.start(ignore, Clock::now() + 1s), Outcome::kPending);
  crit.cancel();
  Acquisition patient(set, std::nullopt, Priority::kSheddable);  // 30 x 0.1 = 3 s < 5 s
  EXPECT_EQ(patient.start(ignore, Clock::now() + 5s), Outcome::kPending);
  patient.cancel();
  queue.kill();
  high.kill();
  holder.kill();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
}

// acquisition.h: cancel() of a waiter the queue "had just shed or pushed
// out" gives its callback "that reason (kShed, kQueueFull,
// kLowerPriority)". So also for a waiter whose entry of the full waiter
// table a higher-class newcomer of another process took, cancelled (or
// timed out) before this process's background thread told it. The
// background thread is kept busy here by a granted waiter's callback, as a
// slow callback or a loaded worker would.
TEST(HostPriority, AWaiterPushedOutOfAFullTableByAnotherProcessThenCancelledSaysLowerPriority) {
  const std::string name = unique_name("table-cancel");
  Cleanup cleanup{name};
  constexpr std::int64_t kTable = detail::host::kMaxWaiters;
  auto db = host_resource(name, 1);
  const auto set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  Child holder({"hold", name, "1", "fifo", "1", "500"});
  ASSERT_EQ(holder.line(), "ready");
  // X: first in line; its grant's callback (on the background thread)
  // blocks until `go`.
  auto entered = std::make_shared<std::atomic<bool>>(false);
  auto go = std::make_shared<std::atomic<bool>>(false);
  Acquisition x(set, std::nullopt, Priority::kCriticalPlus);
  ASSERT_EQ(x.start([entered, go](Outcome) {
    entered->store(true);
    while (!go->load()) std::this_thread::sleep_for(1ms);
  }),
            Outcome::kPending);
  auto last = std::make_shared<std::vector<std::atomic<int>>>(kTable + 1);
  std::vector<std::unique_ptr<Acquisition>> waiters;
  const auto add_waiter = [&] {
    const std::size_t k = waiters.size();
    (*last)[k].store(-1);
    waiters.push_back(std::make_unique<Acquisition>(set, std::nullopt, Priority::kSheddable));
    return waiters.back()->start(
        [last, k](Outcome o) { (*last)[k].store(static_cast<int>(o)); });
  };
  for (std::int64_t k = 0; k < kTable - 1; ++k) ASSERT_EQ(add_waiter(), Outcome::kPending);
  ASSERT_TRUE(eventually([&] { return entered->load(); }));  // X granted: busy thread
  ASSERT_EQ(add_waiter(), Outcome::kPending);                  // the table full again
  Child newcomer({"pwait", name, "1", "fifo", "-1", "critical", "30000", "0"});
  ASSERT_EQ(newcomer.line(), "queued");  // took the newest sheddable's entry
  Acquisition& victim = *waiters.back();
  victim.cancel();  // the client gives up: it had been pushed out already
  const int got = (*last)[waiters.size() - 1].load();
  go->store(true);
  EXPECT_EQ(got, static_cast<int>(Outcome::kLowerPriority))
      << "pushed out for a higher class, yet reported as outcome " << got << " (kCancelled is "
      << static_cast<int>(Outcome::kCancelled) << ")";
  x.release();
  for (auto& w : waiters) {
    w->cancel();
    if (w->state() == Acquisition::State::kGranted) w->release();  // the grant won the race
  }
  EXPECT_EQ(newcomer.line().rfind("granted ", 0), 0u);
  newcomer.join();
  holder.join();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
  expect_invariant(name);
}

// A reserve read back from the segment is brought into range wherever it is
// used: two damaged reserves (INT64_MAX) above a newcomer's class, added up
// by early rejection, overflow nothing (UBSan checks) and still keep the
// free slot from a lower class.
TEST(HostReserve, ADamagedReserveInTheSegmentIsBroughtIntoRangeBeforeUse) {
  const std::string name = unique_name("rev-reserve-damage");
  Cleanup cleanup{name};
  auto db = std::make_shared<Resource>(ResourceOptions{.name = name,
                                                       .capacity = 2,
                                                       .scope = Scope::kHost,
                                                       .early_reject = true,
                                                       .reserve = {0, 0, 0, 1}});
  {
    Permit p = db->try_acquire();  // a timed hold: the estimate is known
    ASSERT_TRUE(p);
    std::this_thread::sleep_for(10ms);
  }
  Permit a = db->try_acquire();
  ASSERT_TRUE(a);
  auto* seg = map_segment_rw(name);
  ASSERT_NE(seg, nullptr);
  seg->header.config.reserve[priority_index(Priority::kCritical)] = INT64_MAX;
  seg->header.config.reserve[priority_index(Priority::kCriticalPlus)] = INT64_MAX;
  ::munmap(seg, sizeof(detail::host::Segment));
  const auto set =
      std::make_shared<const ResourceSet>(std::vector<std::shared_ptr<Resource>>{db});
  Acquisition low(set, std::nullopt, Priority::kSheddable);
  const Outcome got = low.start([](Outcome) {}, Clock::now() + 5s);
  EXPECT_NE(got, Outcome::kGranted);  // the reserves keep the free slot from it
  low.cancel();
  a.release();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
}

// reset --force: the slots a process holds are carried into the new segment
// each in its own class, so two sheddable holders carried over still keep
// a sheddable newcomer from the slot reserved for critical (capacity 3,
// reserve {critical: 1}), and the statistics show them as sheddable.
TEST(HostReserve, AfterAForcedResetCarriedSlotsKeepTheirClassAndTheReserveIsNotLent) {
  const std::string name = unique_name("rev-reset-reserve");
  Cleanup cleanup{name};
  auto db = reserved_host_resource(name, 3, {0, 0, 1, 0});
  Limiter limiter({db}, 10s);
  const auto set = limiter.select({db});
  Permit a = limiter.acquire(set, std::nullopt, Priority::kSheddable);
  Permit b = limiter.acquire(set, std::nullopt, Priority::kSheddable);
  ASSERT_TRUE(a);
  ASSERT_TRUE(b);
  // The rule before the reset: the third slot is critical's.
  EXPECT_EQ(Acquisition(set, std::nullopt, Priority::kSheddable).try_once(), Outcome::kTimeout);
  remove_host_resource(name, /*force=*/true);
  {
    Acquisition third(set, std::nullopt, Priority::kSheddable);
    const Outcome got = third.start([](Outcome) {}, Clock::now() + 200ms);
    EXPECT_NE(got, Outcome::kGranted) << "critical's reserved slot lent to a third sheddable";
    const ResourceStatistics s = db->statistics();
    EXPECT_EQ(s.classes[priority_index(Priority::kSheddable)].in_use,
              got == Outcome::kGranted ? 3 : 2);
    EXPECT_EQ(s.classes[priority_index(Priority::kCritical)].in_use, 0);
  }  // released or cancelled
  a.release();
  b.release();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
}

// Under a lower limit the reserve scales down with it, and raising the
// limit again grants a lower class's waiter of another process.
TEST(HostReserve, ReservesScaleWithTheLimitAndARaiseGrantsTheWaiter) {
  const std::string name = unique_name("rev-scale");
  Cleanup cleanup{name};
  auto db = reserved_host_resource(name, 4, {0, 0, 0, 2});
  Limiter limiter({db}, 10s);
  const auto set = limiter.select({db});
  db->set_limit(2);  // the reserve scales to 1: the classes below hold 1
  Permit a = limiter.acquire(set, std::nullopt, Priority::kCritical);
  ASSERT_TRUE(a);
  EXPECT_EQ(Acquisition(set, std::nullopt, Priority::kCritical).try_once(), Outcome::kTimeout);
  Child w({"pwait", name, "4", "fifo+r0,0,0,2", "-1", "sheddable", "20000", "0"});
  ASSERT_EQ(w.line(), "queued");
  Permit top = limiter.acquire(set, std::nullopt, Priority::kCriticalPlus);
  EXPECT_TRUE(top);
  top.release();
  EXPECT_EQ(db->waiting(), 1);
  db->set_limit(4);  // the classes below may hold 2: the waiter is granted
  const std::string got = w.line();
  EXPECT_EQ(got.rfind("granted ", 0), 0u) << got;
  w.join();
  a.release();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0 && db->waiting() == 0; }));
}

#if !defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__)
// host_resource.h: "Slots or waits the parent had at the fork stay the
// parent's", also once the child has registered and holds a slot of its
// own: its release of an inherited permit gives back nothing, so no third
// request gets a slot of a capacity of 2, and the child's critical_plus
// slot stays counted in its class. (Plain builds only: fork with the
// sanitizers' threads.)
TEST(HostReserve, AForkedChildReleasingAnInheritedPermitGivesBackNothingOfItsOwn) {
  const std::string name = unique_name("rev-fork");
  Cleanup cleanup{name};
  auto db = host_resource(name, 2);
  Limiter limiter({db}, 10s);
  const auto set = limiter.select({db});
  Permit inherited = limiter.acquire(set, std::nullopt, Priority::kSheddable);
  ASSERT_TRUE(inherited);
  int ready[2], done[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(done), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    Permit own = limiter.acquire(set, std::nullopt, Priority::kCriticalPlus);
    if (!own) ::_exit(2);
    inherited.release();  // the parent's slot: nothing of the child's
    char c = 'r';
    if (::write(ready[1], &c, 1) != 1) ::_exit(3);
    if (::read(done[0], &c, 1) != 1) ::_exit(4);  // holds `own` until told
    own.release();
    ::_exit(0);
  }
  char c = 0;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  // Held now: the parent's sheddable slot and the child's critical_plus one.
  EXPECT_EQ(db->in_use(), 2);
  const ResourceStatistics s = db->statistics();
  EXPECT_EQ(s.classes[priority_index(Priority::kSheddable)].in_use, 1);
  EXPECT_EQ(s.classes[priority_index(Priority::kCriticalPlus)].in_use, 1);
  Permit third = db->try_acquire();
  EXPECT_FALSE(third) << "a third holder of a capacity of 2";
  third.release();
  ASSERT_EQ(::write(done[1], "d", 1), 1);
  int status = 0;
  ::waitpid(child, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  inherited.release();
  EXPECT_TRUE(eventually([&] { return db->in_use() == 0; }));
  for (int fd : {ready[0], ready[1], done[0], done[1]}) ::close(fd);
}
#endif

}  // namespace concurrency_limiter
