// Microbenchmarks of the engine (Google Benchmark), each case measured
// against a mutex + condition-variable semaphore and std::counting_semaphore
// in the same run, and printed as ratios at the end.
//
//   uncontended/...     acquire + release of one slot, nobody else around
//   multi_resource/...  acquire + release of a slot of two resources
//   handoff/...         two threads taking turns on one slot (capacity 1):
//                       every acquire has to wait for the other's release
//   engine-only cases   the callback API (also with a per-key share), a handoff to a queued waiter on one
//                       thread, a per-key handoff past a key flooding the queue (printed as the ratio
//                       to the same round with no flood), and the DeadlineQueue with interleaved timeouts
//
// Build once with -DCL_STATISTICS=OFF as well to see what the statistics
// cost: the Makefile's `bench` target prints both.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <mutex>
#include <semaphore>
#include <string>
#include <thread>
#include <vector>

#include "concurrency_limiter/concurrency_limiter.h"
#include "cv_semaphore.h"

namespace cl = concurrency_limiter;
using namespace std::chrono_literals;

namespace {

using bench::CvSemaphore;

using StdSemaphore = std::counting_semaphore<>;

// ---- uncontended ----

void uncontended_engine(benchmark::State& state) {
  auto r = std::make_shared<cl::Resource>("db", 4);
  cl::Limiter limiter({r}, 1s);
  auto set = limiter.select({r});
  for (auto _ : state) {
    cl::Permit p = limiter.acquire(set);  // with the limiter's 1 s timeout
    benchmark::DoNotOptimize(p);
  }
}

void uncontended_engine_resource(benchmark::State& state) {
  auto r = std::make_shared<cl::Resource>("db", 4);
  for (auto _ : state) {
    cl::Permit p = r->acquire_for(1s);
    benchmark::DoNotOptimize(p);
  }
}

void uncontended_engine_acquisition(benchmark::State& state) {
  // The callback API the Python layer uses (allocates its waiter nodes).
  auto r = std::make_shared<cl::Resource>("db", 4);
  auto set = std::make_shared<const cl::ResourceSet>(std::vector{r});
  for (auto _ : state) {
    cl::Acquisition acq(set);
    benchmark::DoNotOptimize(acq.try_acquire());
    acq.release();
  }
}

// A resource with a per-key share: every grant and release goes through its
// mutex and the key's map entry (created and erased each time here).
void uncontended_engine_per_key(benchmark::State& state) {
  auto r = std::make_shared<cl::Resource>(
      cl::ResourceOptions{.name = "db", .capacity = 4, .per_key = 2});
  auto set = std::make_shared<const cl::ResourceSet>(std::vector{r});
  for (auto _ : state) {
    cl::Acquisition acq(set, "tenant-1");
    benchmark::DoNotOptimize(acq.try_acquire());
    acq.release();
  }
}

void uncontended_cv(benchmark::State& state) {
  CvSemaphore sem(4);
  for (auto _ : state) {
    sem.acquire();
    sem.release();
  }
}

void uncontended_std(benchmark::State& state) {
  StdSemaphore sem(4);
  for (auto _ : state) {
    sem.acquire();
    sem.release();
  }
}

// ---- multi-resource: one slot of each of two resources, in order ----

void multi_engine(benchmark::State& state) {
  auto db = std::make_shared<cl::Resource>("db", 4);
  auto file = std::make_shared<cl::Resource>("file", 4);
  cl::Limiter limiter({db, file}, 1s);
  auto both = limiter.select({db, file});
  for (auto _ : state) {
    cl::Permit p = limiter.acquire(both);
    benchmark::DoNotOptimize(p);
  }
}

void multi_cv(benchmark::State& state) {
  CvSemaphore db(4), file(4);
  for (auto _ : state) {
    db.acquire();
    file.acquire();
    file.release();
    db.release();
  }
}

void multi_std(benchmark::State& state) {
  StdSemaphore db(4), file(4);
  for (auto _ : state) {
    db.acquire();
    file.acquire();
    file.release();
    db.release();
  }
}

// ---- handoff between two threads ----
//
// Two threads share a slot of capacity 1 and strictly take turns: each asks
// for the slot only once the other holds it, and the holder releases only
// once the other has announced that it is asking. So every acquisition is a
// handoff from the other thread (a barging semaphore cannot take its own
// slot back), and the time per iteration covers two handoffs.

struct Turns {
  std::atomic<std::int64_t> granted{0};  // acquisitions so far
  std::atomic<std::int64_t> asking{-1};  // latest acquisition asked for
  std::atomic<int> done{0};              // threads that finished their loop

  void reset() {
    granted = 0;
    asking = -1;
    done = 0;
  }
  template <class Predicate>
  static void until(Predicate p) {
    while (!p()) std::this_thread::yield();
  }
};

template <class Acquire, class Release>
void handoff_loop(benchmark::State& state, Turns& turns, Acquire acquire,
                  Release release) {
  std::int64_t n = state.thread_index();  // this thread's acquisitions: n, n+2...
  benchmark::IterationCount left = state.max_iterations;
  for (auto _ : state) {
    Turns::until([&] { return turns.granted.load(std::memory_order_acquire) >= n; });
    turns.asking.store(n, std::memory_order_release);
    acquire();
    turns.granted.store(n + 1, std::memory_order_release);
    Turns::until([&] {
      return turns.asking.load(std::memory_order_acquire) > n ||
             turns.done.load(std::memory_order_acquire) > 0;
    });
    release();
    n += 2;
    // Before the loop's end, which waits for the other thread.
    if (--left == 0) turns.done.fetch_add(1, std::memory_order_acq_rel);
  }
}

void handoff_engine(benchmark::State& state) {
  static std::shared_ptr<cl::Resource> r;
  static std::unique_ptr<cl::Limiter> limiter;
  static std::shared_ptr<const cl::ResourceSet> set;
  static Turns turns;
  if (state.thread_index() == 0) {
    r = std::make_shared<cl::Resource>("db", 1);
    limiter = std::make_unique<cl::Limiter>(std::vector{r}, 10s);
    set = limiter->select({r});
    turns.reset();
  }
  cl::Permit p;
  handoff_loop(state, turns, [&] { p = limiter->acquire(set); }, [&] { p.release(); });
}

void handoff_cv(benchmark::State& state) {
  static CvSemaphore* sem;
  static Turns turns;
  if (state.thread_index() == 0) {
    static CvSemaphore instance(1);
    sem = &instance;
    turns.reset();
  }
  handoff_loop(state, turns, [] { sem->acquire(); }, [] { sem->release(); });
}

void handoff_std(benchmark::State& state) {
  static StdSemaphore* sem;
  static Turns turns;
  if (state.thread_index() == 0) {
    static StdSemaphore instance(1);
    sem = &instance;
    turns.reset();
  }
  handoff_loop(state, turns, [] { sem->acquire(); }, [] { sem->release(); });
}

// ---- engine only ----

void engine_handoff_to_queued_waiter(benchmark::State& state) {
  // One thread: release hands the slot to a queued Acquisition.
  auto r = std::make_shared<cl::Resource>("db", 1);
  auto set = std::make_shared<const cl::ResourceSet>(std::vector{r});
  auto holder = std::make_unique<cl::Acquisition>(set);
  holder->try_acquire();
  for (auto _ : state) {
    auto waiter = std::make_unique<cl::Acquisition>(set);
    waiter->start([](cl::Outcome) {});  // queues behind the holder
    holder->release();                  // hands the slot to the waiter
    holder = std::move(waiter);         // which holds it next round
  }
  holder->release();
}

// Per-key shares with one key flooding the queue: capacity 2, per_key 1. Key
// A holds a slot and has `waiters` more requests queued at its share; key B
// holds the other slot and, each round, queues a request and releases its
// slot, which is handed to that request past every waiter of A. The cost of
// a round must not grow with A's waiters: printed as the ratio to the round
// with none, measured in the same run.
void per_key_flooded(benchmark::State& state, int waiters) {
  auto r = std::make_shared<cl::Resource>(
      cl::ResourceOptions{.name = "db", .capacity = 2, .per_key = 1});
  auto set = std::make_shared<const cl::ResourceSet>(std::vector{r});
  cl::Acquisition a_holder(set, "A");
  a_holder.try_acquire();
  std::vector<std::unique_ptr<cl::Acquisition>> flood;
  for (int i = 0; i < waiters; ++i) {
    flood.push_back(std::make_unique<cl::Acquisition>(set, "A"));
    flood.back()->start([](cl::Outcome) {});
  }
  auto holder = std::make_unique<cl::Acquisition>(set, "B");
  holder->try_acquire();
  for (auto _ : state) {
    auto waiter = std::make_unique<cl::Acquisition>(set, "B");
    waiter->start([](cl::Outcome) {});  // queues behind A's waiters
    holder->release();                  // hands the slot to it
    holder = std::move(waiter);
  }
  holder->release();
  flood.clear();  // cancels A's waiters
  a_holder.release();
}

// n acquisitions registered with deadlines from two interleaved timeouts
// (two routes, 1 s and 5 s, requests arriving alternately): time per add().
// Flat in n: the queue no longer walks the list on each add.
void deadline_queue_interleaved(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  auto r = std::make_shared<cl::Resource>("db", 1);
  auto set = std::make_shared<const cl::ResourceSet>(std::vector{r});
  cl::Acquisition holder(set);
  holder.try_acquire();
  std::vector<std::unique_ptr<cl::Acquisition>> acqs;
  for (std::size_t i = 0; i < n; ++i) {
    acqs.push_back(std::make_unique<cl::Acquisition>(set));
    acqs.back()->start([](cl::Outcome) {});
  }
  for (auto _ : state) {
    cl::DeadlineQueue q;
    double now = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      now += 0.001;
      q.add(*acqs[i], now + (i % 2 == 0 ? 1.0 : 5.0));
    }
    state.PauseTiming();
    for (auto& a : acqs) q.remove(*a);
    state.ResumeTiming();
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
  state.counters["ns_per_add"] = benchmark::Counter(
      static_cast<double>(state.iterations() * n),
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// Prints the usual table, then each engine case divided by the two
// semaphores of the same case (medians when repetitions are aggregated), by
// real time and by CPU time: on a machine shared with other work, the CPU
// time of a single-threaded case is the steadier of the two. The threaded
// handoff cases are timed in real time only (a blocked thread uses no CPU).
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.error_occurred) continue;
      const bool aggregate = run.run_type == Run::RT_Aggregate;
      if (aggregate && run.aggregate_name != "median") continue;
      if (!aggregate && run.repetitions > 1) continue;
      times_[run.run_name.function_name] = {run.GetAdjustedRealTime(),
                                            run.GetAdjustedCPUTime(), run.threads > 1};
    }
  }

  void Finalize() override {
    ConsoleReporter::Finalize();
    std::printf("\n%-40s %9s %9s %9s %9s %9s %9s\n", "engine case", "real ns", "/cv_sem",
                "/std::sem", "cpu ns", "/cv_sem", "/std::sem");
    for (const auto& [name, t] : times_) {
      const auto slash = name.find('/');
      if (slash == std::string::npos) continue;
      const std::string family = name.substr(0, slash);
      if (name.compare(slash + 1, 6, "engine") != 0) continue;
      const auto cv = times_.find(family + "/cv_semaphore");
      const auto sem = times_.find(family + "/std_counting_semaphore");
      if (cv == times_.end() || sem == times_.end()) continue;
      std::printf("%-40s %9.1f %8.2fx %8.2fx", name.c_str(), t.real, t.real / cv->second.real,
                  t.real / sem->second.real);
      if (t.threaded) {
        std::printf(" %9s %9s %9s\n", "-", "-", "-");
      } else {
        std::printf(" %9.1f %8.2fx %8.2fx\n", t.cpu, t.cpu / cv->second.cpu,
                    t.cpu / sem->second.cpu);
      }
    }
    std::printf("(ns per operation; ratio = engine / baseline, both measured in this run)\n");
    const auto none = times_.find("per_key_flooded/0_waiters");
    const auto flooded = times_.find("per_key_flooded/10000_waiters");
    if (none != times_.end() && flooded != times_.end()) {
      std::printf("\nper-key handoff past a key with 10^4 waiters at its share: %.1f ns, "
                  "%.2fx the round with none (%.1f ns), by CPU time\n",
                  flooded->second.cpu, flooded->second.cpu / none->second.cpu, none->second.cpu);
    }
  }

 private:
  struct Times {
    double real;
    double cpu;
    bool threaded;
  };
  std::map<std::string, Times> times_;
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::RegisterBenchmark("uncontended/engine", uncontended_engine);
  benchmark::RegisterBenchmark("uncontended/engine_resource_acquire_for",
                               uncontended_engine_resource);
  benchmark::RegisterBenchmark("uncontended/engine_acquisition_api",
                               uncontended_engine_acquisition);
  benchmark::RegisterBenchmark("uncontended/engine_acquisition_per_key",
                               uncontended_engine_per_key);
  benchmark::RegisterBenchmark("uncontended/cv_semaphore", uncontended_cv);
  benchmark::RegisterBenchmark("uncontended/std_counting_semaphore", uncontended_std);
  benchmark::RegisterBenchmark("multi_resource/engine", multi_engine);
  benchmark::RegisterBenchmark("multi_resource/cv_semaphore", multi_cv);
  benchmark::RegisterBenchmark("multi_resource/std_counting_semaphore", multi_std);
  benchmark::RegisterBenchmark("handoff/engine", handoff_engine)->Threads(2)->UseRealTime();
  benchmark::RegisterBenchmark("handoff/cv_semaphore", handoff_cv)->Threads(2)->UseRealTime();
  benchmark::RegisterBenchmark("handoff/std_counting_semaphore", handoff_std)
      ->Threads(2)
      ->UseRealTime();
  benchmark::RegisterBenchmark("engine_handoff_to_queued_waiter",
                               engine_handoff_to_queued_waiter);
  benchmark::RegisterBenchmark("per_key_flooded/0_waiters", per_key_flooded, 0);
  benchmark::RegisterBenchmark("per_key_flooded/10000_waiters", per_key_flooded, 10000);
  benchmark::RegisterBenchmark("deadline_queue_interleaved", deadline_queue_interleaved)
      ->RangeMultiplier(8)
      ->Range(512, 32768);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
