// Microbenchmarks of the engine's hot paths (Google Benchmark).
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
  cl::Acquisition holder(set);
  holder.try_acquire();
  for (auto _ : state) {
    cl::Acquisition waiter(set);
    waiter.start([](cl::Outcome) {});
    holder.release();            // hands the slot to `waiter`
    waiter.release();            // frees it
    holder.~Acquisition();
    new (&holder) cl::Acquisition(set);
    holder.try_acquire();
  }
}
BENCHMARK(BM_HandoffToQueuedWaiter);

static void BM_StdCountingSemaphoreUncontended(benchmark::State& state) {
  std::counting_semaphore<> sem(4);
  for (auto _ : state) {
    sem.acquire();
    sem.release();
  }
}
BENCHMARK(BM_StdCountingSemaphoreUncontended);

BENCHMARK_MAIN();
