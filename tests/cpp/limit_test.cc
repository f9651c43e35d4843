// Limit algorithms against the simulated downstream, in simulated time.
#include "concurrency_limiter/limit.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "simulation.h"

namespace concurrency_limiter {
namespace {

using namespace std::chrono_literals;
using testing::ClosedLoopSimulation;

constexpr std::int64_t kCapacity = 50;
constexpr std::int64_t kClients = 100;

// Successes per simulated second with the best fixed limit, over `seconds`.
double best_static_goodput(double k, double seconds, double base = 0.1) {
  double best = 0.0;
  for (std::int64_t limit = 1; limit <= 2 * static_cast<std::int64_t>(k) + 2; ++limit) {
    FixedLimit fixed(limit);
    ClosedLoopSimulation sim(fixed, kCapacity, kClients);
    sim.downstream.k = k;
    sim.downstream.base = base;
    sim.run_until(seconds);
    best = std::max(best, static_cast<double>(sim.completed()) / seconds);
  }
  return best;
}

void print_trace(const ClosedLoopSimulation& sim, double step) {
  std::string line;
  for (double t = 0.0; t < sim.now(); t += step) {
    const auto [lo, hi] = sim.limit_range(t, t + step);
    line += std::to_string(static_cast<int>(t)) + "s:" + std::to_string(lo) +
            (lo == hi ? "" : "-" + std::to_string(hi)) + " ";
  }
  std::printf("limit over time: %s\n", line.c_str());
}

// The convergence test: k = 4, then 8, then 2, each for 40 s; the
// limit is within [0.8k, 1.5k] from 20 s after each change, and goodput in
// each phase is at least 90% of the best fixed limit's.
TEST(GradientLimit, ConvergesFromTheCeilingAndFollowsTheKnee) {
  GradientLimit gradient(GradientOptions{.initial_limit = kCapacity});
  ClosedLoopSimulation sim(gradient, kCapacity, kClients);
  constexpr double kPhase = 40.0;
  double start = 0.0;
  for (double k : {4.0, 8.0, 2.0}) {
    sim.downstream.k = k;
    const std::int64_t done_before = sim.completed();
    sim.run_until(start + kPhase);
    const auto [lo, hi] = sim.limit_range(start + 20.0, start + kPhase);
    EXPECT_GE(static_cast<double>(lo), 0.8 * k) << "k=" << k;
    EXPECT_LE(static_cast<double>(hi), 1.5 * k) << "k=" << k;
    // The last moment the limit was outside the bounds, from the change.
    double settled = 0.0;
    for (double t = start; t < start + kPhase; t += 0.1) {
      const auto [l, h] = sim.limit_range(t, t + 0.1);
      if (static_cast<double>(l) < 0.8 * k || static_cast<double>(h) > 1.5 * k) {
        settled = t + 0.1 - start;
      }
    }
    const double goodput =
        static_cast<double>(sim.completed() - done_before) / kPhase;
    const double best = best_static_goodput(k, kPhase);
    EXPECT_GE(goodput, 0.9 * best) << "k=" << k;
    std::printf("k=%.0f: within bounds after %.1f s, limit %lld-%lld after 20 s, "
                "goodput %.1f/s = %.2f of the best fixed limit\n",
                k, settled, static_cast<long long>(lo), static_cast<long long>(hi),
                goodput, goodput / best);
    start += kPhase;
  }
  print_trace(sim, 2.0);
}

// Every knee from every start. From a ceiling 50 times the knee the first
// windows last as long as the requests (5 s at k = 1), hence 30 s.
TEST(GradientLimit, ConvergesForEveryKneeFromEveryStart) {
  for (double k : {1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0}) {
    for (std::int64_t initial : {std::int64_t{1}, std::int64_t{10}, kCapacity}) {
      GradientLimit gradient(GradientOptions{.initial_limit = initial});
      ClosedLoopSimulation sim(gradient, kCapacity, kClients);
      sim.downstream.k = k;
      sim.run_until(60.0);
      const auto [lo, hi] = sim.limit_range(30.0, 60.0);
      EXPECT_GE(static_cast<double>(lo), std::min(0.8 * k, k - 1.0))
          << "k=" << k << " initial=" << initial;
      EXPECT_LE(static_cast<double>(hi), std::max(1.5 * k, k + 1.0))
          << "k=" << k << " initial=" << initial;
    }
  }
}

TEST(GradientLimit, NoUpwardCreepOrProbingDipsUnderSustainedOverload) {
  // Moderate overload: twice as many clients as the knee, for 10 minutes.
  // (From a limit of 50, 8 clients would leave it under-used: never lowered.)
  GradientLimit gradient(GradientOptions{.initial_limit = 10});
  ClosedLoopSimulation sim(gradient, kCapacity, 8);
  sim.downstream.k = 4.0;
  sim.run_until(600.0);
  const auto [lo, hi] = sim.limit_range(20.0, 600.0);
  EXPECT_GE(lo, 4);  // no dips from probing for the no-load latency
  EXPECT_LE(hi, 6);  // and no creep
  EXPECT_NEAR(gradient.no_load_latency(), 0.1, 0.02);
}

TEST(GradientLimit, LearnsFromModerateLoadWithTheDefaultStart) {
  // The overload experiment's steady state: 10 busy clients, a ceiling of
  // 50, a downstream (2 cores) past its knee at 2.
  GradientLimit gradient;
  ClosedLoopSimulation sim(gradient, kCapacity, 10);
  sim.downstream.k = 2.0;
  sim.run_until(60.0);
  const auto [lo, hi] = sim.limit_range(20.0, 60.0);
  EXPECT_GE(lo, 2);
  EXPECT_LE(hi, 3);
}

TEST(GradientLimit, DoesNotDecreaseAtLowLoad) {
  // 3 clients against a limit of 20, a knee at 4: the limit is never more
  // than half used and latency is normal.
  GradientLimit gradient(GradientOptions{.initial_limit = 20});
  ClosedLoopSimulation sim(gradient, kCapacity, 3);
  sim.downstream.k = 4.0;
  sim.run_until(120.0);
  const auto [lo, hi] = sim.limit_range(0.0, 120.0);
  EXPECT_EQ(lo, 20);
  EXPECT_EQ(hi, 20);
}

TEST(GradientLimit, LightLoadLatencyNoiseDoesNotShrinkTheLimit) {
  // One request at a time against a limit of 20; every third window is four times
  // as slow (a pause, a busy neighbour). The limit does not bind, so the noise
  // must not cut it: a spike later would find it shrunk for no reason.
  GradientLimit gradient(GradientOptions{.initial_limit = 20, .min_window_samples = 5});
  gradient.start(kCapacity);
  Clock::time_point now{};
  std::int64_t limit = 20;
  for (int i = 0; i < 600; ++i) {
    const auto service = (i / 5) % 3 == 2 ? 4ms : 1ms;
    now += service + 1s;
    limit = gradient.update(
        LimitSample{.end = now, .service_time = service, .in_flight = 1});
    ASSERT_EQ(limit, 20) << "sample " << i;
  }
}

TEST(GradientLimit, DecreasesUnderSustainedErrors) {
  // The downstream has room for everyone, but 30% of requests fail.
  GradientLimit gradient;
  ClosedLoopSimulation sim(gradient, kCapacity, kClients);
  sim.downstream.k = 100.0;
  sim.downstream.error_rate = 0.3;
  sim.run_until(10.0);
  const std::int64_t early = sim.limit();
  EXPECT_LT(early, kCapacity);
  sim.run_until(60.0);
  EXPECT_LT(sim.limit(), early);
  EXPECT_LE(sim.limit(), 2);
}

TEST(GradientLimit, ToleratesOccasionalErrors) {
  GradientLimit gradient;
  ClosedLoopSimulation sim(gradient, kCapacity, kClients);
  sim.downstream.k = 8.0;
  sim.downstream.error_rate = 0.01;
  sim.run_until(60.0);
  const auto [lo, hi] = sim.limit_range(20.0, 60.0);
  EXPECT_GE(static_cast<double>(lo), 0.8 * 8);
  EXPECT_LE(static_cast<double>(hi), 1.5 * 8);
}

TEST(GradientLimit, FastDropsDoNotLookLikeLowLatency) {
  // Half the requests fail at once (1 ms) while the successes take 400 ms
  // (a tolerated drop rate here): drops must never feed the latency average.
  GradientLimit gradient(GradientOptions{.initial_limit = 10, .drop_rate = 0.6});
  gradient.start(kCapacity);
  Clock::time_point now{};
  std::int64_t limit = 10;
  for (int i = 0; i < 2000; ++i) {
    now += 10ms;
    const bool drop = i % 2 == 0;
    limit = gradient.update(LimitSample{.end = now,
                                        .service_time = drop ? 1ms : 400ms,
                                        .in_flight = limit,
                                        .dropped = drop});
  }
  EXPECT_NEAR(gradient.no_load_latency(), 0.4, 1e-9);
}

TEST(GradientLimit, RelearnsWhenTheDownstreamItselfGetsSlower) {
  GradientLimit gradient;
  ClosedLoopSimulation sim(gradient, kCapacity, kClients);
  sim.downstream.k = 4.0;
  sim.run_until(40.0);
  sim.downstream.base = 0.2;  // every request twice as slow, same knee
  sim.run_until(100.0);
  const auto [lo, hi] = sim.limit_range(70.0, 100.0);
  EXPECT_GE(static_cast<double>(lo), 0.8 * 4);
  EXPECT_LE(static_cast<double>(hi), 1.5 * 4);
  EXPECT_NEAR(gradient.no_load_latency(), 0.2, 0.04);
}

TEST(GradientLimit, ADownstreamThatGetsSlowerDoesNotCollapseTheLimit) {
  // Every request twice (three times) as slow from one moment, same knee: a
  // cut that lowers the concurrency without lowering the latency shows the
  // no-load estimate is stale. The limit must not be cut on to the floor
  // (a limit of 1 against a downstream with room for 4 idles it).
  for (double factor : {2.0, 3.0}) {
    constexpr double k = 4.0;
    GradientLimit gradient;
    ClosedLoopSimulation sim(gradient, kCapacity, kClients);
    sim.downstream.k = k;
    sim.run_until(40.0);
    sim.downstream.base = 0.1 * factor;
    const std::int64_t done_before = sim.completed();
    sim.run_until(100.0);
    const auto [lo, hi] = sim.limit_range(46.0, 100.0);  // after 6 s
    EXPECT_GE(static_cast<double>(lo), 0.8 * k) << "x" << factor;
    EXPECT_LE(static_cast<double>(hi), 1.5 * k) << "x" << factor;
    EXPECT_GE(sim.limit_range(40.0, 100.0).first, 2) << "x" << factor;
    const double goodput = static_cast<double>(sim.completed() - done_before) / 60.0;
    const double best = best_static_goodput(k, 60.0, 0.1 * factor);
    EXPECT_GE(goodput, 0.9 * best) << "x" << factor;
    std::printf("base x%.0f: limit %lld-%lld from 6 s after, goodput %.2f of the best fixed limit\n",
                factor, static_cast<long long>(lo), static_cast<long long>(hi), goodput / best);
    EXPECT_NEAR(gradient.no_load_latency(), 0.1 * factor, 0.02 * factor);
  }
}

TEST(GradientLimit, StaysWithinItsBounds) {
  GradientLimit gradient(GradientOptions{.min_limit = 3, .initial_limit = 5});
  ClosedLoopSimulation sim(gradient, 8, kClients);
  sim.downstream.k = 1.0;
  sim.run_until(60.0);
  EXPECT_EQ(sim.limit_range(0.0, 60.0).first, 3);
  sim.downstream.k = 100.0;
  sim.run_until(120.0);
  EXPECT_EQ(sim.limit(), 8);
}

TEST(GradientLimit, RejectsBadOptionsNamingThem) {
  auto message = [](auto make) {
    try {
      make();
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no exception");
  };
  EXPECT_NE(message([] { GradientLimit(GradientOptions{.min_limit = 0}); }).find("min_limit"),
            std::string::npos);
  EXPECT_NE(message([] { GradientLimit(GradientOptions{.tolerance = 1.0}); }).find("tolerance"),
            std::string::npos);
  EXPECT_NE(message([] { GradientLimit(GradientOptions{.backoff = 1.0}); }).find("backoff"),
            std::string::npos);
  EXPECT_NE(message([] {
              GradientLimit(GradientOptions{.min_limit = 4, .initial_limit = 2});
            }).find("initial_limit"),
            std::string::npos);
  EXPECT_NE(message([] { GradientLimit(GradientOptions{.min_limit = 5}).start(3); })
                .find("min_limit (5) must be <= capacity (3)"),
            std::string::npos);
  EXPECT_NE(message([] { GradientLimit(GradientOptions{.initial_limit = 9}).start(3); })
                .find("initial_limit (9) must be <= capacity (3)"),
            std::string::npos);
}

// What a host resource does with the state at every release: another
// instance with the same options, given the state, carries on exactly where
// the first one was; a damaged state is brought into range and still works.
TEST(GradientLimit, StateRestoredElsewhereCarriesOnAndDamageIsRepaired) {
  const GradientOptions options{.min_limit = 2, .initial_limit = kCapacity};
  GradientLimit original(options);
  ClosedLoopSimulation sim(original, kCapacity, kClients);
  sim.downstream.k = 4.0;
  sim.run_until(15.0);
  GradientLimit copy(options);
  copy.start(kCapacity);
  copy.restore(original.state(), kCapacity, Clock::time_point(std::chrono::seconds(15)));
  for (int i = 0; i < 200; ++i) {
    const LimitSample s{.end = Clock::time_point(std::chrono::seconds(15)) + i * 10ms,
                        .service_time = 40ms,
                        .in_flight = 4,
                        .dropped = i % 7 == 0};
    ASSERT_EQ(copy.update(s), original.update(s)) << i;
  }
  EXPECT_EQ(copy.limit(), original.limit());

  GradientLimit::State damaged = original.state();
  std::memset(static_cast<void*>(&damaged), 0xff, sizeof damaged);
  GradientLimit repaired(options);
  repaired.start(kCapacity);
  repaired.restore(damaged, kCapacity, Clock::time_point(std::chrono::seconds(30)));
  EXPECT_GE(repaired.limit(), 2.0);
  EXPECT_LE(repaired.limit(), static_cast<double>(kCapacity));
  for (int i = 0; i < 50; ++i) {
    const std::int64_t limit = repaired.update(LimitSample{
        .end = Clock::time_point(std::chrono::seconds(30)) + i * 100ms,
        .service_time = 10ms,
        .dropped = true});
    EXPECT_GE(limit, 2);
    EXPECT_LE(limit, kCapacity);
  }
  EXPECT_EQ(repaired.limit(), 2.0);  // out of range, then drops: the floor
}

// A state written with another clock (its times later than now) must not
// freeze the algorithm: its change time and window start count as unset.
TEST(GradientLimit, StateFromAnotherClocksTimeDoesNotFreezeIt) {
  const GradientOptions options{.initial_limit = 10};
  GradientLimit other(options);
  ClosedLoopSimulation sim(other, kCapacity, kClients);
  sim.downstream.k = 8.0;
  sim.run_until(300.0);  // its times reach 300 s; ours start at 10 s
  const double before = other.limit();
  GradientLimit here(options);
  here.start(kCapacity);
  const Clock::time_point now(std::chrono::seconds(10));
  here.restore(other.state(), kCapacity, now);
  EXPECT_DOUBLE_EQ(here.limit(), before);
  for (int i = 1; i <= 300; ++i) {  // 30 s of drops
    here.update(LimitSample{.end = now + i * 100ms, .service_time = 50ms,
                            .in_flight = 4, .dropped = true});
  }
  EXPECT_LT(here.limit(), before * 0.5);

  AimdLimit aimd_other(AimdOptions{.initial_limit = 10});
  ClosedLoopSimulation aimd_sim(aimd_other, kCapacity, kClients);
  aimd_sim.run_until(300.0);
  AimdLimit aimd_here(AimdOptions{.initial_limit = 10});
  aimd_here.start(kCapacity);
  aimd_here.restore(aimd_other.state(), kCapacity, now);
  const double aimd_before = aimd_here.limit();
  for (int i = 1; i <= 300; ++i) {
    aimd_here.update(LimitSample{.end = now + i * 100ms, .service_time = 50ms,
                                 .in_flight = 4, .dropped = true});
  }
  EXPECT_LT(aimd_here.limit(), aimd_before * 0.5);
}

TEST(AimdLimit, GrowsWhileUsedAndBacksOffOnDrops) {
  AimdLimit aimd(AimdOptions{.initial_limit = 10});
  ClosedLoopSimulation sim(aimd, kCapacity, kClients);
  sim.downstream.k = 100.0;
  sim.run_until(20.5);
  EXPECT_GE(sim.limit(), 25);  // about +1 per 1 s window
  sim.downstream.error_rate = 0.2;
  const std::int64_t before = sim.limit();
  sim.run_until(40.0);
  EXPECT_LT(sim.limit(), before / 2);
}

TEST(AimdLimit, DoesNotGrowWhenUnderUsed) {
  AimdLimit aimd(AimdOptions{.initial_limit = 10});
  ClosedLoopSimulation sim(aimd, kCapacity, 4);
  sim.run_until(60.0);
  EXPECT_EQ(sim.limit(), 10);
}

TEST(AimdLimit, TreatsSlowWindowsAsDrops) {
  AimdLimit aimd(AimdOptions{.timeout = 500ms});
  ClosedLoopSimulation sim(aimd, kCapacity, kClients);
  sim.downstream.k = 4.0;  // 50 in flight: 1.25 s each
  sim.run_until(60.0);
  EXPECT_LE(sim.limit(), 21);  // 0.1 s x n / 4 <= 0.5 s
}

TEST(FixedLimit, NeverMovesAndIsClampedToCapacity) {
  FixedLimit fixed(7);
  ClosedLoopSimulation sim(fixed, kCapacity, kClients);
  sim.downstream.error_rate = 0.5;
  sim.run_until(30.0);
  EXPECT_EQ(sim.limit_range(0.0, 30.0), std::make_pair(std::int64_t{7}, std::int64_t{7}));
  GradientLimit gradient;
  EXPECT_EQ(gradient.start(50), kDefaultInitialLimit);
  GradientLimit small;
  EXPECT_EQ(small.start(5), 5);
  FixedLimit big(100);
  EXPECT_EQ(big.start(10), 10);
}

TEST(SampleWindow, ClosesOnlyWithEnoughTimeAndSamples) {
  SampleWindow window(1s, 3);
  Clock::time_point t{};
  EXPECT_FALSE(window.add({.end = t, .service_time = 10ms, .in_flight = 2}));
  EXPECT_FALSE(window.add({.end = t + 2s, .service_time = 30ms, .in_flight = 4}));
  const auto w = window.add({.end = t + 2s, .service_time = 1ms, .in_flight = 6, .dropped = true});
  ASSERT_TRUE(w);
  EXPECT_EQ(w->samples, 3);
  EXPECT_EQ(w->drops, 1);
  EXPECT_NEAR(w->mean_latency, 0.020, 1e-9);
  EXPECT_NEAR(w->mean_in_flight, 3.0, 1e-9);
  EXPECT_EQ(w->max_in_flight, 6);
  EXPECT_FALSE(window.add({.end = t + 2500ms, .service_time = 10ms}));
}

}  // namespace
}  // namespace concurrency_limiter
