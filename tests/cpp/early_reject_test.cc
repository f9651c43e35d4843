// Early rejection (ResourceOptions::early_reject): the engine's behaviour,
// and a simulation in simulated time of how often it refuses a request that
// a plain wait would have served in time.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <deque>
#include <queue>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "simulation.h"
#include "test_util.h"

namespace concurrency_limiter {
namespace {

using namespace std::chrono_literals;
using testing::Recorder;
using testing::set_of;

std::shared_ptr<Resource> early(QueueDiscipline queue, std::int64_t capacity = 1) {
  return Resource::create(ResourceOptions{
      .name = "early", .capacity = capacity, .queue = queue, .early_reject = true});
}

// One request that holds a slot for at least `hold`: a timed hold (the first
// hold of a resource always is), so the service-time estimate is >= `hold`
// whatever the machine's speed.
void teach(const std::shared_ptr<Resource>& r, Clock::duration hold) {
  Acquisition a(set_of({r}));
  ASSERT_TRUE(a.try_acquire());
  std::this_thread::sleep_for(hold);
  a.release();
}

// A holder of every slot and `n` waiters without a deadline.
struct Backlog {
  Backlog(const std::shared_ptr<Resource>& r, int n) {
    for (std::int64_t i = 0; i < r->capacity(); ++i) {
      holders.push_back(std::make_unique<Acquisition>(set_of({r})));
      EXPECT_TRUE(holders.back()->try_acquire());
    }
    recs.resize(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      waiters.push_back(std::make_unique<Acquisition>(set_of({r})));
      EXPECT_EQ(waiters.back()->start(recs[static_cast<std::size_t>(i)].callback()),
                Outcome::kPending);
    }
  }
  std::vector<std::unique_ptr<Acquisition>> holders;
  std::vector<Recorder> recs;
  std::vector<std::unique_ptr<Acquisition>> waiters;
};

TEST(EarlyReject, OffByDefaultAndRefusedWithPerKey) {
  EXPECT_FALSE(Resource::create("r", 1)->early_reject());
  EXPECT_TRUE(early(QueueDiscipline::kFifo)->early_reject());
  // Host scope supports it (host_resource_test.cc, HostEarlyReject).
  EXPECT_THROW(Resource::create(ResourceOptions{
                   .name = "k", .capacity = 2, .per_key = 1, .early_reject = true}),
               std::invalid_argument);
}

TEST(EarlyReject, ServiceEstimateFollowsTimedHolds) {
  auto r = early(QueueDiscipline::kFifo);
  EXPECT_FALSE(r->statistics().service_seconds.has_value());
  teach(r, 20ms);
  const auto estimate = r->statistics().service_seconds;
  ASSERT_TRUE(estimate.has_value());
  EXPECT_GE(*estimate, 0.020);

  ServiceTimeEstimate e;
  e.add(1.0);
  e.add(2.0);  // moves by kWeight of the difference
  EXPECT_DOUBLE_EQ(*e.seconds(), 1.0 + ServiceTimeEstimate::kWeight);
}

TEST(EarlyReject, NoEstimateNoEarlyRejection) {
  auto r = early(QueueDiscipline::kFifo);
  Backlog backlog(r, 10);
  Recorder rec;
  Acquisition late(set_of({r}));
  EXPECT_EQ(late.start(rec.callback(), Clock::now() + 1ms), Outcome::kPending);
  EXPECT_EQ(r->waiting(), 11);
  late.expire();
  EXPECT_EQ(late.outcome(), Outcome::kTimeout);
  EXPECT_FALSE(late.predicted_wait().has_value());  // only early rejection predicts
  EXPECT_EQ(r->statistics().rejected(Outcome::kPredictedTimeout), 0u);
}

TEST(EarlyReject, FifoLongQueueRefusedAtOnceWithoutQueueingOrLeak) {
  auto r = early(QueueDiscipline::kFifo, 2);
  teach(r, 20ms);  // estimate >= 20 ms
  {
    Backlog backlog(r, 10);  // predicted wait >= 10 / 2 x 20 ms = 100 ms
    Recorder rec;
    Acquisition late(set_of({r}));
    EXPECT_EQ(late.start(rec.callback(), Clock::now() + 10ms), Outcome::kPredictedTimeout);
    EXPECT_TRUE(rec.outcomes.empty());  // decided by start(): no callback
    EXPECT_EQ(late.state(), Acquisition::State::kRejected);
    EXPECT_EQ(late.refused_by(), r.get());
    // The wait it predicted: the ten ahead on two slots, at the estimate.
    const auto predicted = late.predicted_wait();
    ASSERT_TRUE(predicted.has_value());
    EXPECT_DOUBLE_EQ(*predicted, 10.0 / 2.0 * *r->statistics().service_seconds);
    EXPECT_EQ(r->waiting(), 10);
    EXPECT_EQ(r->in_use(), 2);
    EXPECT_EQ(r->statistics().rejected(Outcome::kPredictedTimeout), 1u);

    // The blocking API too, and the same outcome from its Permit.
    Permit p = r->acquire_for(10ms);
    EXPECT_FALSE(p);
    EXPECT_EQ(p.outcome(), Outcome::kPredictedTimeout);
    ASSERT_TRUE(p.predicted_wait().has_value());
    EXPECT_DOUBLE_EQ(*p.predicted_wait(), *predicted);
    Permit moved = std::move(p);
    EXPECT_EQ(moved.predicted_wait(), predicted);
    EXPECT_EQ(r->waiting(), 10);
    EXPECT_EQ(to_string(Outcome::kPredictedTimeout), "predicted_timeout");
  }
  // Every waiter was served or cancelled, nothing leaked.
  EXPECT_EQ(r->in_use(), 0);
  EXPECT_EQ(r->waiting(), 0);
  EXPECT_TRUE(r->try_acquire());
}

// predicted_wait() is the resource's prediction only: an acquisition that
// its owner refused or cancelled with kPredictedTimeout has none.
TEST(EarlyReject, NoPredictionMadeMeansNoPredictedWait) {
  auto r = early(QueueDiscipline::kFifo);
  Acquisition refused(set_of({r}));
  EXPECT_EQ(refused.refuse(Outcome::kPredictedTimeout), Outcome::kPredictedTimeout);
  EXPECT_FALSE(refused.predicted_wait().has_value());

  Acquisition holder(set_of({r}));
  ASSERT_TRUE(holder.try_acquire());
  Recorder rec;
  Acquisition waiter(set_of({r}));
  ASSERT_EQ(waiter.start(rec.callback()), Outcome::kPending);
  waiter.cancel(Outcome::kPredictedTimeout);
  EXPECT_EQ(waiter.outcome(), Outcome::kPredictedTimeout);
  EXPECT_FALSE(waiter.predicted_wait().has_value());
  holder.release();
}

TEST(EarlyReject, LongTimeoutWaits) {
  auto r = early(QueueDiscipline::kFifo);
  teach(r, 20ms);
  Backlog backlog(r, 10);
  Recorder rec;
  Acquisition patient(set_of({r}));
  EXPECT_EQ(patient.start(rec.callback(), Clock::now() + 1h), Outcome::kPending);
  // No deadline at all (plain start()) waits as well.
  Acquisition forever(set_of({r}));
  EXPECT_EQ(forever.start(rec.callback()), Outcome::kPending);
  EXPECT_EQ(r->waiting(), 12);
  EXPECT_EQ(r->statistics().rejected(Outcome::kPredictedTimeout), 0u);
}

TEST(EarlyReject, LifoNeverRejectsEarly) {
  auto r = early(QueueDiscipline::kLifo);
  teach(r, 20ms);
  Backlog backlog(r, 10);
  Recorder rec;
  Acquisition newest(set_of({r}));
  EXPECT_EQ(newest.start(rec.callback(), Clock::now() + 1ms), Outcome::kPending);
  EXPECT_EQ(r->statistics().rejected(Outcome::kPredictedTimeout), 0u);
}

TEST(EarlyReject, AdaptiveQueueDrainingAsFifo) {
  auto r = early(QueueDiscipline::kAdaptive);
  teach(r, 20ms);
  Backlog backlog(r, 10);  // not standing: its head is younger than the target
  Recorder rec;
  Acquisition late(set_of({r}));
  EXPECT_EQ(late.start(rec.callback(), Clock::now() + 1ms), Outcome::kPredictedTimeout);
}

// ---- Simulation ------------------------------------------------------------
//
// Open-loop Poisson arrivals on `slots` slots in FIFO order, each request
// with the same timeout, in simulated time: a normal load, a spike at twice
// the capacity, then the normal load again. Early rejection decides exactly
// as the engine does (ServiceTimeEstimate, fed by the timed holds: every hold
// that waited and one in 64 of the others).
//
// Whether a request refused early would have been granted in time had it
// waited is tracked exactly: in FIFO order, the requests ahead of it are not
// affected by it, nor are the holders; so it would have been granted at the
// first release after the newest request queued at its arrival (the last one
// ahead of it) left the queue, granted or timed out.
struct SimulationResult {
  std::int64_t arrivals = 0;
  std::int64_t granted = 0;
  std::int64_t timed_out = 0;
  std::int64_t early = 0;
  std::int64_t early_would_be_granted = 0;  // in time, had it waited
  // ...by a slot that nobody else took (the queue was empty): capacity lost.
  std::int64_t early_wasted = 0;
  // How long each request granted after a wait had waited, in arrival order.
  std::vector<double> granted_waits;
  double false_share() const {
    return early == 0 ? 0.0 : static_cast<double>(early_would_be_granted) /
                                  static_cast<double>(early);
  }
  double wasted_share() const {
    return early == 0 ? 0.0 : static_cast<double>(early_wasted) / static_cast<double>(early);
  }
};

// `eagerness`: how much sooner than the engine the rule refuses (2: it
// refuses a request whose predicted wait exceeds half its timeout), to show
// what the checks below would catch.
SimulationResult simulate(testing::ServiceTimes times, bool early_reject, std::uint32_t seed,
                          double eagerness = 1.0) {
  constexpr std::int64_t kSlots = 10;
  constexpr double kService = 0.05;  // mean, seconds
  constexpr double kTimeout = 1.0;
  const struct {
    double until, load;
  } phases[] = {{30.0, 0.8}, {60.0, 2.0}, {90.0, 0.8}};

  testing::SimulatedDownstream downstream;
  downstream.service_times = times;
  std::mt19937 rng(seed);
  std::mt19937 service_rng(seed + 1000);

  struct Waiter {
    std::int64_t id;
    double arrival;
  };
  std::deque<Waiter> queue;
  std::vector<double> left_queue;  // per request id: when it left the queue
  std::vector<double> releases;    // every release time, in order
  std::vector<bool> freed;         // per release: no waiter took the slot
  struct Ghost {
    double arrival;
    std::int64_t behind;  // id of the newest waiter at its arrival
  };
  std::vector<Ghost> ghosts;
  std::priority_queue<std::pair<double, double>, std::vector<std::pair<double, double>>,
                      std::greater<>>
      holds;  // (end, start)
  std::int64_t in_use = 0, at_once = 0;
  ServiceTimeEstimate estimate;
  SimulationResult result;

  // A hold's start is -1 if it is not timed.
  auto grant = [&](double now, bool waited, double arrival) {
    ++in_use;
    ++result.granted;
    if (waited) result.granted_waits.push_back(now - arrival);
    const bool timed = waited || at_once++ % 64 == 0;
    const double end = now + kService * downstream.draw(service_rng);
    holds.push({end, timed ? now : -1.0});
  };
  auto expire_until = [&](double t) {
    while (!queue.empty() && queue.front().arrival + kTimeout <= t) {
      left_queue[static_cast<std::size_t>(queue.front().id)] = queue.front().arrival + kTimeout;
      queue.pop_front();
      ++result.timed_out;
    }
  };

  double now = 0.0;
  std::exponential_distribution<double> gap(1.0);
  std::size_t phase = 0;
  for (;;) {
    const double rate = phases[phase].load * static_cast<double>(kSlots) / kService;
    const double next_arrival = now + gap(rng) / rate;
    // Releases due before the next arrival.
    while (!holds.empty() && holds.top().first <= next_arrival) {
      const auto [end, start] = holds.top();
      holds.pop();
      expire_until(end);
      --in_use;
      releases.push_back(end);
      freed.push_back(queue.empty());
      if (start >= 0.0) estimate.add(end - start);
      if (!queue.empty()) {
        left_queue[static_cast<std::size_t>(queue.front().id)] = end;
        grant(end, true, queue.front().arrival);
        queue.pop_front();
      }
    }
    now = next_arrival;
    if (now >= phases[phase].until) {
      if (++phase == std::size(phases)) break;
      continue;
    }
    expire_until(now);
    const std::int64_t id = result.arrivals++;
    left_queue.push_back(now);
    if (queue.empty() && in_use < kSlots) {
      grant(now, false, now);
      continue;
    }
    // The engine's test, with the time the request has left.
    if (early_reject && estimate.predicts_timeout(static_cast<std::int64_t>(queue.size()),
                                                  kSlots, kTimeout / eagerness)) {
      ++result.early;
      ghosts.push_back({now, queue.back().id});
      continue;
    }
    queue.push_back({id, now});
  }
  // Drain: every hold ends, every waiter is served or times out.
  while (!holds.empty()) {
    const auto [end, start] = holds.top();
    holds.pop();
    expire_until(end);
    --in_use;
    releases.push_back(end);
    freed.push_back(queue.empty());
    if (!queue.empty()) {
      left_queue[static_cast<std::size_t>(queue.front().id)] = end;
      grant(end, true, queue.front().arrival);
      queue.pop_front();
    }
  }
  expire_until(1e300);
  for (const Ghost& g : ghosts) {
    const double ahead_left = left_queue[static_cast<std::size_t>(g.behind)];
    const auto it = std::upper_bound(releases.begin(), releases.end(), ahead_left);
    if (it != releases.end() && *it - g.arrival <= kTimeout) {
      ++result.early_would_be_granted;
      if (freed[static_cast<std::size_t>(it - releases.begin())]) ++result.early_wasted;
    }
  }
  return result;
}

// A rule that lets requests wait is expected to grant waits whose 99th
// percentile is above this share of a plain wait's.
constexpr double kEagerWaitBound = 0.9;

// The `q` quantile (0..1) of `values`.
double quantile(std::vector<double> values, double q) {
  if (values.empty()) return 0.0;
  const auto k = static_cast<std::size_t>(q * static_cast<double>(values.size() - 1));
  std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(k),
                   values.end());
  return values[k];
}

// Three figures per run, against the same arrivals without early rejection:
//  - lost: the share of early rejections that cost a grant, (requests granted
//    without early rejection - with it) / early rejections;
//  - idle: the share of early rejections that, had that one request waited,
//    would have been granted in time by a slot that nobody else took;
//  - instead: the share that, had that one request waited, would have been
//    granted in time at all (in place of a request served behind it). Under
//    a sustained overload this is most of them whatever the rule: each
//    served request could have been another one. Printed, not asserted.
// And the 99th percentile of the waits of the requests granted after a wait:
// a rule that refuses what it should not (too eager) keeps the queue short,
// and with it every wait, far below the timeout; the engine's lets a request
// wait up to about its timeout, as a plain wait would.
TEST(EarlyRejectSimulation, RarelyRefusesWhatAWaitWouldHaveServed) {
  using testing::ServiceTimes;
  std::printf(
      "10 slots, mean service 50 ms, timeout 1 s; Poisson arrivals: 30 s at 0.8 x "
      "capacity, 30 s at 2 x, 30 s at 0.8 x\n%-8s %4s %8s %8s %8s %8s %7s %7s %8s %8s\n",
      "service", "seed", "arrivals", "granted", "timeout", "early", "lost", "idle", "instead",
      "wait p99");
  for (ServiceTimes times :
       {ServiceTimes::kExponential, ServiceTimes::kLognormal10, ServiceTimes::kBimodal}) {
    for (std::uint32_t seed : {1u, 2u, 3u}) {
      const SimulationResult plain = simulate(times, false, seed);
      const SimulationResult early = simulate(times, true, seed);
      const double lost = static_cast<double>(plain.granted - early.granted) /
                          static_cast<double>(early.early);
      const double plain_p99 = quantile(plain.granted_waits, 0.99);
      const double early_p99 = quantile(early.granted_waits, 0.99);
      std::printf("%-8s %4u %8lld %8lld %8lld %8s %7s %7s %8s %7.3fs\n",
                  testing::to_string(times), seed, static_cast<long long>(plain.arrivals),
                  static_cast<long long>(plain.granted), static_cast<long long>(plain.timed_out),
                  "off", "", "", "", plain_p99);
      std::printf("%-8s %4u %8lld %8lld %8lld %8lld %6.2f%% %6.2f%% %7.2f%% %7.3fs\n",
                  testing::to_string(times), seed, static_cast<long long>(early.arrivals),
                  static_cast<long long>(early.granted), static_cast<long long>(early.timed_out),
                  static_cast<long long>(early.early), 100.0 * lost,
                  100.0 * early.wasted_share(), 100.0 * early.false_share(), early_p99);
      const std::string where = std::string(testing::to_string(times)) + " seed " +
                                std::to_string(seed);
      ASSERT_EQ(plain.arrivals, early.arrivals) << where;  // the same arrivals
      // The spike overloads the resource: early rejection has work to do.
      EXPECT_GT(early.early, 1000) << where;
      EXPECT_LT(lost, 0.02) << where;
      EXPECT_LT(early.wasted_share(), 0.02) << where;
      // Most of the refusals come at arrival instead of at the timeout.
      EXPECT_LT(early.timed_out * 4, plain.timed_out) << where;
      // Those it lets wait may wait about as long as a plain wait lets them.
      EXPECT_GT(early_p99, kEagerWaitBound * plain_p99) << where;
    }
  }
}

// The check on waits above catches a rule twice as eager as the engine's,
// which the other figures would let through.
TEST(EarlyRejectSimulation, TheWaitCheckCatchesARuleTwiceAsEager) {
  using testing::ServiceTimes;
  for (ServiceTimes times :
       {ServiceTimes::kExponential, ServiceTimes::kLognormal10, ServiceTimes::kBimodal}) {
    const SimulationResult plain = simulate(times, false, 1);
    const SimulationResult eager = simulate(times, true, 1, 2.0);
    const double eager_p99 = quantile(eager.granted_waits, 0.99);
    const double plain_p99 = quantile(plain.granted_waits, 0.99);
    std::printf("%-8s twice as eager: wait p99 %.3f s, plain %.3f s\n",
                testing::to_string(times), eager_p99, plain_p99);
    EXPECT_LT(eager_p99, kEagerWaitBound * plain_p99) << testing::to_string(times);
  }
}

std::shared_ptr<Resource> fifo_early(std::int64_t capacity = 1) {
  return Resource::create(ResourceOptions{.name = "early",
                                          .capacity = capacity,
                                          .queue = QueueDiscipline::kFifo,
                                          .early_reject = true});
}

void hold_for(const std::shared_ptr<Resource>& r, Clock::duration hold) {
  Acquisition a(set_of({r}));
  ASSERT_TRUE(a.try_acquire());
  std::this_thread::sleep_for(hold);
  a.release();
}

// A slow first hold (a cold start) does not keep refusing once the
// downstream is fast: every hold of an early-rejecting resource is timed,
// so 63 fast ones bring the estimate down even when nothing queues.
TEST(EarlyRejectEdges, AFastDownstreamAfterASlowFirstHoldIsNotRefused) {
  auto r = fifo_early(1);
  hold_for(r, 200ms);  // the first hold: a cold start
  for (int i = 0; i < 63; ++i) hold_for(r, 0ms);  // 63 fast requests since
  Acquisition holder(set_of({r}));
  ASSERT_TRUE(holder.try_acquire());
  Recorder rec;
  Acquisition waiter(set_of({r}));
  ASSERT_EQ(waiter.start(rec.callback()), Outcome::kPending);
  Recorder late_rec;
  Acquisition late(set_of({r}));
  EXPECT_EQ(late.start(late_rec.callback(), Clock::now() + 100ms), Outcome::kPending)
      << "estimate after 64 holds, 63 of them ~0 s: "
      << r->statistics().service_seconds.value_or(-1) << " s";
  late.cancel();
  waiter.cancel();
}

// A request refused early by the second resource of its set leaves nothing
// held on the first.
TEST(EarlyRejectEdges, RefusedBySecondResourceLeavesFirstFree) {
  auto first = Resource::create("first", 2);
  auto second = fifo_early(1);
  hold_for(second, 20ms);
  Backlog backlog(second, 5);
  Recorder rec;
  Acquisition both(set_of({first, second}));
  EXPECT_EQ(both.start(rec.callback(), Clock::now() + 10ms), Outcome::kPredictedTimeout);
  EXPECT_EQ(both.refused_by(), second.get());
  EXPECT_EQ(first->in_use(), 0);
  EXPECT_EQ(first->waiting(), 0);
  EXPECT_EQ(second->waiting(), 5);
  EXPECT_EQ(second->statistics().rejected(Outcome::kPredictedTimeout), 1u);
  EXPECT_EQ(first->statistics().rejected(Outcome::kPredictedTimeout), 0u);
}

// Holds given back unused (Completion::kIgnored: granted after the caller
// stopped waiting) say nothing of the service time.
TEST(EarlyRejectEdges, IgnoredHoldsDoNotDragTheEstimateDown) {
  auto r = fifo_early(1);
  hold_for(r, 50ms);
  Backlog backlog(r, 16);
  backlog.holders[0]->release();
  // Each is granted (a waited hold: timed) and released unused.
  for (auto& w : backlog.waiters) {
    ASSERT_EQ(w->state(), Acquisition::State::kGranted);
    w->release(Completion::kIgnored);
  }
  const double estimate = r->statistics().service_seconds.value_or(0);
  EXPECT_GE(estimate, 0.045) << "16 unused holds moved the estimate from >= 50 ms to "
                             << estimate * 1000 << " ms";
}

// Concurrent acquire_for() with a statistics reader: nothing held or queued
// afterwards, each outcome the callers saw counted once (TSan runs it too).
TEST(EarlyRejectEdges, ConcurrentStressCountsEveryOutcome) {
  auto r = fifo_early(2);
  hold_for(r, 1ms);
  std::atomic<bool> stop{false};
  std::thread reader([&] {
    while (!stop.load()) {
      const auto s = r->statistics();
      EXPECT_LE(s.in_use, 2);
    }
  });
  std::vector<std::array<std::uint64_t, 12>> seen(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<std::uint32_t>(t));
      std::uniform_int_distribution<int> wait_us(0, 3000), hold_us(0, 400);
      for (int i = 0; i < 400; ++i) {
        Permit p = r->acquire_for(std::chrono::microseconds(wait_us(rng)));
        ++seen[static_cast<std::size_t>(t)][static_cast<std::size_t>(p.outcome())];
        if (p) std::this_thread::sleep_for(std::chrono::microseconds(hold_us(rng)));
      }
    });
  }
  for (auto& th : threads) th.join();
  stop = true;
  reader.join();
  std::array<std::uint64_t, 12> total{};
  for (const auto& s : seen) {
    for (std::size_t i = 0; i < total.size(); ++i) total[i] += s[i];
  }
  const auto s = r->statistics();
  EXPECT_EQ(s.in_use, 0);
  EXPECT_EQ(s.waiting, 0);
  EXPECT_EQ(s.acquired_total, total[static_cast<std::size_t>(Outcome::kGranted)] + 1);
  for (Outcome o : {Outcome::kTimeout, Outcome::kPredictedTimeout, Outcome::kQueueFull}) {
    EXPECT_EQ(s.rejected(o), total[static_cast<std::size_t>(o)]) << to_string(o);
  }
  std::printf("granted %llu timeout %llu predicted_timeout %llu\n",
              static_cast<unsigned long long>(total[static_cast<std::size_t>(Outcome::kGranted)]),
              static_cast<unsigned long long>(total[static_cast<std::size_t>(Outcome::kTimeout)]),
              static_cast<unsigned long long>(
                  total[static_cast<std::size_t>(Outcome::kPredictedTimeout)]));
}

// A deadline at the clock's minimum is refused like any past deadline
// (no overflow computing the time left).
TEST(EarlyRejectEdges, DeadlineAtTheClocksMinimumIsRefusedLikeAnyPastDeadline) {
  auto r = fifo_early(1);
  hold_for(r, 5ms);
  Acquisition holder(set_of({r}));
  ASSERT_TRUE(holder.try_acquire());
  Recorder rec0;
  Acquisition waiter(set_of({r}));
  ASSERT_EQ(waiter.start(rec0.callback()), Outcome::kPending);
  Recorder rec1, rec2;
  Acquisition past(set_of({r}));
  EXPECT_EQ(past.start(rec1.callback(), Clock::time_point{}), Outcome::kPredictedTimeout);
  Acquisition minimum(set_of({r}));
  EXPECT_EQ(minimum.start(rec2.callback(), Clock::time_point::min()),
            Outcome::kPredictedTimeout);
  minimum.cancel();
  waiter.cancel();
}

}  // namespace
}  // namespace concurrency_limiter
