#include <gtest/gtest.h>

#include <string>
#include <thread>

#include "test_util.h"

namespace concurrency_limiter {
namespace {

using namespace std::chrono_literals;
using testing::eventually;
using testing::make_resource;

std::string select_error(const Limiter& limiter,
                         const std::vector<std::shared_ptr<Resource>>& rs) {
  try {
    limiter.select(rs);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

TEST(Limiter, SelectAcceptsAnyOrderedSubset) {
  auto a = make_resource("a", 1), b = make_resource("b", 1), c = make_resource("c", 1);
  Limiter limiter({a, b, c}, 1s);
  EXPECT_EQ(limiter.select({a, c})->describe(), "'a', 'c'");
  EXPECT_EQ(limiter.select({b})->size(), 1u);
}

TEST(Limiter, SelectRejectsOutOfOrderUnregisteredDuplicateAndEmpty) {
  auto db = make_resource("db", 1), file = make_resource("file", 1);
  auto stray = make_resource("stray", 1);
  Limiter limiter({db, file}, 1s);
  std::string e = select_error(limiter, {file, db});
  EXPECT_TRUE(contains(e, "registration order ['db', 'file']")) << e;
  EXPECT_TRUE(contains(e, "got ['file', 'db']")) << e;
  e = select_error(limiter, {stray});
  EXPECT_TRUE(contains(e, "'stray' is not registered")) << e;
  e = select_error(limiter, {db, db});
  EXPECT_TRUE(contains(e, "'db' is listed twice")) << e;
  e = select_error(limiter, {});
  EXPECT_TRUE(contains(e, "at least one resource")) << e;
}

TEST(Limiter, ConstructorRejectsBadTimeoutAndDuplicates) {
  auto db = make_resource("db", 1);
  auto other_db = make_resource("db", 1);
  EXPECT_THROW(Limiter({db}, -1s), std::invalid_argument);
  EXPECT_THROW(Limiter({db, db}, 1s), std::invalid_argument);
  EXPECT_THROW(Limiter({db, other_db}, 1s), std::invalid_argument);
  EXPECT_THROW(Limiter({db, nullptr}, 1s), std::invalid_argument);
}

TEST(Limiter, AcquireTakesEveryResourceAndTheirReleaseIsRaii) {
  auto db = make_resource("db", 1), file = make_resource("file", 2);
  Limiter limiter({db, file}, 1s);
  auto both = limiter.select({db, file});
  {
    Permit p = limiter.acquire(both);
    ASSERT_TRUE(p);
    EXPECT_EQ(db->in_use(), 1);
    EXPECT_EQ(file->in_use(), 1);
  }
  EXPECT_EQ(db->in_use(), 0);
  EXPECT_EQ(file->in_use(), 0);
}

TEST(Limiter, TimeoutCoversAllResourcesAndReleasesPartialAcquisition) {
  auto db = make_resource("db", 1), file = make_resource("file", 1);
  Limiter limiter({db, file}, 10ms);
  Permit file_held = limiter.try_acquire(limiter.select({file}));
  ASSERT_TRUE(file_held);
  Permit p = limiter.acquire(limiter.select({db, file}));
  EXPECT_FALSE(p);
  EXPECT_EQ(p.outcome(), Outcome::kTimeout);
  EXPECT_EQ(p.refused_by_name(), "file");
  EXPECT_EQ(db->in_use(), 0);  // the db slot taken on the way was given back
  EXPECT_EQ(file->waiting(), 0);
}

TEST(Limiter, StatisticsFollowRegistrationOrder) {
  auto db = make_resource("db", 1), file = make_resource("file", 1);
  Limiter limiter({db, file}, 1s);
  auto stats = limiter.statistics();
  ASSERT_EQ(stats.size(), 2u);
  EXPECT_EQ(stats[0].name, "db");
  EXPECT_EQ(stats[1].name, "file");
}

TEST(Limiter, TwoThreadsTakingTwoResourcesInOrderNeverDeadlock) {
  auto db = make_resource("db", 1), file = make_resource("file", 1);
  Limiter limiter({db, file}, 30s);
  auto both = limiter.select({db, file});
  std::atomic<int> done{0};
  auto worker = [&] {
    for (int i = 0; i < 200; ++i) {
      Permit p = limiter.acquire(both);
      ASSERT_TRUE(p);
    }
    ++done;
  };
  std::thread t1(worker), t2(worker);
  t1.join();
  t2.join();
  EXPECT_EQ(done, 2);
  EXPECT_EQ(db->statistics().acquired_total, 400u);
}

// A limiter whose timeout is Clock::duration::max() ("forever") used to
// compute its deadline as now + max, which overflowed into the past.
TEST(Limiter, LargestTimeoutWaitsWithoutDeadline) {
  auto db = make_resource("db", 1), file = make_resource("file", 1);
  Limiter limiter({db, file}, Clock::duration::max());
  auto both = limiter.select({db, file});
  Permit held = limiter.try_acquire(limiter.select({file}));
  Outcome outcome = Outcome::kPending;
  std::thread waiter([&] { outcome = limiter.acquire(both).outcome(); });
  ASSERT_TRUE(eventually([&] { return file->waiting() == 1; }));
  held.release();
  waiter.join();
  EXPECT_EQ(outcome, Outcome::kGranted);
  EXPECT_EQ(db->in_use(), 0);
  EXPECT_EQ(file->in_use(), 0);
}

}  // namespace
}  // namespace concurrency_limiter
