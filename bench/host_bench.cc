// Host scope against process scope and a file lock, measured in the same run
// (printed, not asserted):
//   - uncontended acquire + release, one thread;
//   - handoff latency: from the release by the holder to the waiter running,
//     p50/p99, between two processes (host scope, flock) and between two
//     threads of one process (process scope, the baseline).
// Two processes ping-pong one slot: each acquires, records when it got the
// slot, waits until the other one waits, stamps the time and releases.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "concurrency_limiter/concurrency_limiter.h"

namespace cl = concurrency_limiter;
using namespace std::chrono_literals;

namespace {

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             cl::Clock::now().time_since_epoch())
      .count();
}

constexpr int kRounds = 2000;

// Shared between the two processes (or threads) of a handoff run.
struct Shared {
  std::atomic<std::int64_t> released_at{0};
  std::atomic<int> released_by{-1};
  std::atomic<int> waiting{0};   // for flock: the other side is about to wait
  std::atomic<int> finished{0};  // sides done (flock may starve the other)
  std::int64_t samples[2][kRounds];
};

Shared* shared_block() {
  void* p = ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                   -1, 0);
  if (p == MAP_FAILED) std::abort();
  return new (p) Shared;
}

void report(const char* what, double ns_per_op, double baseline) {
  std::printf("  %-44s %9.0f ns   %5.2fx\n", what, ns_per_op, ns_per_op / baseline);
}

template <class F>
double per_op(F&& f, int n = 200000) {
  const auto t0 = cl::Clock::now();
  for (int i = 0; i < n; ++i) f();
  return std::chrono::duration<double, std::nano>(cl::Clock::now() - t0).count() / n;
}

void percentiles(const char* what, Shared& s, int sides) {
  std::vector<std::int64_t> all;
  for (int side = 0; side < sides; ++side) {
    for (int i = 1; i < kRounds; ++i) {
      if (s.samples[side][i] > 0) all.push_back(s.samples[side][i]);
    }
  }
  std::sort(all.begin(), all.end());
  if (all.empty()) return;
  const auto at = [&](double q) { return all[static_cast<std::size_t>(q * (all.size() - 1))] / 1e3; };
  std::printf("  %-44s p50 %7.1f us   p99 %7.1f us   (%zu handoffs)\n", what, at(0.5), at(0.99),
              all.size());
}

// One side of a ping-pong over a Resource.
void resource_side(cl::Resource& r, Shared& s, int side) {
  auto set = std::make_shared<const cl::ResourceSet>(
      std::vector<std::shared_ptr<cl::Resource>>{r.shared_from_this()});
  for (int i = 0; i < kRounds; ++i) {
    cl::Permit p = r.acquire_for(10s);
    const std::int64_t got = now_ns();
    if (!p) std::abort();
    const std::int64_t released = s.released_at.load(std::memory_order_acquire);
    s.samples[side][i] =
        released > 0 && s.released_by.load() == 1 - side ? got - released : 0;
    if (i + 1 == kRounds && side == 1) break;
    // Hand over only once the other side waits (so every round is a handoff).
    while (r.waiting() == 0) {
      if (i + 1 == kRounds) break;
      std::this_thread::yield();
    }
    s.released_by.store(side);
    s.released_at.store(now_ns(), std::memory_order_release);
    p.release();
  }
}

void flock_side(int fd, Shared& s, int side) {
  for (int i = 0; i < kRounds; ++i) {
    s.waiting.fetch_add(1);
    ::flock(fd, LOCK_EX);
    s.waiting.fetch_sub(1);
    const std::int64_t got = now_ns();
    const std::int64_t released = s.released_at.load(std::memory_order_acquire);
    // flock() lets a releaser take the lock straight back (no queue): only
    // handoffs to the other process count.
    s.samples[side][i] =
        released > 0 && s.released_by.load() == 1 - side ? got - released : 0;
    while (s.waiting.load() == 0 && s.finished.load() == 0) std::this_thread::yield();
    std::this_thread::sleep_for(20us);  // let it block in flock()
    s.released_by.store(side);
    s.released_at.store(now_ns(), std::memory_order_release);
    ::flock(fd, LOCK_UN);
  }
  s.finished.fetch_add(1);
}

}  // namespace

int main() {
  const std::string name = "bench-" + std::to_string(::getpid());
  const std::string lock_path = "/tmp/fcl-bench-" + std::to_string(::getpid()) + ".lock";
  auto process = std::make_shared<cl::Resource>(cl::ResourceOptions{.name = "p", .capacity = 4});
  auto host = std::make_shared<cl::Resource>(
      cl::ResourceOptions{.name = name, .capacity = 4, .scope = cl::Scope::kHost});
  const int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT, 0600);

  std::printf("uncontended acquire + release (one thread), ratio to process scope\n");
  auto pset = std::make_shared<const cl::ResourceSet>(std::vector{process});
  auto hset = std::make_shared<const cl::ResourceSet>(std::vector{host});
  const double base = per_op([&] {
    cl::Acquisition a(pset);
    a.try_acquire();
    a.release();
  });
  report("process scope (Acquisition)", base, base);
  report("host scope (Acquisition)", per_op([&] {
           cl::Acquisition a(hset);
           a.try_acquire();
           a.release();
         }),
         base);
  report("process scope (try_acquire Permit)", per_op([&] {
           cl::Permit p = process->try_acquire();
         }),
         base);
  report("host scope (try_acquire Permit)", per_op([&] {
           cl::Permit p = host->try_acquire();
         }),
         base);
  report("flock(LOCK_EX) + flock(LOCK_UN)", per_op([&] {
           ::flock(fd, LOCK_EX);
           ::flock(fd, LOCK_UN);
         }),
         base);
  report("fcntl(F_SETLKW) + fcntl(F_UNLCK)", per_op([&] {
           struct flock l {};
           l.l_type = F_WRLCK;
           l.l_whence = SEEK_SET;
           ::fcntl(fd, F_SETLKW, &l);
           l.l_type = F_UNLCK;
           ::fcntl(fd, F_SETLK, &l);
         }),
         base);

  std::printf("handoff latency, release to the waiter running\n");
  {
    auto one = std::make_shared<cl::Resource>(cl::ResourceOptions{.name = "p1", .capacity = 1});
    Shared* s = shared_block();
    std::thread other([&] { resource_side(*one, *s, 1); });
    resource_side(*one, *s, 0);
    other.join();
    percentiles("process scope, thread to thread", *s, 2);
  }
  {
    auto one = std::make_shared<cl::Resource>(cl::ResourceOptions{
        .name = name + "-1", .capacity = 1, .scope = cl::Scope::kHost});
    Shared* s = shared_block();
    const pid_t child = ::fork();
    if (child == 0) {
      resource_side(*one, *s, 1);
      ::_exit(0);
    }
    resource_side(*one, *s, 0);
    ::waitpid(child, nullptr, 0);
    percentiles("host scope, process to process", *s, 2);
  }
  {
    Shared* s = shared_block();
    const pid_t child = ::fork();
    if (child == 0) {
      const int own = ::open(lock_path.c_str(), O_RDWR);  // flock is per open file
      flock_side(own, *s, 1);
      ::_exit(0);
    }
    const int own = ::open(lock_path.c_str(), O_RDWR);
    flock_side(own, *s, 0);
    ::waitpid(child, nullptr, 0);
    percentiles("flock, process to process", *s, 2);
  }
  ::unlink(lock_path.c_str());
  // This process still uses them: a plain reset would refuse.
  for (const std::string& n : {name, name + "-1"}) cl::remove_host_resource(n, /*force=*/true);
  return 0;
}
