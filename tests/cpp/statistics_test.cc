#include <gtest/gtest.h>

#include <numeric>

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

}  // namespace
}  // namespace concurrency_limiter
