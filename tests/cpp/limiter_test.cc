#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

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

// --- Lifetimes (issue 20) ---------------------------------------------------

TEST(Lifetime, APermitGrantedAtOnceKeepsItsResourceAlive) {
  auto db = make_resource("db", 1);
  std::weak_ptr<Resource> watch = db;
  auto limiter = std::make_unique<Limiter>(std::vector{db}, 1s);
  auto set = limiter->select({db});
  Permit through_limiter = limiter->acquire(set);  // no wait: no Acquisition
  ASSERT_TRUE(through_limiter);
  // Every other owner goes, as when a new configuration replaces the old.
  limiter.reset();
  set.reset();
  db.reset();
  EXPECT_FALSE(watch.expired());
  through_limiter.release();  // touches the resource: alive
  through_limiter = Permit();
  EXPECT_TRUE(watch.expired());

  auto file = make_resource("file", 1);
  watch = file;
  Permit direct = file->try_acquire();
  ASSERT_TRUE(direct);
  file.reset();
  EXPECT_FALSE(watch.expired());
  direct = Permit();
  EXPECT_TRUE(watch.expired());
}

TEST(Lifetime, ARefusedPermitNamesAResourceNobodyElseHolds) {
  auto db = make_resource("db", 1);
  std::weak_ptr<Resource> watch = db;
  auto limiter = std::make_unique<Limiter>(std::vector{db}, 1s);
  auto set = limiter->select({db});
  Permit held = limiter->try_acquire(set);
  Permit refused = limiter->try_acquire(set);
  ASSERT_FALSE(refused);
  held = Permit();
  limiter.reset();
  set.reset();
  db.reset();
  EXPECT_TRUE(watch.expired());  // it keeps the name, not the resource
  EXPECT_EQ(refused.refused_by_name(), "db");
  EXPECT_EQ(refused.outcome(), Outcome::kTimeout);
}

TEST(Lifetime, ARefusedPermitOutlivesAResourceNotOwnedBySharedPtr) {
  const std::string name = "a-local-resource-with-a-name-too-long-for-sso";
  Permit tried, waited;
  {
    Resource local(name, 1);
    Permit held = local.try_acquire();
    tried = local.try_acquire();
    waited = local.acquire_for(1ms);  // queued, then timed out
  }
  EXPECT_EQ(tried.outcome(), Outcome::kTimeout);
  EXPECT_EQ(tried.refused_by_name(), name);
  EXPECT_EQ(waited.outcome(), Outcome::kTimeout);
  EXPECT_EQ(waited.refused_by_name(), name);
}

TEST(Lifetime, AResourceNotMadeByMakeSharedWaitsUnderContention) {
  Resource local("local", 1);  // not owned by a shared_ptr
  Permit held = local.try_acquire();
  ASSERT_TRUE(held);
  Outcome outcome = Outcome::kPending;
  std::thread waiter([&] { outcome = local.acquire_for(10s).outcome(); });
  ASSERT_TRUE(eventually([&] { return local.waiting() == 1; }));
  held.release();
  waiter.join();
  EXPECT_EQ(outcome, Outcome::kGranted);
  EXPECT_EQ(local.in_use(), 0);
  EXPECT_EQ(local.acquire_until(Clock::now() + 1s).outcome(), Outcome::kGranted);
}

#if !defined(__SANITIZE_THREAD__)
TEST(LifetimeDeathTest, DestroyingAResourceNotOwnedBySharedPtrWithASlotHeldAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        Permit outlives;
        {
          Resource local("local", 1);
          outlives = local.try_acquire();
        }
      },
      "resource 'local' destroyed while 1 slot\\(s\\) held");
}
#endif

TEST(Lifetime, CreateIsTheFactory) {
  std::shared_ptr<Resource> r = Resource::create("db", 3);
  EXPECT_EQ(r->capacity(), 3);
  ResourceOptions o;
  o.name = "file";
  o.capacity = 2;
  EXPECT_EQ(Resource::create(o)->name(), "file");
}

TEST(Close, FailsEveryWaiterAndRefusesLaterRequests) {
  auto db = make_resource("db", 1), file = make_resource("file", 1);
  Limiter limiter({db, file}, 10s);
  auto both = limiter.select({db, file});
  Permit holds_file = limiter.try_acquire(limiter.select({file}));
  // A blocked thread, and a request holding db while it waits for file.
  Outcome blocked = Outcome::kPending;
  std::thread thread([&] { blocked = limiter.acquire(limiter.select({file})).outcome(); });
  testing::Recorder recorder;
  Acquisition waiting(both);
  ASSERT_EQ(waiting.start(recorder.callback()), Outcome::kPending);
  ASSERT_TRUE(eventually([&] { return file->waiting() == 2; }));
  EXPECT_EQ(db->in_use(), 1);

  limiter.close();
  thread.join();
  EXPECT_EQ(blocked, Outcome::kUnavailable);
  ASSERT_EQ(recorder.outcomes, std::vector{Outcome::kUnavailable});
  EXPECT_EQ(waiting.refused_by()->name(), "file");
  EXPECT_EQ(db->in_use(), 0);  // what it held is released
  EXPECT_EQ(file->waiting(), 0);
  EXPECT_TRUE(db->closed());

  // Later requests are refused at once, on every path.
  EXPECT_EQ(limiter.try_acquire(both).outcome(), Outcome::kUnavailable);
  EXPECT_EQ(limiter.acquire_for(both, 10s).outcome(), Outcome::kUnavailable);
  EXPECT_EQ(limiter.acquire_for(both, "key", 10s).outcome(), Outcome::kUnavailable);
  EXPECT_EQ(db->acquire_for(10s).outcome(), Outcome::kUnavailable);
  // Held slots stay held until released.
  EXPECT_TRUE(holds_file);
  holds_file.release();
  EXPECT_EQ(file->in_use(), 0);
  EXPECT_EQ(db->statistics().rejected_total[rejection_index(Outcome::kUnavailable)], 3u);
}

TEST(Close, AKeyedResourceFailsItsWaitersToo) {
  auto db = std::make_shared<Resource>(ResourceOptions{.name = "db", .capacity = 1, .per_key = 1});
  Limiter limiter({db}, 10s);
  auto set = limiter.select({db});
  Permit held = limiter.acquire_for(set, "a", 1s);
  testing::Recorder recorder;
  Acquisition waiting(set, "a");
  ASSERT_EQ(waiting.start(recorder.callback()), Outcome::kPending);
  db->close();
  EXPECT_EQ(recorder.outcomes, std::vector{Outcome::kUnavailable});
  EXPECT_EQ(db->statistics().active_keys, 1);  // "a" still holds its slot
  held.release();
  EXPECT_EQ(db->statistics().active_keys, 0);
}

TEST(Close, ClosingAResourceAlreadyHeldLeavesARequestWaitingForAnother) {
  auto a = make_resource("a", 1), b = make_resource("b", 1);
  Limiter limiter({a, b}, 10s);
  Permit holds_b = limiter.try_acquire(limiter.select({b}));
  testing::Recorder recorder;
  Acquisition waiting(limiter.select({a, b}));  // holds a, waits for b
  ASSERT_EQ(waiting.start(recorder.callback()), Outcome::kPending);
  EXPECT_EQ(a->in_use(), 1);
  a->close();
  EXPECT_TRUE(recorder.outcomes.empty());
  EXPECT_EQ(a->in_use(), 1);
  EXPECT_EQ(b->waiting(), 1);
  holds_b.release();
  EXPECT_EQ(recorder.outcomes, std::vector{Outcome::kGranted});
  waiting.release();
  EXPECT_EQ(a->in_use(), 0);
}

// --- A timeout <= 0 tries once and never queues (issue 20) ------------------

TEST(ZeroTimeout, NeverPushesAWaiterOutOfAFullLifoQueue) {
  auto db = make_resource("db", 1, /*max_waiting=*/1, QueueDiscipline::kLifo);
  Limiter limiter({db}, 10s);
  auto set = limiter.select({db});
  Permit held = limiter.try_acquire(set);
  testing::Recorder recorder;
  Acquisition waiter(set);
  ASSERT_EQ(waiter.start(recorder.callback()), Outcome::kPending);

  EXPECT_EQ(limiter.acquire_for(set, 0s).outcome(), Outcome::kTimeout);
  EXPECT_EQ(limiter.acquire_for(set, -1s).outcome(), Outcome::kTimeout);
  EXPECT_EQ(limiter.acquire_for(set, "key", 0s).outcome(), Outcome::kTimeout);
  EXPECT_EQ(limiter.acquire_until(set, Clock::now() - 1s).outcome(), Outcome::kTimeout);
  Permit p = db->acquire_for(0s);
  EXPECT_EQ(p.outcome(), Outcome::kTimeout);
  EXPECT_EQ(p.refused_by_name(), "db");
  EXPECT_EQ(db->acquire_until(Clock::now()).outcome(), Outcome::kTimeout);

  EXPECT_TRUE(recorder.outcomes.empty());  // the real waiter still waits
  EXPECT_EQ(db->waiting(), 1);
  // Each try counts as a timeout, as a timed request that found no slot.
  EXPECT_EQ(db->statistics().rejected_total[rejection_index(Outcome::kTimeout)], 6u);
  held.release();
  EXPECT_EQ(recorder.outcomes, std::vector{Outcome::kGranted});
}

TEST(ZeroTimeout, AFullFifoQueueRefusesItAsOnArrival) {
  auto db = make_resource("db", 1, /*max_waiting=*/0);
  Limiter limiter({db}, 10s);
  auto set = limiter.select({db});
  Permit held = limiter.try_acquire(set);
  EXPECT_EQ(limiter.acquire_for(set, 0s).outcome(), Outcome::kQueueFull);
  EXPECT_EQ(db->acquire_for(0s).outcome(), Outcome::kQueueFull);
  EXPECT_EQ(db->statistics().rejected_total[rejection_index(Outcome::kQueueFull)], 2u);
}

TEST(ZeroTimeout, TakesAFreeSlotButDoesNotPassAWaiter) {
  auto db = make_resource("db", 2);
  Limiter limiter({db}, 10s);
  auto set = limiter.select({db});
  EXPECT_TRUE(limiter.acquire_for(set, 0s));
  EXPECT_TRUE(limiter.acquire_for(set, "key", 0s));
  Permit a = limiter.try_acquire(set), b = limiter.try_acquire(set);
  Acquisition waiter(set);
  ASSERT_EQ(waiter.start([](Outcome) {}), Outcome::kPending);
  a.release();  // to the waiter
  EXPECT_EQ(limiter.acquire_for(set, "key", 0s).outcome(), Outcome::kTimeout);
}

TEST(ZeroTimeout, AKeyAtItsShareIsRefusedWithKeyLimit) {
  auto db = std::make_shared<Resource>(ResourceOptions{.name = "db", .capacity = 2, .per_key = 1});
  Limiter limiter({db}, 10s);
  auto set = limiter.select({db});
  Permit held = limiter.acquire_for(set, "a", 0s);
  ASSERT_TRUE(held);
  EXPECT_EQ(limiter.acquire_for(set, "a", 0s).outcome(), Outcome::kKeyLimit);
  EXPECT_EQ(db->waiting(), 0);
}

TEST(LimitAlgorithmContract, UpdateIsNoexceptInTheType) {
  static_assert(noexcept(std::declval<LimitAlgorithm&>().update(std::declval<const LimitSample&>())));
  SUCCEED();
}

}  // namespace
}  // namespace concurrency_limiter
