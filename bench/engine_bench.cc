// Microbenchmarks of the engine's hot paths (Google Benchmark).
//
// Build once with -DCL_STATISTICS=OFF as well to see what the statistics
// counters cost: the Makefile's `bench` target prints both.
#include <benchmark/benchmark.h>

#include <semaphore>

#include "concurrency_limiter/concurrency_limiter.h"

namespace cl = concurrency_limiter;

static void BM_AcquisitionUncontended(benchmark::State& state) {
  auto r = std::make_shared<cl::Resource>("db", 4);
  auto set = std::make_shared<const cl::ResourceSet>(std::vector{r});
  for (auto _ : state) {
    cl::Acquisition acq(set);
    benchmark::DoNotOptimize(acq.try_acquire());
    acq.release();
  }
}
BENCHMARK(BM_AcquisitionUncontended);

static void BM_HandoffToQueuedWaiter(benchmark::State& state) {
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
BENCHMARK(BM_HandoffToQueuedWaiter);

static void BM_BlockingAcquireUncontended(benchmark::State& state) {
  auto r = std::make_shared<cl::Resource>("db", 4);
  cl::Limiter limiter({r}, std::chrono::seconds(1));
  auto set = limiter.select({r});
  for (auto _ : state) {
    cl::Permit p = limiter.acquire(set);
    benchmark::DoNotOptimize(p);
  }
}
BENCHMARK(BM_BlockingAcquireUncontended);

static void BM_StdCountingSemaphoreUncontended(benchmark::State& state) {
  std::counting_semaphore<> sem(4);
  for (auto _ : state) {
    sem.acquire();
    sem.release();
  }
}
BENCHMARK(BM_StdCountingSemaphoreUncontended);

BENCHMARK_MAIN();
