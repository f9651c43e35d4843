// The runtime limit of a resource: set_limit(), retirement of slots, and the
// samples an adaptive resource feeds its limit algorithm.
#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <random>
#include <stop_token>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "internal/host_segment.h"
#include "test_util.h"

namespace concurrency_limiter {
namespace {

using namespace std::chrono_literals;
using testing::make_resource;
using testing::Recorder;
using testing::set_of;

// Records the samples it gets and returns whatever limit the test scripts.
class ScriptedLimit final : public LimitAlgorithm {
 public:
  explicit ScriptedLimit(std::int64_t initial) : next(initial) {}
  std::int64_t start(std::int64_t capacity) override {
    started_with = capacity;
    return next;
  }
  std::int64_t update(const LimitSample& s) noexcept override {
    samples.push_back(s);
    return next;
  }
  std::int64_t next;
  std::int64_t started_with = 0;
  std::vector<LimitSample> samples;
};

std::shared_ptr<Resource> adaptive_resource(std::string name, std::int64_t capacity,
                                            std::shared_ptr<LimitAlgorithm> algorithm) {
  return std::make_shared<Resource>(ResourceOptions{
      .name = std::move(name), .capacity = capacity, .limit_algorithm = std::move(algorithm)});
}

TEST(ResourceLimit, IsTheCapacityUnlessChanged) {
  auto r = make_resource("db", 3);
  EXPECT_EQ(r->limit(), 3);
  EXPECT_FALSE(r->adaptive());
  EXPECT_EQ(r->statistics().limit, 3);
  r->set_limit(2);
  EXPECT_EQ(r->limit(), 2);
  EXPECT_EQ(r->statistics().limit, 2);
  EXPECT_EQ(r->capacity(), 3);
}

TEST(ResourceLimit, SetLimitOutOfRangeThrowsNamingTheResource) {
  auto r = make_resource("db", 3);
  for (std::int64_t bad : {0, -1, 4}) {
    try {
      r->set_limit(bad);
      FAIL() << "expected std::invalid_argument for " << bad;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("limit of resource 'db' must be an integer in [1, capacity=3]"),
                std::string::npos)
          << e.what();
    }
  }
  EXPECT_EQ(r->limit(), 3);
}

TEST(ResourceLimit, LowerLimitAdmitsFewer) {
  auto r = make_resource("db", 3);
  r->set_limit(1);
  Permit a = r->try_acquire();
  EXPECT_TRUE(a);
  EXPECT_FALSE(r->try_acquire());
}

TEST(ResourceLimit, RaisingGrantsWaitersAtOnceInOrder) {
  auto r = make_resource("db", 4);
  r->set_limit(1);
  Permit held = r->try_acquire();
  ASSERT_TRUE(held);
  const auto set = set_of({r});
  Acquisition first(set), second(set), third(set);
  std::vector<int> order;
  EXPECT_EQ(first.start([&](Outcome) { order.push_back(1); }), Outcome::kPending);
  EXPECT_EQ(second.start([&](Outcome) { order.push_back(2); }), Outcome::kPending);
  EXPECT_EQ(third.start([&](Outcome) { order.push_back(3); }), Outcome::kPending);
  r->set_limit(3);  // two more slots: the two oldest waiters
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
  EXPECT_EQ(first.state(), Acquisition::State::kGranted);
  EXPECT_EQ(second.state(), Acquisition::State::kGranted);
  EXPECT_EQ(third.state(), Acquisition::State::kPending);
  EXPECT_EQ(r->in_use(), 3);
  EXPECT_EQ(r->waiting(), 1);
}

TEST(ResourceLimit, LoweringRetiresReleasedSlotsUntilWithinTheLimit) {
  auto r = make_resource("db", 3);
  Permit a = r->try_acquire(), b = r->try_acquire(), c = r->try_acquire();
  ASSERT_TRUE(a && b && c);
  Acquisition waiter(set_of({r}));
  Recorder rec;
  ASSERT_EQ(waiter.start(rec.callback()), Outcome::kPending);
  r->set_limit(1);            // revokes nothing
  EXPECT_EQ(r->in_use(), 3);
  a.release();                // retired, not handed over
  EXPECT_EQ(r->in_use(), 2);
  EXPECT_TRUE(rec.outcomes.empty());
  b.release();                // retired
  EXPECT_EQ(r->in_use(), 1);
  EXPECT_TRUE(rec.outcomes.empty());
  c.release();                // within the limit again: handed over
  EXPECT_EQ(rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_EQ(r->in_use(), 1);
  EXPECT_EQ(r->waiting(), 0);
}

TEST(AdaptiveResource, StartsAtTheAlgorithmsLimitClampedToCapacity) {
  auto algorithm = std::make_shared<ScriptedLimit>(2);
  auto r = adaptive_resource("db", 5, algorithm);
  EXPECT_TRUE(r->adaptive());
  EXPECT_EQ(algorithm->started_with, 5);
  EXPECT_EQ(r->limit(), 2);
  EXPECT_EQ(adaptive_resource("x", 5, std::make_shared<ScriptedLimit>(99))->limit(), 5);
  EXPECT_EQ(adaptive_resource("y", 5, std::make_shared<ScriptedLimit>(0))->limit(), 1);
}

TEST(AdaptiveResource, AlgorithmErrorsSurfaceFromTheConstructor) {
  EXPECT_THROW(adaptive_resource("db", 3, std::make_shared<GradientLimit>(
                                              GradientOptions{.min_limit = 4})),
               std::invalid_argument);
}

TEST(AdaptiveResource, FeedsOneSamplePerReleaseWithServiceTimeAndOutcome) {
  auto algorithm = std::make_shared<ScriptedLimit>(2);
  auto r = adaptive_resource("db", 2, algorithm);
  Permit a = r->try_acquire(), b = r->try_acquire();
  std::this_thread::sleep_for(20ms);
  a.release();
  b.release(Completion::kDropped);
  ASSERT_EQ(algorithm->samples.size(), 2u);
  EXPECT_GE(algorithm->samples[0].service_time, 20ms);
  EXPECT_EQ(algorithm->samples[0].in_flight, 2);
  EXPECT_FALSE(algorithm->samples[0].dropped);
  EXPECT_EQ(algorithm->samples[1].in_flight, 1);
  EXPECT_TRUE(algorithm->samples[1].dropped);
  Permit c = r->try_acquire();
  c.release(Completion::kIgnored);
  EXPECT_EQ(algorithm->samples.size(), 2u);
}

TEST(AdaptiveResource, ServiceTimeExcludesQueueingAndStartsAtTheLastGrant) {
  auto algorithm = std::make_shared<ScriptedLimit>(1);
  auto db = adaptive_resource("db", 1, algorithm);
  auto file = make_resource("file", 1);
  Permit blocker = file->try_acquire();
  auto set = set_of({db, file});
  Acquisition acq(set);
  Recorder rec;
  ASSERT_EQ(acq.start(rec.callback()), Outcome::kPending);  // holds db, waits for file
  std::this_thread::sleep_for(50ms);
  blocker.release();
  ASSERT_EQ(rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  acq.release();
  ASSERT_EQ(algorithm->samples.size(), 1u);
  EXPECT_LT(algorithm->samples[0].service_time, 40ms);
}

TEST(AdaptiveResource, ServiceTimeStartsAtARestartedServiceClock) {
  // A caller that waits for something else after the grant (a cluster-wide
  // permit) restarts the clock: that wait is not service time.
  auto algorithm = std::make_shared<ScriptedLimit>(1);
  auto db = adaptive_resource("db", 1, algorithm);
  Acquisition acq(set_of({db}));
  acq.restart_service_clock();  // not granted yet: no effect, no error
  ASSERT_TRUE(acq.try_acquire());
  std::this_thread::sleep_for(50ms);  // waiting elsewhere
  acq.restart_service_clock();
  acq.release();
  ASSERT_EQ(algorithm->samples.size(), 1u);
  EXPECT_LT(algorithm->samples[0].service_time, 40ms);
  acq.restart_service_clock();  // released: no effect
}

TEST(AdaptiveResource, FailedAcquisitionsTeachNothing) {
  auto algorithm = std::make_shared<ScriptedLimit>(1);
  auto db = adaptive_resource("db", 1, algorithm);
  auto file = make_resource("file", 1);
  Permit blocker = file->try_acquire();
  Acquisition acq(set_of({db, file}));
  Recorder rec;
  ASSERT_EQ(acq.start(rec.callback()), Outcome::kPending);
  acq.expire();  // gives db back without having run
  EXPECT_EQ(rec.outcomes, std::vector<Outcome>{Outcome::kTimeout});
  EXPECT_TRUE(algorithm->samples.empty());
  EXPECT_EQ(db->in_use(), 0);
}

TEST(AdaptiveResource, PutsTheAlgorithmsLimitInForceOnRelease) {
  auto algorithm = std::make_shared<ScriptedLimit>(1);
  auto r = adaptive_resource("db", 3, algorithm);
  Permit a = r->try_acquire();
  const auto set = set_of({r});
  Acquisition w1(set), w2(set);
  Recorder rec1, rec2;
  ASSERT_EQ(w1.start(rec1.callback()), Outcome::kPending);
  ASSERT_EQ(w2.start(rec2.callback()), Outcome::kPending);
  algorithm->next = 3;
  a.release();  // handed to w1, then the new limit grants w2
  EXPECT_EQ(rec1.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_EQ(rec2.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_EQ(r->limit(), 3);
  algorithm->next = 1;
  w1.release();
  EXPECT_EQ(r->limit(), 1);
  EXPECT_EQ(r->in_use(), 1);
}

// set_limit() on an adaptive resource: the algorithm moves on from the set
// limit instead of putting its own back at the next release.
TEST(AdaptiveResource, SetLimitIsWhereTheAlgorithmMovesOnFrom) {
  auto aimd = std::make_shared<AimdLimit>(AimdOptions{
      .initial_limit = 20, .window = Clock::duration::zero(), .min_window_samples = 1});
  auto a = adaptive_resource("aimd", 50, aimd);
  ASSERT_EQ(a->limit(), 20);
  a->set_limit(5);
  a->try_acquire().release();  // a window that used 1 of 5: no change
  EXPECT_EQ(a->limit(), 5);
  Permit p = a->try_acquire();
  p.release(Completion::kDropped);  // x0.9 of 5, not of 20
  EXPECT_EQ(a->limit(), 4);

  auto gradient = std::make_shared<GradientLimit>(GradientOptions{
      .initial_limit = 20, .window = Clock::duration::zero(), .min_window_samples = 1});
  auto g = adaptive_resource("gradient", 50, gradient);
  g->try_acquire().release();  // the first sample only marks the start
  Permit before = g->try_acquire();
  g->set_limit(5);
  EXPECT_EQ(g->limit(), 5);
  before.release();  // granted before the change: left out
  EXPECT_EQ(g->limit(), 5);
  EXPECT_EQ(gradient->no_load_latency(), 0.0);
  Permit after = g->try_acquire();  // granted after it: learned from
  std::this_thread::sleep_for(1ms);
  after.release();
  EXPECT_GT(gradient->no_load_latency(), 0.0);
  EXPECT_EQ(g->limit(), 5);
  EXPECT_DOUBLE_EQ(gradient->limit(), 5.0);

  // A fixed-limit algorithm takes the set limit as its constant.
  auto f = adaptive_resource("fixed", 50, std::make_shared<FixedLimit>(20));
  f->set_limit(7);
  f->try_acquire().release();
  EXPECT_EQ(f->limit(), 7);
}

// set_limit() racing with blocking acquisitions, timeouts, stops and
// releases: once the limit in force is L and in_use has come down to L, no
// grant ever takes in_use above L; every slot comes back in the end.
// A name for a host resource of this test run, and its segment removed at
// the end (host_resource_test.cc has the multi-process tests).
struct HostName {
  std::string name;
  explicit HostName(const std::string& test)
      : name("t" + std::to_string(::getpid()) + "-" + test) {}
  ~HostName() {
    ::unlink(detail::host::segment_path(name).c_str());
  }
};

void set_limit_stress(Scope scope) {
  constexpr std::int64_t kCapacity = 8;
  constexpr int kThreads = 8;
  constexpr int kIterations = 400;
  for (QueueDiscipline q : {QueueDiscipline::kFifo, QueueDiscipline::kLifo,
                            QueueDiscipline::kAdaptive}) {
    HostName host("limit-stress-" + std::string(to_string(q)));
    auto r = std::make_shared<Resource>(ResourceOptions{
        .name = scope == Scope::kHost ? host.name : "db", .capacity = kCapacity, .queue = q,
        .adaptive_target = 1ms, .adaptive_interval = 2ms, .scope = scope});
    std::mutex mu;  // guards the two below
    int holders = 0;                  // counted after the grant, before release
    std::int64_t settled_limit = kCapacity;  // 0 while shrinking
    std::atomic<bool> over{false}, running{true};
    std::atomic<int> granted{0};

    std::thread changer([&] {
      std::mt19937 rng(11);
      while (running) {
        const std::int64_t limit = 1 + static_cast<std::int64_t>(rng() % kCapacity);
        {
          std::lock_guard lock(mu);
          settled_limit = 0;
        }
        r->set_limit(limit);
        // Held slots are retired as they come back; until then no check.
        while (running && r->in_use() > limit) std::this_thread::yield();
        {
          std::lock_guard lock(mu);
          settled_limit = limit;
          if (holders > limit) over = true;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(rng() % 500));
      }
    });
    std::vector<std::thread> workers;
    for (int t = 0; t < kThreads; ++t) {
      workers.emplace_back([&, t] {
        std::mt19937 rng(static_cast<unsigned>(t) + 1);
        for (int i = 0; i < kIterations; ++i) {
          std::stop_source stop;
          if (rng() % 8 == 0) stop.request_stop();
          Permit p = r->acquire_for(std::chrono::microseconds(rng() % 2000), stop.get_token());
          if (!p) continue;
          ++granted;
          {
            std::lock_guard lock(mu);
            ++holders;
            if (settled_limit > 0 && holders > settled_limit) over = true;
          }
          std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
          {
            std::lock_guard lock(mu);
            --holders;
          }
        }
      });
    }
    for (auto& w : workers) w.join();
    running = false;
    changer.join();
    EXPECT_FALSE(over) << to_string(q);
    EXPECT_GT(granted, 0) << to_string(q);
    EXPECT_EQ(r->in_use(), 0) << to_string(q);
    EXPECT_EQ(r->waiting(), 0) << to_string(q);
    r->set_limit(kCapacity);
    EXPECT_EQ(r->statistics().hold_seconds.count, r->statistics().acquired_total);
  }
}

TEST(ResourceLimitStress, SetLimitUnderConcurrentAcquireReleaseAndCancel) {
  set_limit_stress(Scope::kProcess);
}

// The same with the limit in the shared segment of a host resource.
TEST(ResourceLimitStress, HostSetLimitUnderConcurrentAcquireReleaseAndCancel) {
  set_limit_stress(Scope::kHost);
}

// A real GradientLimit fed by threads: no assertion on where it goes, only
// that it stays in bounds and every slot comes back (for the sanitizers).
TEST(ResourceLimitStress, AdaptiveResourceUnderThreads) {
  auto r = adaptive_resource("db", 8, std::make_shared<GradientLimit>(GradientOptions{
                                          .window = 1ms, .min_window_samples = 5}));
  std::vector<std::thread> workers;
  for (int t = 0; t < 6; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t) + 1);
      for (int i = 0; i < 300; ++i) {
        Permit p = r->acquire_for(2ms);
        if (!p) continue;
        const std::int64_t limit = r->limit();
        EXPECT_GE(limit, 1);
        EXPECT_LE(limit, 8);
        std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
        p.release(rng() % 10 == 0 ? Completion::kDropped : Completion::kSuccess);
      }
    });
  }
  for (auto& w : workers) w.join();
  EXPECT_EQ(r->in_use(), 0);
  EXPECT_EQ(r->waiting(), 0);
}

// The shared algorithm of a host resource fed by threads with random
// timeouts and cancels: the limit stays in bounds, no grant exceeds the
// capacity, every slot comes back.
TEST(ResourceLimitStress, AdaptiveHostResourceUnderThreads) {
  HostName host("adaptive-stress");
  auto r = std::make_shared<Resource>(ResourceOptions{
      .name = host.name,
      .capacity = 8,
      .limit_algorithm = std::make_shared<GradientLimit>(
          GradientOptions{.window = 1ms, .min_window_samples = 5}),
      .scope = Scope::kHost});
  std::atomic<int> holders{0};
  std::atomic<bool> over{false};
  std::vector<std::thread> workers;
  for (int t = 0; t < 6; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t) + 1);
      for (int i = 0; i < 300; ++i) {
        std::stop_source stop;
        if (rng() % 8 == 0) stop.request_stop();
        Permit p = r->acquire_for(std::chrono::microseconds(rng() % 2000), stop.get_token());
        if (!p) continue;
        if (holders.fetch_add(1) + 1 > 8) over = true;
        const std::int64_t limit = r->limit();
        EXPECT_GE(limit, 1);
        EXPECT_LE(limit, 8);
        std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
        holders.fetch_sub(1);
        p.release(rng() % 10 == 0 ? Completion::kDropped : Completion::kSuccess);
      }
    });
  }
  for (auto& w : workers) w.join();
  EXPECT_FALSE(over);
  EXPECT_EQ(r->in_use(), 0);
  EXPECT_EQ(r->waiting(), 0);
}

}  // namespace
}  // namespace concurrency_limiter
