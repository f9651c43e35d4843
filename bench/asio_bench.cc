// async_acquire() through an io_context, against a mutex + condition
// variable semaphore and std::counting_semaphore measured in the same run
// (Google Benchmark). After the usual table it prints each async case as a
// ratio of the baselines of the same shape.
//
// uncontended  acquire + release of a free slot. The async case pays one
//              post through the io_context and one run_one() to deliver the
//              Permit; the baselines never leave the thread.
// contended    4 workers take turns on one slot, so every acquisition is a
//              handoff from the releasing worker to a queued one. The async
//              workers are coroutines on one io_context thread (the handoff
//              is a grant plus a posted completion); the baselines are 4
//              threads (the handoff is a wake-up of a blocked thread).
#include <benchmark/benchmark.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <mutex>
#include <optional>
#include <semaphore>
#include <string>
#include <vector>

#include "concurrency_limiter/asio.h"
#include "cv_semaphore.h"

namespace cl = concurrency_limiter;
using namespace std::chrono_literals;

namespace {

constexpr int kWorkers = 4;

using CondvarSemaphore = bench::CvSemaphore;

struct Engine {
  std::shared_ptr<cl::Resource> db;
  cl::Limiter limiter;
  std::shared_ptr<const cl::ResourceSet> set;
  explicit Engine(int capacity)
      : db(std::make_shared<cl::Resource>("db", capacity)),
        limiter({db}, 1s),
        set(limiter.select({db})) {}
};

void BM_Uncontended_AsyncAcquire(benchmark::State& state) {
  Engine e(4);
  asio::io_context io(1);
  auto work = asio::make_work_guard(io);
  for (auto _ : state) {
    cl::async_acquire(io, e.limiter, e.set, 1s, [](std::error_code, cl::Permit p) {
      benchmark::DoNotOptimize(p);
    });
    io.run_one();
  }
}

// The floor of any completion through an io_context: one post and one
// run_one(), nothing acquired.
void BM_Uncontended_AsioPostOnly(benchmark::State& state) {
  asio::io_context io(1);
  auto work = asio::make_work_guard(io);
  for (auto _ : state) {
    asio::post(io, [] {});
    io.run_one();
  }
}

void BM_Uncontended_CondvarSemaphore(benchmark::State& state) {
  CondvarSemaphore sem(4);
  for (auto _ : state) {
    sem.acquire();
    sem.release();
  }
}

void BM_Uncontended_StdCountingSemaphore(benchmark::State& state) {
  std::counting_semaphore<> sem(4);
  for (auto _ : state) {
    sem.acquire();
    sem.release();
  }
}

void BM_Contended_AsyncAcquire(benchmark::State& state) {
  Engine e(1);
  asio::io_context io(1);
  auto work = asio::make_work_guard(io);
  long acquired = 0;
  bool stop = false;
  int running = kWorkers;
  for (int w = 0; w < kWorkers; ++w) {
    asio::co_spawn(io, [&]() -> asio::awaitable<void> {
      while (!stop) {
        cl::Permit p = co_await cl::async_acquire(e.limiter, e.set, 1s, asio::use_awaitable);
        ++acquired;
      }
      --running;
    }, asio::detached);
  }
  for (auto _ : state) {
    const long before = acquired;
    while (acquired == before) io.run_one();
  }
  stop = true;
  while (running > 0) io.run_one();
  if (e.db->statistics().acquired_total < static_cast<std::uint64_t>(state.iterations())) {
    state.SkipWithError("fewer acquisitions than iterations");
  }
}

// Each of kWorkers threads loops acquire/release; the slot changes hands
// between them. Time per acquisition.
template <class Semaphore>
void contended_threads(benchmark::State& state, Semaphore& sem) {
  for (auto _ : state) {
    sem.acquire();
    sem.release();
  }
}

void BM_Contended_CondvarSemaphore(benchmark::State& state) {
  static CondvarSemaphore sem(1);
  contended_threads(state, sem);
}

void BM_Contended_StdCountingSemaphore(benchmark::State& state) {
  static std::counting_semaphore<> sem(1);
  contended_threads(state, sem);
}

BENCHMARK(BM_Uncontended_AsyncAcquire);
BENCHMARK(BM_Uncontended_AsioPostOnly);
BENCHMARK(BM_Uncontended_CondvarSemaphore);
BENCHMARK(BM_Uncontended_StdCountingSemaphore);
BENCHMARK(BM_Contended_AsyncAcquire);
// Real time: with threads, time per acquisition across all of them.
BENCHMARK(BM_Contended_CondvarSemaphore)->Threads(kWorkers)->UseRealTime();
BENCHMARK(BM_Contended_StdCountingSemaphore)->Threads(kWorkers)->UseRealTime();

// Keeps the time per iteration of every run, to print ratios at the end.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.error_occurred || run.iterations == 0) continue;
      // Repetitions: keep the median if there is one, else the last run.
      if (run.run_type == Run::RT_Aggregate && run.aggregate_name != "median") continue;
      std::string name = run.run_name.function_name;
      ns_[name] = {run.GetAdjustedRealTime(), run.GetAdjustedCPUTime()};
    }
  }

  void print_ratios() const {
    std::printf("\nasync_acquire against the baselines of the same run, per acquisition "
                "(lower is better; CPU time is the steadier on a loaded machine):\n");
    for (const char* shape : {"Uncontended", "Contended"}) {
      const auto async = find(std::string("BM_") + shape + "_AsyncAcquire");
      const auto cv = find(std::string("BM_") + shape + "_CondvarSemaphore");
      const auto sem = find(std::string("BM_") + shape + "_StdCountingSemaphore");
      if (!async || !cv || !sem) continue;
      for (const bool cpu : {false, true}) {
        const auto t = [cpu](const Times& x) { return cpu ? x.cpu : x.real; };
        std::printf("  %-11s %-4s async_acquire %7.1f ns = %6.2fx mutex+condvar (%6.1f ns), "
                    "%6.2fx std::counting_semaphore (%6.1f ns)\n",
                    shape, cpu ? "cpu" : "real", t(*async), t(*async) / t(*cv), t(*cv),
                    t(*async) / t(*sem), t(*sem));
      }
    }
    if (const auto post = find("BM_Uncontended_AsioPostOnly")) {
      if (const auto async = find("BM_Uncontended_AsyncAcquire")) {
        std::printf("  of an uncontended async_acquire, one post + run_one() through the "
                    "io_context alone: %.1f ns cpu (%.0f%%)\n",
                    post->cpu, 100.0 * post->cpu / async->cpu);
      }
    }
  }

 private:
  struct Times {
    double real;
    double cpu;
  };

  std::optional<Times> find(const std::string& name) const {
    auto it = ns_.find(name);
    if (it == ns_.end()) return std::nullopt;
    return it->second;
  }

  std::map<std::string, Times> ns_;
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.print_ratios();
  benchmark::Shutdown();
  return 0;
}
