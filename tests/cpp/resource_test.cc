#include <gtest/gtest.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../../src/internal/deadline.h"
#include "test_util.h"

namespace concurrency_limiter {
namespace {

using namespace std::chrono_literals;
using testing::eventually;
using testing::make_resource;

TEST(Resource, RejectsCapacityBelowOneNamingTheParameter) {
  try {
    Resource r("db", 0);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("capacity must be an integer >= 1"),
              std::string::npos);
    EXPECT_NE(std::string(e.what()).find("got 0"), std::string::npos);
  }
  EXPECT_THROW(Resource(ResourceOptions{.capacity = 1, .max_waiting = -1}),
               std::invalid_argument);
}

TEST(Resource, GeneratesUniqueNamesWhenNoneGiven) {
  Resource a(ResourceOptions{.capacity = 1});
  Resource b(ResourceOptions{.capacity = 1});
  EXPECT_NE(a.name(), b.name());
  EXPECT_EQ(a.name().rfind("resource-", 0), 0u);
}

TEST(Resource, TryAcquireTakesUpToCapacityAndReleaseGivesBack) {
  auto r = make_resource("db", 2);
  Permit a = r->try_acquire();
  Permit b = r->try_acquire();
  Permit c = r->try_acquire();
  EXPECT_TRUE(a);
  EXPECT_TRUE(b);
  EXPECT_FALSE(c);
  EXPECT_EQ(c.outcome(), Outcome::kTimeout);
  EXPECT_EQ(c.refused_by_name(), "db");
  EXPECT_EQ(r->in_use(), 2);
  a.release();
  EXPECT_EQ(r->in_use(), 1);
  { Permit d = r->try_acquire(); EXPECT_TRUE(d); }
  EXPECT_EQ(r->in_use(), 1);  // d gave its slot back when destroyed
}

TEST(Resource, AcquireForTimesOutAndLeavesNoWaiterBehind) {
  auto r = make_resource("db", 1);
  Permit held = r->try_acquire();
  Permit p = r->acquire_for(5ms);
  EXPECT_FALSE(p);
  EXPECT_EQ(p.outcome(), Outcome::kTimeout);
  EXPECT_EQ(p.refused_by_name(), "db");
  EXPECT_EQ(r->waiting(), 0);
  EXPECT_EQ(r->statistics().rejected(Outcome::kTimeout), 1u);
}

TEST(Resource, DeadlineInThePastStillTakesAFreeSlot) {
  auto r = make_resource("db", 1);
  Permit p = r->acquire_until(Clock::now() - 1s);
  EXPECT_TRUE(p);
  Permit q = r->acquire_for(0s);
  EXPECT_FALSE(q);
  EXPECT_EQ(q.outcome(), Outcome::kTimeout);
}

TEST(Resource, ServesWaitersInArrivalOrder) {
  auto r = make_resource("db", 1);
  Permit held = r->try_acquire();
  std::mutex mu;
  std::vector<int> order;
  std::vector<std::thread> threads;
  for (int i = 0; i < 5; ++i) {
    threads.emplace_back([&, i] {
      Permit p = r->acquire_for(30s);
      ASSERT_TRUE(p);
      std::lock_guard lock(mu);
      order.push_back(i);
    });
    // The next thread starts only once this one is queued.
    ASSERT_TRUE(eventually([&] { return r->waiting() == i + 1; }));
  }
  held.release();
  for (auto& t : threads) t.join();
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3, 4}));
  EXPECT_EQ(r->in_use(), 0);
}

TEST(Resource, ReleaseHandsTheSlotToTheWaiterNotToANewcomer) {
  auto r = make_resource("db", 1);
  Permit held = r->try_acquire();
  std::atomic<bool> granted{false};
  std::atomic<bool> may_finish{false};
  std::thread waiter([&] {
    Permit p = r->acquire_for(30s);
    granted = static_cast<bool>(p);
    while (!may_finish) std::this_thread::yield();
  });
  ASSERT_TRUE(eventually([&] { return r->waiting() == 1; }));
  held.release();
  // The slot belongs to the waiter from the instant of release: a newcomer
  // cannot take it, even before the waiter's thread has woken up.
  EXPECT_FALSE(r->try_acquire());
  EXPECT_EQ(r->in_use(), 1);
  may_finish = true;
  waiter.join();
  EXPECT_TRUE(granted);
  EXPECT_EQ(r->in_use(), 0);
}

TEST(Resource, StopTokenCancelsABlockedWait) {
  auto r = make_resource("db", 1);
  Permit held = r->try_acquire();
  std::stop_source stop;
  Outcome outcome = Outcome::kPending;
  std::thread waiter([&] { outcome = r->acquire_for(30s, stop.get_token()).outcome(); });
  ASSERT_TRUE(eventually([&] { return r->waiting() == 1; }));
  stop.request_stop();
  waiter.join();
  EXPECT_EQ(outcome, Outcome::kCancelled);
  EXPECT_EQ(r->waiting(), 0);
  EXPECT_EQ(r->statistics().rejected(Outcome::kCancelled), 1u);
  held.release();
  EXPECT_EQ(r->in_use(), 0);
}

TEST(Resource, AlreadyStoppedTokenStillGetsAFreeSlotButNeverWaits) {
  auto r = make_resource("db", 1);
  std::stop_source stop;
  stop.request_stop();
  Permit p = r->acquire_for(30s, stop.get_token());
  EXPECT_TRUE(p);
  Permit q = r->acquire_for(30s, stop.get_token());
  EXPECT_EQ(q.outcome(), Outcome::kCancelled);
}

TEST(Permit, MoveTransfersOwnershipAndAssignmentReleasesTheOldSlots) {
  auto r = make_resource("db", 2);
  Permit a = r->try_acquire();
  Permit b = std::move(a);
  EXPECT_FALSE(a);
  EXPECT_TRUE(b);
  EXPECT_EQ(r->in_use(), 1);
  Permit c = r->try_acquire();
  b = std::move(c);  // b's original slot is released
  EXPECT_EQ(r->in_use(), 1);
  b.release();
  b.release();  // idempotent
  EXPECT_EQ(r->in_use(), 0);
}

TEST(Resource, RejectsCapacityAboveTheMaximumNamingTheLimit) {
  EXPECT_NO_THROW(Resource("big", Resource::kMaxCapacity));
  try {
    Resource r("db", Resource::kMaxCapacity + 1);
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("capacity must be an integer <= 2147483647"),
              std::string::npos)
        << e.what();
  }
}

// now + Clock::duration::max() used to overflow into the past: the request
// timed out at once instead of waiting.
TEST(Resource, AcquireForTheLargestDurationWaitsWithoutDeadline) {
  auto r = make_resource("db", 1);
  Permit held = r->try_acquire();
  Outcome outcome = Outcome::kPending;
  std::thread waiter([&] { outcome = r->acquire_for(Clock::duration::max()).outcome(); });
  ASSERT_TRUE(eventually([&] { return r->waiting() == 1; }));
  held.release();
  waiter.join();
  EXPECT_EQ(outcome, Outcome::kGranted);
  EXPECT_EQ(r->statistics().rejected(Outcome::kTimeout), 0u);
}

TEST(Deadline, SaturatesInsteadOfOverflowing) {
  const Clock::time_point now = Clock::now();
  EXPECT_EQ(detail::saturating_add(now, Clock::duration::max()), Clock::time_point::max());
  EXPECT_EQ(detail::saturating_add(now, Clock::duration::max() - now.time_since_epoch() + 1ns),
            Clock::time_point::max());
  EXPECT_EQ(detail::saturating_add(Clock::time_point::min() + 1s, -2s),
            Clock::time_point::min());
  EXPECT_EQ(detail::saturating_add(now, 5s), now + 5s);
  EXPECT_EQ(detail::saturating_add(now, -5s), now - 5s);
  EXPECT_EQ(detail::saturating_add(Clock::time_point::max(), 1ns), Clock::time_point::max());
}

// Taking a free slot without the lock must not pass a queued waiter, in any
// of the ways a slot can be taken.
TEST(Resource, NoWayOfTakingAFreeSlotPassesAWaiter) {
  auto r = make_resource("db", 2);
  auto set = testing::set_of({r});
  Limiter limiter({r}, 1s);
  Permit a = r->try_acquire();
  Permit b = limiter.try_acquire(set);
  testing::Recorder rec;
  Acquisition waiter(set);
  ASSERT_EQ(waiter.start(rec.callback()), Outcome::kPending);
  a.release();  // handed to the waiter
  EXPECT_EQ(rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_EQ(r->in_use(), 2);
  EXPECT_FALSE(r->try_acquire());
  EXPECT_FALSE(limiter.try_acquire(set));
  Acquisition late(set);
  EXPECT_FALSE(late.try_acquire());
  // With a second waiter queued, a freed slot goes to it, not to a try.
  testing::Recorder rec2;
  Acquisition waiter2(set);
  ASSERT_EQ(waiter2.start(rec2.callback()), Outcome::kPending);
  b.release();
  EXPECT_EQ(rec2.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_FALSE(r->try_acquire());
  waiter.release();
  waiter2.release();
  EXPECT_EQ(r->in_use(), 0);
  // The queue is empty again: free slots are taken without waiting.
  Permit c = r->try_acquire(), d = r->try_acquire();
  EXPECT_TRUE(c && d);
  EXPECT_EQ(r->statistics().acquired_total, 6u);
}

}  // namespace
}  // namespace concurrency_limiter
