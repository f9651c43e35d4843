// The limit algorithms on the grid of tests/cpp/limit_grid.h, in simulated
// time: per cell, the best fixed limit (its limit, throughput and mean
// latency), then per algorithm its throughput and mean latency as ratios to
// the best fixed limit's, and the limit it settled at (time-weighted mean
// over the measurement). The goals: throughput >= 0.90, latency <= 1.50.
//
//   limit_grid                 every built-in algorithm
//   limit_grid gradient2 aimd  those only
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "concurrency_limiter/limit.h"
#include "limit_grid.h"

namespace cl = concurrency_limiter;
using cl::testing::GridCell;
using cl::testing::GridResult;

namespace {

std::unique_ptr<cl::LimitAlgorithm> make(const std::string& name) {
  if (name == "gradient2") return std::make_unique<cl::Gradient2Limit>();
  if (name == "vegas") return std::make_unique<cl::VegasLimit>();
  if (name == "aimd") return std::make_unique<cl::AimdLimit>();
  if (name == "gradient") return std::make_unique<cl::GradientLimit>();
  return nullptr;
}

struct Totals {
  double worst_throughput = 1e9;
  double worst_latency = 0.0;
  std::string worst_throughput_cell, worst_latency_cell;
  int misses = 0;
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> names;
  for (int i = 1; i < argc; ++i) names.emplace_back(argv[i]);
  if (names.empty()) names = {"gradient2", "vegas", "aimd", "gradient"};
  for (const auto& n : names) {
    if (!make(n)) {
      std::fprintf(stderr, "unknown algorithm %s (gradient2, vegas, aimd, gradient)\n", n.c_str());
      return 2;
    }
  }

  std::printf("%-24s %14s", "cell", "best fixed");
  for (const auto& n : names) std::printf(" | %-18s", n.c_str());
  std::printf("\n%-24s %14s", "", "limit thr/s");
  for (std::size_t i = 0; i < names.size(); ++i) std::printf(" | %-18s", "thr  lat  limit");
  std::printf("\n");

  std::vector<Totals> totals(names.size());
  for (const GridCell& cell : cl::testing::grid_cells()) {
    const auto best = cl::testing::best_fixed(cell);
    std::printf("%-24s %5lld %8.1f", cell.name().c_str(), static_cast<long long>(best.limit),
                best.result.throughput);
    for (std::size_t i = 0; i < names.size(); ++i) {
      auto algorithm = make(names[i]);
      const GridResult r = cl::testing::run_cell(*algorithm, cell);
      const double thr = r.throughput / best.result.throughput;
      const double lat = r.latency / best.result.latency;
      const bool miss = thr < 0.9 || lat > 1.5;
      std::printf(" | %4.2f %4.2f %5.1f%s", thr, lat, r.limit, miss ? "*" : " ");
      Totals& t = totals[i];
      if (thr < t.worst_throughput) {
        t.worst_throughput = thr;
        t.worst_throughput_cell = cell.name();
      }
      if (lat > t.worst_latency) {
        t.worst_latency = lat;
        t.worst_latency_cell = cell.name();
      }
      t.misses += miss ? 1 : 0;
    }
    std::printf("\n");
    std::fflush(stdout);
  }
  std::printf("\n* misses a goal (throughput >= 0.90x, mean latency <= 1.50x the best fixed limit's)\n");
  std::printf("%-10s %-6s %-34s %-6s %-34s %s\n", "algorithm", "thr", "(worst cell)", "lat",
              "(worst cell)", "cells missing a goal");
  for (std::size_t i = 0; i < names.size(); ++i) {
    const Totals& t = totals[i];
    std::printf("%-10s %-6.2f %-34s %-6.2f %-34s %d of %zu\n", names[i].c_str(),
                t.worst_throughput, t.worst_throughput_cell.c_str(), t.worst_latency,
                t.worst_latency_cell.c_str(), t.misses, cl::testing::grid_cells().size());
  }
  return 0;
}
