// The grid on which limit algorithms are judged: service-time distributions
// x mean service times x knees, each cell a closed loop of 100 clients
// against a resource of capacity 50, in simulated time. An algorithm is
// measured against the best fixed limit of the same cell. Shared by the
// tests (tests/cpp/limit_grid_test.cc) and the table (bench/limit_grid.cc).
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "simulation.h"

// Sanitizer builds run the grid's tests on a subset (grid_cells_to_test()):
// a 5 ms cell simulates up to 1.8 million requests, minutes under ASan.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define CL_GRID_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define CL_GRID_SANITIZED 1
#endif
#endif

namespace concurrency_limiter::testing {

inline constexpr std::int64_t kGridCapacity = 50;
inline constexpr std::int64_t kGridClients = 100;

struct GridCell {
  ServiceTimes service_times;
  double mean;  // seconds
  double k;     // the knee; 0: none (the downstream never slows down)

  std::string name() const {
    const std::string m = mean < 1.0 ? std::to_string(static_cast<int>(mean * 1000 + 0.5)) + "ms"
                                     : std::to_string(static_cast<int>(mean + 0.5)) + "s";
    return std::string(to_string(service_times)) + " " + m + " " +
           (k == 0.0 ? std::string("no knee") : "k=" + std::to_string(static_cast<int>(k)));
  }
};

// Every cell: 4 distributions x 4 means x (no knee, k = 2, 4, 8, 32).
inline std::vector<GridCell> grid_cells() {
  std::vector<GridCell> cells;
  for (ServiceTimes d : {ServiceTimes::kExponential, ServiceTimes::kLognormal05,
                         ServiceTimes::kLognormal10, ServiceTimes::kBimodal}) {
    for (double mean : {0.005, 0.05, 0.3, 1.0}) {
      for (double k : {0.0, 2.0, 4.0, 8.0, 32.0}) cells.push_back({d, mean, k});
    }
  }
  return cells;
}

// The cells the tests run: every cell, or under a sanitizer those with
// means of 50 ms and more (60 of 80; the same algorithm code runs, on
// thousands of requests per cell instead of millions).
#ifdef CL_GRID_SANITIZED
inline constexpr bool kSanitized = true;
#else
inline constexpr bool kSanitized = false;
#endif
inline std::vector<GridCell> grid_cells_to_test() {
  std::vector<GridCell> cells;
  for (const GridCell& c : grid_cells()) {
    if (!kSanitized || c.mean >= 0.05) cells.push_back(c);
  }
  return cells;
}

inline void configure(ClosedLoopSimulation& sim, const GridCell& cell) {
  sim.downstream.service_times = cell.service_times;
  sim.downstream.base = cell.mean;
  sim.downstream.k = cell.k == 0.0 ? 1e9 : cell.k;
}

// What a run measured, over its measurement phase.
struct GridResult {
  double throughput = 0.0;  // successes per simulated second
  double latency = 0.0;     // mean service time, seconds
  double limit = 0.0;       // time-weighted mean limit in force
};

// How long a cell runs: a warm-up, then the measurement, each at least a
// time and a number of requests. The time: long enough for windows of 10
// samples at a limit of 2 and 1 s service times to come many times (200
// means), at least a minute for the fast ones. The requests: the
// measurement counts at least as many as the best fixed limit's (10000),
// so that both are measured as precisely (800 requests, as a cell with 1 s
// service times and a knee of 2 gave in 400 s, leave +-5 % of noise on the
// throughput, the fixed limit's 10000 +-1 %); the warm-up holds at least
// 2000, so that an algorithm has learned from as many requests in a slow
// cell as it would in a second of a fast one, whatever the knee. (A warm-up
// in mean service times alone gave the slow cells with small knees, where
// requests queue past the knee at the initial limit, 20 latencies at that
// limit: the limit was still coming down from it when the measurement
// began.)
inline double warmup_seconds(const GridCell& c) { return std::max(60.0, 200.0 * c.mean); }
inline double measure_seconds(const GridCell& c) { return std::max(120.0, 400.0 * c.mean); }
inline constexpr std::int64_t kWarmupRequests = 2000;
inline constexpr std::int64_t kMeasureRequests = 10000;

// Runs `sim` until `seconds` from now and `requests` more successes.
inline void run_for(ClosedLoopSimulation& sim, double seconds, std::int64_t requests) {
  const std::int64_t target = sim.completed() + requests;
  sim.run_until(sim.now() + seconds);
  while (sim.completed() < target) sim.run_until(sim.now() + seconds / 10.0);
}

inline double mean_limit(const ClosedLoopSimulation& sim, double from, double to) {
  const auto& trace = sim.trace();
  double sum = 0.0;
  for (std::size_t i = 0; i < trace.size(); ++i) {
    const double start = std::max(from, trace[i].time);
    const double stop = std::min(to, i + 1 < trace.size() ? trace[i + 1].time : to);
    if (stop > start) sum += static_cast<double>(trace[i].limit) * (stop - start);
  }
  return sum / (to - from);
}

// `algorithm` (fresh, not started) in `cell`.
inline GridResult run_cell(LimitAlgorithm& algorithm, const GridCell& cell,
                           std::uint32_t seed = 1) {
  ClosedLoopSimulation sim(algorithm, kGridCapacity, kGridClients, seed);
  configure(sim, cell);
  run_for(sim, warmup_seconds(cell), kWarmupRequests);
  const double warmup = sim.now();
  const std::int64_t done = sim.completed();
  const double latency = sim.latency_sum();
  run_for(sim, measure_seconds(cell), kMeasureRequests);
  const double end = sim.now();
  GridResult r;
  const auto n = static_cast<double>(sim.completed() - done);
  r.throughput = n / (end - warmup);
  r.latency = n > 0 ? (sim.latency_sum() - latency) / n : 0.0;
  r.limit = mean_limit(sim, warmup, end);
  return r;
}

// The best fixed limit of a cell: of the limits whose throughput is within
// 2 % of the highest, the one with the lowest mean latency (past the knee
// more concurrency only adds latency). Fixed limits from 1 to 16 one by one,
// then in steps up to the capacity; each runs for 10000 mean service times.
struct BestFixed {
  std::int64_t limit = 0;
  GridResult result;
};

inline BestFixed best_fixed(const GridCell& cell, std::uint32_t seed = 1) {
  std::vector<std::int64_t> limits;
  for (std::int64_t l = 1; l <= 16; ++l) limits.push_back(l);
  for (std::int64_t l : {18, 20, 24, 28, 32, 36, 40, 45, 50}) limits.push_back(l);
  std::vector<std::pair<std::int64_t, GridResult>> results;
  double top = 0.0;
  for (std::int64_t l : limits) {
    FixedLimit fixed(l);
    ClosedLoopSimulation sim(fixed, kGridCapacity, kGridClients, seed);
    configure(sim, cell);
    const double per_second = static_cast<double>(l) / cell.mean;
    const double warmup = 5.0 * cell.mean * std::max(1.0, static_cast<double>(l) / sim.downstream.k);
    const double end = warmup + 10000.0 / std::min(per_second, sim.downstream.k / cell.mean);
    sim.run_until(warmup);
    const std::int64_t done = sim.completed();
    const double latency = sim.latency_sum();
    sim.run_until(end);
    GridResult r;
    const auto n = static_cast<double>(sim.completed() - done);
    r.throughput = n / (end - warmup);
    r.latency = n > 0 ? (sim.latency_sum() - latency) / n : 0.0;
    r.limit = static_cast<double>(l);
    top = std::max(top, r.throughput);
    results.emplace_back(l, r);
  }
  BestFixed best;
  for (const auto& [l, r] : results) {
    if (r.throughput < 0.98 * top) continue;
    if (best.limit == 0 || r.latency < best.result.latency) best = {l, r};
  }
  return best;
}

}  // namespace concurrency_limiter::testing
