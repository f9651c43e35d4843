// Order of service, bounds and shedding of each queue discipline.
#include <gtest/gtest.h>

#include <thread>

#include "test_util.h"

namespace concurrency_limiter {
namespace {

using namespace std::chrono_literals;
using testing::Recorder;
using testing::set_of;

// One holder and `n` queued acquisitions on `r`, started in order 0..n-1.
struct Queue {
  explicit Queue(const std::shared_ptr<Resource>& r, int n)
      : holder(set_of({r})), recs(n) {
    EXPECT_TRUE(holder.try_acquire());
    for (int i = 0; i < n; ++i) {
      acqs.push_back(std::make_unique<Acquisition>(set_of({r})));
      starts.push_back(acqs.back()->start(recs[i].callback()));
    }
  }
  // Index of the single acquisition granted since the last call, or -1.
  int granted() {
    int found = -1;
    for (std::size_t i = 0; i < recs.size(); ++i) {
      if (!recs[i].outcomes.empty() && recs[i].outcomes.back() == Outcome::kGranted &&
          acqs[i]->state() == Acquisition::State::kGranted) {
        found = static_cast<int>(i);
        acqs[i]->release();  // hands on, so release exactly once per call
        break;
      }
    }
    return found;
  }
  Acquisition holder;
  std::vector<Recorder> recs;
  std::vector<std::unique_ptr<Acquisition>> acqs;
  std::vector<Outcome> starts;
};

std::shared_ptr<Resource> resource(QueueDiscipline q,
                                   std::optional<std::int64_t> max_waiting = std::nullopt,
                                   Clock::duration target = 100ms,
                                   Clock::duration interval = 100ms) {
  return std::make_shared<Resource>(ResourceOptions{.name = "r",
                                                    .capacity = 1,
                                                    .max_waiting = max_waiting,
                                                    .queue = q,
                                                    .adaptive_target = target,
                                                    .adaptive_interval = interval});
}

std::vector<int> service_order(Queue& q) {
  q.holder.release();
  std::vector<int> order;
  for (int g; (g = q.granted()) >= 0;) order.push_back(g);
  return order;
}

TEST(Discipline, FifoServesOldestFirst) {
  auto r = resource(QueueDiscipline::kFifo);
  Queue q(r, 4);
  EXPECT_EQ(service_order(q), (std::vector<int>{0, 1, 2, 3}));
}

TEST(Discipline, LifoServesNewestFirst) {
  auto r = resource(QueueDiscipline::kLifo);
  Queue q(r, 4);
  EXPECT_EQ(service_order(q), (std::vector<int>{3, 2, 1, 0}));
  EXPECT_EQ(r->in_use(), 0);
}

TEST(Discipline, ZeroMaxWaitingNeverWaits) {
  auto r = resource(QueueDiscipline::kFifo, 0);
  Queue q(r, 1);
  EXPECT_EQ(q.starts[0], Outcome::kQueueFull);
  EXPECT_EQ(r->waiting(), 0);
  EXPECT_EQ(r->statistics().rejected(Outcome::kQueueFull), 1u);
}

TEST(Discipline, FullFifoQueueRejectsTheNewcomerAtOnce) {
  auto r = resource(QueueDiscipline::kFifo, 2);
  Queue q(r, 3);
  EXPECT_EQ(q.starts, (std::vector<Outcome>{Outcome::kPending, Outcome::kPending,
                                            Outcome::kQueueFull}));
  EXPECT_EQ(r->waiting(), 2);
  EXPECT_EQ(service_order(q), (std::vector<int>{0, 1}));
}

TEST(Discipline, FullLifoQueuePushesTheOldestOut) {
  auto r = resource(QueueDiscipline::kLifo, 2);
  Queue q(r, 3);
  EXPECT_EQ(q.starts[2], Outcome::kPending);
  EXPECT_EQ(q.recs[0].outcomes, std::vector<Outcome>{Outcome::kQueueFull});
  EXPECT_EQ(r->waiting(), 2);
  EXPECT_EQ(service_order(q), (std::vector<int>{2, 1}));
}

TEST(Discipline, AdaptiveIsFifoWhileTheQueueDrains) {
  auto r = resource(QueueDiscipline::kAdaptive, std::nullopt, 10s, 10s);
  Queue q(r, 3);
  EXPECT_EQ(service_order(q), (std::vector<int>{0, 1, 2}));
}

TEST(Discipline, AdaptiveServesNewestOnceAQueueStands) {
  // target 100 ms, interval 200 ms: standing once the oldest waiter has been
  // older than 100 ms for 200 ms; waiters older than 300 ms are shed.
  auto r = resource(QueueDiscipline::kAdaptive, std::nullopt, 100ms, 200ms);
  Queue q(r, 1);                        // w0 at t=0
  std::this_thread::sleep_for(150ms);
  Recorder rec1, rec2;
  Acquisition w1(set_of({r})), w2(set_of({r}));
  ASSERT_EQ(w1.start(rec1.callback()), Outcome::kPending);  // t=150
  ASSERT_EQ(w2.start(rec2.callback()), Outcome::kPending);
  EXPECT_TRUE(q.recs[0].outcomes.empty());  // not standing yet: nobody shed
  std::this_thread::sleep_for(200ms);       // t=350
  q.holder.release();
  // w0 (350 ms) is shed; the queue stands, so the newest, w2, is served.
  EXPECT_EQ(q.recs[0].outcomes, std::vector<Outcome>{Outcome::kShed});
  EXPECT_EQ(rec2.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_TRUE(rec1.outcomes.empty());
  w2.release();
  EXPECT_EQ(rec1.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_EQ(r->statistics().rejected(Outcome::kShed), 1u);
}

TEST(Discipline, AdaptiveDoesNotReorderAQueueThatDrainsWithinTheTarget) {
  // Waiters stay younger than the target: plain FIFO, nobody shed.
  auto r = resource(QueueDiscipline::kAdaptive, std::nullopt, 10s, 1ms);
  Queue q(r, 3);
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(service_order(q), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(r->statistics().rejected(Outcome::kShed), 0u);
}

TEST(Discipline, AdaptiveShedsStaleWaitersInAStandingQueue) {
  auto r = resource(QueueDiscipline::kAdaptive, std::nullopt, 20ms, 20ms);
  Queue q(r, 2);
  std::this_thread::sleep_for(80ms);
  // A newcomer finds a standing queue of stale waiters: they are shed early,
  // long before any timeout, and the newcomer queues in a fresh queue.
  Recorder rec;
  Acquisition fresh(set_of({r}));
  EXPECT_EQ(fresh.start(rec.callback()), Outcome::kPending);
  EXPECT_EQ(q.recs[0].outcomes, std::vector<Outcome>{Outcome::kShed});
  EXPECT_EQ(q.recs[1].outcomes, std::vector<Outcome>{Outcome::kShed});
  EXPECT_EQ(r->waiting(), 1);
  EXPECT_EQ(r->statistics().rejected(Outcome::kShed), 2u);
  q.holder.release();
  EXPECT_EQ(rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
}

TEST(Discipline, BlockingThreadsGetTheSameQueueRules) {
  auto r = resource(QueueDiscipline::kFifo, 1);
  Permit held = r->try_acquire();
  std::thread waiter([&] { (void)r->acquire_for(30s); });
  ASSERT_TRUE(testing::eventually([&] { return r->waiting() == 1; }));
  Permit rejected = r->acquire_for(30s);  // queue is full: no wait at all
  EXPECT_EQ(rejected.outcome(), Outcome::kQueueFull);
  held.release();
  waiter.join();
}

}  // namespace
}  // namespace concurrency_limiter

namespace concurrency_limiter {
namespace {

TEST(Discipline, AdaptiveReturnsToFifoOnceTheQueueIsNoLongerThanTheSlots) {
  using namespace std::chrono_literals;
  // Capacity 2: a queue of 2 never stands, however old its waiters.
  auto r = std::make_shared<Resource>(ResourceOptions{.name = "r",
                                                      .capacity = 2,
                                                      .queue = QueueDiscipline::kAdaptive,
                                                      .adaptive_target = 1ms,
                                                      .adaptive_interval = 1s});
  auto set = testing::set_of({r});
  Acquisition a(set), b(set);
  ASSERT_TRUE(a.try_acquire());
  ASSERT_TRUE(b.try_acquire());
  testing::Recorder r0, r1;
  Acquisition w0(set), w1(set);
  ASSERT_EQ(w0.start(r0.callback()), Outcome::kPending);
  ASSERT_EQ(w1.start(r1.callback()), Outcome::kPending);
  std::this_thread::sleep_for(20ms);
  a.release();
  EXPECT_EQ(r0.outcomes, std::vector<Outcome>{Outcome::kGranted});  // oldest first
  EXPECT_TRUE(r1.outcomes.empty());
}

}  // namespace
}  // namespace concurrency_limiter
