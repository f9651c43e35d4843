#include <gtest/gtest.h>

#include <atomic>
#include <numeric>
#include <thread>

#include "test_util.h"

namespace concurrency_limiter {
namespace {

using testing::Recorder;
using testing::set_of;

TEST(Histogram, PutsValuesInTheFirstBucketWhoseBoundIsNotBelow) {
  Histogram h;
  h.observe(0.0);     // bucket 0 (<= 0.0005)
  h.observe(0.0005);  // bucket 0, bounds are inclusive
  h.observe(0.003);   // bucket 3 (<= 0.005)
  h.observe(60.0);    // +Inf
  EXPECT_EQ(h.counts[0], 2u);
  EXPECT_EQ(h.counts[3], 1u);
  EXPECT_EQ(h.counts.back(), 1u);
  EXPECT_EQ(h.count, 4u);
  EXPECT_DOUBLE_EQ(h.sum, 60.0035);
}

TEST(Statistics, CountersMatchAScriptedSequence) {
  auto r = std::make_shared<Resource>(
      ResourceOptions{.name = "db", .capacity = 2, .max_waiting = 1});
  auto set = set_of({r});
  Acquisition a(set), b(set), waiter(set), timed_out(set), full(set);
  Recorder rec;
  ASSERT_EQ(a.start(nullptr), Outcome::kGranted);
  ASSERT_EQ(b.start(nullptr), Outcome::kGranted);
  ASSERT_EQ(timed_out.start(rec.callback()), Outcome::kPending);
  ASSERT_EQ(full.start(rec.callback()), Outcome::kQueueFull);
  timed_out.expire();
  ASSERT_EQ(waiter.start(rec.callback()), Outcome::kPending);
  a.release();  // handed to `waiter`
  ResourceStatistics s = r->statistics();
  EXPECT_EQ(s.name, "db");
  EXPECT_EQ(s.capacity, 2);
  EXPECT_EQ(s.in_use, 2);
  EXPECT_EQ(s.waiting, 0);
  EXPECT_EQ(s.peak_in_use, 2);
  EXPECT_EQ(s.max_waiting, 1);
  EXPECT_EQ(s.acquired_total, 3u);
  EXPECT_EQ(s.rejected(Outcome::kTimeout), 1u);
  EXPECT_EQ(s.rejected(Outcome::kQueueFull), 1u);
  EXPECT_EQ(s.rejected(Outcome::kShed), 0u);
  EXPECT_EQ(s.wait_seconds.count, 3u);  // one observation per grant
  EXPECT_EQ(s.wait_seconds.counts[0] >= 2u, true);  // a and b waited 0
  EXPECT_EQ(s.hold_seconds.count, 1u);  // one release so far
  b.release();
  waiter.release();
  s = r->statistics();
  EXPECT_EQ(s.in_use, 0);
  EXPECT_EQ(s.hold_seconds.count, 3u);
  EXPECT_EQ(std::accumulate(s.hold_seconds.counts.begin(), s.hold_seconds.counts.end(), 0ull),
            3u);
}

// For a request that needs two resources and waits for the second, the hold
// of the first starts when the second is granted: the wait is not service
// time. Both holds start and end together, so they are equal.
TEST(Statistics, HoldOfEveryResourceStartsWhenTheLastSlotIsGranted) {
  auto db = std::make_shared<Resource>("db", 1);
  auto file = std::make_shared<Resource>("file", 1);
  Acquisition file_holder(set_of({file}));
  ASSERT_TRUE(file_holder.try_acquire());
  Recorder rec;
  Acquisition acq(set_of({db, file}));
  ASSERT_EQ(acq.start(rec.callback()), Outcome::kPending);  // holds db, waits
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  file_holder.release();  // hands file over: acq is granted
  ASSERT_EQ(rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  const double file_before = file->statistics().hold_seconds.sum;
  acq.release();
  const ResourceStatistics d = db->statistics();
  const ResourceStatistics f = file->statistics();
  ASSERT_EQ(d.hold_seconds.count, 1u);
  ASSERT_EQ(f.hold_seconds.count, 2u);
  EXPECT_GT(f.wait_seconds.sum, 0.0);
  // Equal up to the rounding of the subtraction (far below a nanosecond;
  // the wait being excluded is 5 ms or more).
  EXPECT_NEAR(d.hold_seconds.sum, f.hold_seconds.sum - file_before, 1e-9);
}

// The same for the blocking API, whose slots were granted to a thread.
TEST(Statistics, BlockingMultiResourceHoldStartsWithTheLastSlot) {
  auto db = std::make_shared<Resource>("db", 1);
  auto file = std::make_shared<Resource>("file", 1);
  Limiter limiter({db, file}, std::chrono::seconds(30));
  Permit held = limiter.try_acquire(limiter.select({file}));
  std::atomic<bool> granted{false};
  std::atomic<bool> may_release{false};
  std::thread t([&] {
    Permit p = limiter.acquire(limiter.select({db, file}));
    granted = static_cast<bool>(p);
    while (!may_release) std::this_thread::yield();
  });
  ASSERT_TRUE(testing::eventually([&] { return file->waiting() == 1; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  held.release();
  ASSERT_TRUE(testing::eventually([&] { return granted.load(); }));
  const double file_before = file->statistics().hold_seconds.sum;
  may_release = true;
  t.join();
  EXPECT_NEAR(db->statistics().hold_seconds.sum,
              file->statistics().hold_seconds.sum - file_before, 1e-9);
}

// Requests granted at once are counted without a lock or a clock read; the
// counts stay exact, whichever way the slots were taken.
TEST(Statistics, CountsStayExactOnThePathWithoutLock) {
  auto r = std::make_shared<Resource>(ResourceOptions{.name = "db", .capacity = 3});
  auto two = std::make_shared<Resource>("two", 1);
  Limiter limiter({r, two}, std::chrono::seconds(1));
  auto set = limiter.select({r});
  auto both = limiter.select({r, two});
  for (int i = 0; i < 500; ++i) {
    Permit a = limiter.acquire(set);
    Permit b = r->try_acquire();
    Permit c = limiter.acquire(both);
    ASSERT_TRUE(a && b && c);
  }
  {
    Acquisition held(set_of({r}));
    ASSERT_TRUE(held.try_acquire());
    const ResourceStatistics s = r->statistics();
    EXPECT_EQ(s.in_use, 1);
    EXPECT_EQ(s.peak_in_use, 3);
    EXPECT_EQ(s.acquired_total, 1501u);
    EXPECT_EQ(s.wait_seconds.count, 1501u);
    EXPECT_EQ(s.wait_seconds.counts[0], 1501u);
    EXPECT_EQ(s.hold_seconds.count, 1500u);
  }
  const ResourceStatistics s = r->statistics();
  EXPECT_EQ(s.in_use, 0);
  EXPECT_EQ(s.acquired_total, 1501u);
  EXPECT_EQ(s.hold_seconds.count, 1501u);
  EXPECT_EQ(std::accumulate(s.hold_seconds.counts.begin(), s.hold_seconds.counts.end(), 0ull),
            1501u);
  EXPECT_EQ(two->statistics().hold_seconds.count, 500u);
}

}  // namespace
}  // namespace concurrency_limiter
