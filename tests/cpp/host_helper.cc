// A process for the host-scope tests: uses a host resource as told on the
// command line, reports on stdout, and is then usually killed by the test.
// A separate program (started with posix_spawn) rather than a forked copy
// of the test, so that the tests also run under ThreadSanitizer.
//
//   host_helper hold NAME CAPACITY QUEUE N HOLD_MS    takes N slots, prints
//       "ready", holds them HOLD_MS (< 0: until killed)
//   host_helper wait NAME CAPACITY QUEUE TIMEOUT_MS HOLD_MS    waits for a
//       slot; prints "granted <steady ns>" or "rejected <outcome>", holds it
//       HOLD_MS, releases, exits
//   host_helper lock NAME CAPACITY QUEUE    takes the shared lock, prints
//       "locked", never gives it back
//   host_helper open NAME CAPACITY QUEUE    prints "ok" or "error <message>"
//   host_helper churn NAME CAPACITY QUEUE ROUNDS COUNTER_FILE    acquires
//       with random short timeouts and holds, counting the holders of all
//       processes in COUNTER_FILE (two int64: running, peak); prints "done"
//   host_helper limit NAME CAPACITY QUEUE    prints "limit <limit in force>"
//   host_helper setlimit NAME CAPACITY QUEUE N    set_limit(N), prints
//       "limit <limit in force>"
//   host_helper drop NAME CAPACITY QUEUE N    acquires and releases a slot N
//       times, reporting each as dropped; prints "limit <limit in force>"
//   host_helper nofds NAME CAPACITY QUEUE MS    opens the resource, uses up
//       its file descriptors, prints "exhausted", lives MS more (its
//       background thread sweeps meanwhile), prints "done"
//   host_helper oldrelease NAME    maps the file where the previous release
//       kept the segment of NAME (as a worker of it would), prints "ready",
//       lives until killed
//   host_helper mainexit NAME CAPACITY QUEUE    takes a slot, prints
//       "ready", then its main thread exits while another thread lives on
//   host_helper pwait NAME CAPACITY QUEUE MAX_WAITING CLASS TIMEOUT_MS HOLD_MS
//       as wait, with max_waiting MAX_WAITING (-1: none) and a request of
//       priority class CLASS (sheddable, sheddable_plus, critical,
//       critical_plus); prints "queued" once it waits (or its outcome),
//       then "granted <steady ns>" or "rejected <outcome>"
//   host_helper pchurn NAME CAPACITY QUEUE ROUNDS COUNTER_FILE    as churn,
//       with max_waiting 1 and a random class for each request, counting
//       the holders of each class too (see count_holder())
//   host_helper phold NAME CAPACITY QUEUE N CLASS HOLD_MS    as hold, with
//       requests of priority class CLASS
//   host_helper pqueue NAME CAPACITY QUEUE N CLASS    queues N requests of
//       priority class CLASS without a deadline, prints "queued", lives
//       until killed
//   host_helper dieupdate NAME CAPACITY QUEUE    takes the shared lock and
//       damages the limit algorithm's uncommitted state as a crash in the
//       middle of an update would; prints "locked", never gives it back
//
// QUEUE is "fifo", "lifo" or "adaptive", optionally followed by "+aimd": the
// resource then has the tests' AIMD limit (host_test_aimd() below), and/or
// by "+rA,B,C,D": the reserves of sheddable, sheddable_plus, critical and
// critical_plus (ResourceOptions::reserve).
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <random>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "concurrency_limiter/concurrency_limiter.h"
#include "host_test_util.h"
#include "internal/test_hooks.h"

namespace cl = concurrency_limiter;

namespace {

void say(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

void hold_for(long ms) {
  if (ms < 0) {
    for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

cl::QueueDiscipline queue_of(const std::string& q) {
  if (q.rfind("lifo", 0) == 0) return cl::QueueDiscipline::kLifo;
  if (q.rfind("adaptive", 0) == 0) return cl::QueueDiscipline::kAdaptive;
  return cl::QueueDiscipline::kFifo;
}

std::shared_ptr<cl::LimitAlgorithm> algorithm_of(const std::string& q) {
  if (q.size() > 5 && q.substr(q.size() - 5) == "+aimd") return cl::testing_host_aimd();
  return nullptr;
}

std::array<std::int64_t, cl::kPriorityCount> reserve_of(const std::string& q) {
  std::array<std::int64_t, cl::kPriorityCount> reserve{};
  const auto at = q.find("+r");
  if (at == std::string::npos) return reserve;
  const char* p = q.c_str() + at + 2;
  for (std::size_t c = 0; c < cl::kPriorityCount; ++c) {
    char* end = nullptr;
    reserve[c] = std::strtoll(p, &end, 10);
    p = *end == ',' ? end + 1 : end;
  }
  return reserve;
}

void say_limit(const cl::Resource& r) { say("limit " + std::to_string(r.limit())); }

cl::Priority priority_of(const std::string& name) {
  for (std::size_t c = 0; c < cl::kPriorityCount; ++c) {
    if (cl::to_string(static_cast<cl::Priority>(c)) == name) return static_cast<cl::Priority>(c);
  }
  std::fprintf(stderr, "host_helper: no priority class %s\n", name.c_str());
  std::exit(2);
}

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             cl::Clock::now().time_since_epoch())
      .count();
}

// The counters of the file at `path` that the test maps (running, peak,
// then per class, see count_holder()); null if it cannot be mapped.
std::atomic<std::int64_t>* map_counters(const char* path) {
  const int fd = ::open(path, O_RDWR);
  if (fd < 0) return nullptr;
  void* p = ::mmap(nullptr, cl::kSharedCountersBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  return p == MAP_FAILED ? nullptr : static_cast<std::atomic<std::int64_t>*>(p);
}

// Holds a counted slot for a random short time (churn, pchurn); with a
// class, counted as well among the holders of the classes <= c for every
// c >= its class (cl::count_hold()).
void count_holder(std::atomic<std::int64_t>* counter, std::mt19937& rng,
                  std::optional<cl::Priority> priority = std::nullopt) {
  cl::count_hold(counter, priority, +1);
  std::this_thread::sleep_for(std::chrono::microseconds(rng() % 500));
  cl::count_hold(counter, priority, -1);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "--unshare") {
    // "wait ..." again, in a PID namespace (and /proc) of its own.
    if (std::system("unshare --pid --fork --mount-proc true >/dev/null 2>&1") != 0) {
      say("error unshare is not permitted here");
      return 0;
    }
    std::vector<char*> args{const_cast<char*>("unshare"), const_cast<char*>("--pid"),
                            const_cast<char*>("--fork"), const_cast<char*>("--mount-proc"),
                            const_cast<char*>("/proc/self/exe"), const_cast<char*>("wait")};
    std::string self = std::string("/proc/") + std::to_string(::getpid()) + "/exe";
    char resolved[4096];
    const ssize_t n = ::readlink(self.c_str(), resolved, sizeof resolved - 1);
    if (n <= 0) return 2;
    resolved[n] = '\0';
    args[4] = resolved;
    for (int i = 2; i < argc; ++i) args.push_back(argv[i]);
    args.push_back(nullptr);
    ::execvp("unshare", args.data());
    say("error unshare cannot start");
    return 0;
  }
  if (argc >= 3 && std::string(argv[1]) == "oldrelease") {
    const std::string flat =
        "/dev/shm/fcl-host." + std::to_string(::getuid()) + "." + std::string(argv[2]);
    const int fd = ::open(flat.c_str(), O_RDWR | O_CREAT, 0600);
    if (fd < 0 || ::ftruncate(fd, 4096) != 0 ||
        ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) == MAP_FAILED) {
      say("error cannot map " + flat);
      return 0;
    }
    say("ready");
    hold_for(-1);
  }
  if (argc < 5) return 2;
  const std::string mode = argv[1];
  std::shared_ptr<cl::Resource> r;
  std::optional<std::int64_t> max_waiting;
  if (mode == "pwait" && argc >= 6 && std::atoll(argv[5]) >= 0) max_waiting = std::atoll(argv[5]);
  if (mode == "pchurn") max_waiting = 1;
  try {
    r = std::make_shared<cl::Resource>(cl::ResourceOptions{.name = argv[2],
                                                           .capacity = std::atoll(argv[3]),
                                                           .max_waiting = max_waiting,
                                                           .queue = queue_of(argv[4]),
                                                           // The tests' adaptive settings.
                                                           .adaptive_target = std::chrono::milliseconds(1),
                                                           .adaptive_interval = std::chrono::milliseconds(2),
                                                           .limit_algorithm = algorithm_of(argv[4]),
                                                           .scope = cl::Scope::kHost,
                                                           .reserve = reserve_of(argv[4])});
  } catch (const std::exception& e) {
    say(std::string("error ") + e.what());
    return 0;
  }
  if (mode == "open") {
    say("ok");
    return 0;
  }
  if (mode == "hold" && argc >= 7) {
    std::vector<cl::Permit> permits;
    for (int i = 0; i < std::atoi(argv[5]); ++i) {
      permits.push_back(r->acquire_for(std::chrono::seconds(30)));
      if (!permits.back()) {
        say("rejected");
        return 1;
      }
    }
    say("ready");
    hold_for(std::atol(argv[6]));
    return 0;
  }
  if (mode == "wait" && argc >= 7) {
    cl::Permit p = r->acquire_for(std::chrono::milliseconds(std::atol(argv[5])));
    if (p) {
      say("granted " + std::to_string(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                          cl::Clock::now().time_since_epoch())
                                          .count()));
      hold_for(std::atol(argv[6]));
    } else {
      say("rejected " + std::string(cl::to_string(p.outcome())));
    }
    return 0;
  }
  if (mode == "pwait" && argc >= 9) {
    const auto set = std::make_shared<const cl::ResourceSet>(
        std::vector<std::shared_ptr<cl::Resource>>{r});
    cl::Acquisition a(set, std::nullopt, priority_of(argv[6]));
    std::atomic<bool> done{false};
    std::atomic<int> outcome{-1};
    const cl::Outcome now = a.start([&](cl::Outcome o) {
      outcome.store(static_cast<int>(o));
      done.store(true);
      done.notify_all();
    });
    cl::Outcome result = now;
    if (now == cl::Outcome::kPending) {
      say("queued");
      const auto give_up = cl::Clock::now() + std::chrono::milliseconds(std::atol(argv[7]));
      while (!done.load() && cl::Clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      if (!done.load()) a.cancel(cl::Outcome::kTimeout);
      done.wait(false);
      result = static_cast<cl::Outcome>(outcome.load());
    }
    if (result == cl::Outcome::kGranted) {
      say("granted " + std::to_string(now_ns()));
      hold_for(std::atol(argv[8]));
      a.release();
    } else {
      say("rejected " + std::string(cl::to_string(result)));
    }
    return 0;
  }
  if (mode == "pchurn" && argc >= 7) {
    auto* counter = map_counters(argv[6]);
    if (counter == nullptr) return 3;
    cl::Limiter limiter({r}, std::chrono::seconds(1));
    const auto set = limiter.select({r});
    std::mt19937 rng(static_cast<unsigned>(::getpid()));
    for (long i = 0; i < std::atol(argv[5]); ++i) {
      const auto priority = static_cast<cl::Priority>(rng() % cl::kPriorityCount);
      cl::Permit p = limiter.acquire_for(set, std::nullopt, priority,
                                         std::chrono::microseconds(rng() % 3000));
      if (p) count_holder(counter, rng, priority);
    }
    say("done");
    return 0;
  }
  if (mode == "phold" && argc >= 8) {
    cl::Limiter limiter({r}, std::chrono::seconds(30));
    const auto set = limiter.select({r});
    std::vector<cl::Permit> permits;
    for (int i = 0; i < std::atoi(argv[5]); ++i) {
      permits.push_back(limiter.acquire(set, std::nullopt, priority_of(argv[6])));
      if (!permits.back()) {
        say("rejected");
        return 1;
      }
    }
    say("ready");
    hold_for(std::atol(argv[7]));
    return 0;
  }
  if (mode == "churn" && argc >= 7) {
    auto* counter = map_counters(argv[6]);
    if (counter == nullptr) return 3;
    std::mt19937 rng(static_cast<unsigned>(::getpid()));
    for (long i = 0; i < std::atol(argv[5]); ++i) {
      cl::Permit p = r->acquire_for(std::chrono::microseconds(rng() % 3000));
      if (p) count_holder(counter, rng);
    }
    say("done");
    return 0;
  }
  if (mode == "nofds" && argc >= 6) {
    rlimit limit{};
    ::getrlimit(RLIMIT_NOFILE, &limit);
    limit.rlim_cur = std::min<rlim_t>(limit.rlim_cur, 4096);
    ::setrlimit(RLIMIT_NOFILE, &limit);
    std::vector<int> fds;
    fds.reserve(4096);
    for (int fd; (fd = ::open("/dev/null", O_RDONLY)) >= 0;) fds.push_back(fd);
    say("exhausted");
    hold_for(std::atol(argv[5]));
    say("done");
    // Give them back before exiting: the sanitizers' exit checks need some.
    for (const int fd : fds) ::close(fd);
    return 0;
  }
  if (mode == "mainexit") {
    static cl::Permit held = r->acquire_for(std::chrono::seconds(30));
    if (!held) {
      say("rejected");
      return 1;
    }
    say("ready");
    std::thread([] { hold_for(-1); }).detach();
    ::pthread_exit(nullptr);  // the process lives on in the other thread
  }
  if (mode == "limit") {
    say_limit(*r);
    return 0;
  }
  if (mode == "setlimit" && argc >= 6) {
    r->set_limit(std::atoll(argv[5]));
    say_limit(*r);
    return 0;
  }
  if (mode == "drop" && argc >= 6) {
    for (int i = 0; i < std::atoi(argv[5]); ++i) {
      cl::Permit p = r->acquire_for(std::chrono::seconds(30));
      if (!p) {
        say("rejected");
        return 1;
      }
      p.release(cl::Completion::kDropped);
    }
    say_limit(*r);
    return 0;
  }
  if (mode == "pqueue" && argc >= 7) {
    const auto set = std::make_shared<const cl::ResourceSet>(
        std::vector<std::shared_ptr<cl::Resource>>{r});
    static std::vector<std::unique_ptr<cl::Acquisition>> queued;  // never destroyed
    for (int i = 0; i < std::atoi(argv[5]); ++i) {
      queued.push_back(std::make_unique<cl::Acquisition>(set, std::nullopt, priority_of(argv[6])));
      if (queued.back()->start([](cl::Outcome) {}) != cl::Outcome::kPending) {
        say("not queued");
        return 1;
      }
    }
    say("queued");
    hold_for(-1);
  }
  if (mode == "dieupdate") {
    cl::Permit p = r->try_acquire();  // registers this process
    p.release(cl::Completion::kIgnored);
    cl::testing::die_in_host_limit_update(*r);
    say("locked");
    hold_for(-1);
  }
  if (mode == "lock") {
    cl::Permit p = r->try_acquire();  // registers this process
    p.release();
    cl::testing::hold_host_lock_forever(*r);
    say("locked");
    hold_for(-1);
  }
  return 2;
}
