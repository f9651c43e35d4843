#include <gtest/gtest.h>

#include "test_util.h"

namespace concurrency_limiter {
namespace {

using testing::make_resource;
using testing::Recorder;
using testing::set_of;
using State = Acquisition::State;

TEST(Acquisition, GrantedAtOnceReturnsGrantedWithoutCallingBack) {
  auto r = make_resource("db", 1);
  Recorder rec;
  Acquisition acq(set_of({r}));
  EXPECT_EQ(acq.start(rec.callback()), Outcome::kGranted);
  EXPECT_TRUE(rec.outcomes.empty());
  EXPECT_EQ(acq.state(), State::kGranted);
  EXPECT_EQ(r->in_use(), 1);
  acq.release();
  EXPECT_EQ(acq.state(), State::kReleased);
  EXPECT_EQ(r->in_use(), 0);
}

TEST(Acquisition, PendingIsGrantedByReleaseAndCalledBackOnce) {
  auto r = make_resource("db", 1);
  Acquisition holder(set_of({r}));
  ASSERT_TRUE(holder.try_acquire());
  Recorder rec;
  Acquisition acq(set_of({r}));
  ASSERT_EQ(acq.start(rec.callback()), Outcome::kPending);
  EXPECT_EQ(r->waiting(), 1);
  holder.release();
  EXPECT_EQ(rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_EQ(acq.state(), State::kGranted);
  EXPECT_EQ(r->in_use(), 1);
  acq.expire();  // too late: no effect, no second callback
  acq.cancel();
  EXPECT_EQ(rec.outcomes.size(), 1u);
  EXPECT_EQ(acq.state(), State::kGranted);
}

TEST(Acquisition, ExpireRejectsWithTimeoutAndCounts) {
  auto r = make_resource("db", 1);
  Acquisition holder(set_of({r}));
  ASSERT_TRUE(holder.try_acquire());
  Recorder rec;
  Acquisition acq(set_of({r}));
  ASSERT_EQ(acq.start(rec.callback()), Outcome::kPending);
  acq.expire();
  EXPECT_EQ(rec.outcomes, std::vector<Outcome>{Outcome::kTimeout});
  EXPECT_EQ(acq.state(), State::kRejected);
  EXPECT_EQ(acq.refused_by(), r.get());
  EXPECT_EQ(r->waiting(), 0);
  EXPECT_EQ(r->statistics().rejected(Outcome::kTimeout), 1u);
}

TEST(Acquisition, CancelWithDisconnectedIsCountedAsSuch) {
  auto r = make_resource("db", 1);
  Acquisition holder(set_of({r}));
  ASSERT_TRUE(holder.try_acquire());
  Recorder rec;
  Acquisition acq(set_of({r}));
  ASSERT_EQ(acq.start(rec.callback()), Outcome::kPending);
  acq.cancel(Outcome::kDisconnected);
  EXPECT_EQ(rec.outcomes, std::vector<Outcome>{Outcome::kDisconnected});
  EXPECT_EQ(r->statistics().rejected(Outcome::kDisconnected), 1u);
  EXPECT_THROW(acq.cancel(Outcome::kGranted), std::invalid_argument);
}

// A client whose deadline is already spent is refused before it tries: it
// takes no free slot, never queues, and the first resource counts it.
TEST(Acquisition, RefuseTakesNothingAndIsCountedByTheFirstResource) {
  auto db = make_resource("db", 1);
  auto disk = make_resource("disk", 1);
  Acquisition acq(set_of({db, disk}));
  EXPECT_EQ(acq.refuse(Outcome::kDeadline), Outcome::kDeadline);
  EXPECT_EQ(acq.state(), State::kRejected);
  EXPECT_EQ(acq.outcome(), Outcome::kDeadline);
  EXPECT_EQ(acq.refused_by(), db.get());
  EXPECT_EQ(db->in_use(), 0);
  EXPECT_EQ(db->waiting(), 0);
  EXPECT_EQ(db->statistics().rejected(Outcome::kDeadline), 1u);
  EXPECT_EQ(db->statistics().rejected(Outcome::kTimeout), 0u);
  EXPECT_EQ(disk->statistics().rejected(Outcome::kDeadline), 0u);
  EXPECT_EQ(to_string(Outcome::kDeadline), "deadline");
  EXPECT_THROW(acq.refuse(Outcome::kDeadline), std::logic_error);
  EXPECT_THROW(acq.start(nullptr), std::logic_error);
  Acquisition other(set_of({db}));
  EXPECT_THROW(other.refuse(Outcome::kGranted), std::invalid_argument);
  EXPECT_THROW(other.refuse(Outcome::kPending), std::invalid_argument);
  EXPECT_EQ(other.state(), State::kIdle);
  EXPECT_EQ(other.start(nullptr), Outcome::kGranted);  // still usable
}

// asyncio's semaphore once lost a slot when a waiter was woken and then
// cancelled before it ran (CPython gh-90155). Here the owner of a granted
// acquisition that gives up calls cancel() then release(): the slot must go
// to the next waiter.
TEST(Acquisition, GrantedThenCancelledPassesTheSlotOn) {
  auto r = make_resource("db", 1);
  Acquisition holder(set_of({r}));
  ASSERT_TRUE(holder.try_acquire());
  Recorder b_rec, c_rec;
  Acquisition b(set_of({r})), c(set_of({r}));
  ASSERT_EQ(b.start(b_rec.callback()), Outcome::kPending);
  ASSERT_EQ(c.start(c_rec.callback()), Outcome::kPending);
  holder.release();
  ASSERT_EQ(b_rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  b.cancel();   // lost the race with the grant: no effect
  b.release();  // ... so the giving-up owner releases
  EXPECT_EQ(c_rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_EQ(r->in_use(), 1);
  EXPECT_EQ(r->waiting(), 0);
}

TEST(Acquisition, TimeoutOnASecondResourceReleasesTheFirst) {
  auto db = make_resource("db", 1);
  auto file = make_resource("file", 1);
  Acquisition file_holder(set_of({file}));
  ASSERT_TRUE(file_holder.try_acquire());
  Recorder rec;
  Acquisition acq(set_of({db, file}));
  ASSERT_EQ(acq.start(rec.callback()), Outcome::kPending);
  EXPECT_EQ(db->in_use(), 1);  // holds db while it waits for file
  EXPECT_EQ(file->waiting(), 1);
  // Another request queues for db behind it.
  Recorder other_rec;
  Acquisition other(set_of({db}));
  ASSERT_EQ(other.start(other_rec.callback()), Outcome::kPending);
  acq.expire();
  EXPECT_EQ(rec.outcomes, std::vector<Outcome>{Outcome::kTimeout});
  EXPECT_EQ(acq.refused_by(), file.get());
  EXPECT_EQ(file->waiting(), 0);
  // db went straight to the request waiting for it.
  EXPECT_EQ(other_rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_EQ(db->in_use(), 1);
  other.release();
  EXPECT_EQ(db->in_use(), 0);
  EXPECT_EQ(file->statistics().rejected(Outcome::kTimeout), 1u);
  EXPECT_EQ(db->statistics().rejected(Outcome::kTimeout), 0u);
}

TEST(Acquisition, GrantOfTheFirstResourceMovesOnToTheSecond) {
  auto db = make_resource("db", 1);
  auto file = make_resource("file", 1);
  Acquisition db_holder(set_of({db})), file_holder(set_of({file}));
  ASSERT_TRUE(db_holder.try_acquire());
  ASSERT_TRUE(file_holder.try_acquire());
  Recorder rec;
  Acquisition acq(set_of({db, file}));
  ASSERT_EQ(acq.start(rec.callback()), Outcome::kPending);
  db_holder.release();
  EXPECT_TRUE(rec.outcomes.empty());  // now waits for file
  EXPECT_EQ(file->waiting(), 1);
  file_holder.release();
  EXPECT_EQ(rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  acq.release();
  EXPECT_EQ(db->in_use(), 0);
  EXPECT_EQ(file->in_use(), 0);
}

TEST(Acquisition, TryAcquireIsAllOrNothing) {
  auto db = make_resource("db", 1);
  auto file = make_resource("file", 1);
  Acquisition file_holder(set_of({file}));
  ASSERT_TRUE(file_holder.try_acquire());
  Acquisition acq(set_of({db, file}));
  EXPECT_FALSE(acq.try_acquire());
  EXPECT_EQ(db->in_use(), 0);
  EXPECT_EQ(acq.state(), State::kIdle);
  EXPECT_EQ(acq.refused_by(), file.get());
  // A failed try may be followed by a real wait.
  Recorder rec;
  EXPECT_EQ(acq.start(rec.callback()), Outcome::kPending);
  file_holder.release();
  EXPECT_EQ(rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
}

TEST(Acquisition, TryAcquireDoesNotJumpTheQueue) {
  auto r = make_resource("db", 1);
  Acquisition holder(set_of({r}));
  ASSERT_TRUE(holder.try_acquire());
  Recorder rec;
  Acquisition waiter(set_of({r}));
  ASSERT_EQ(waiter.start(rec.callback()), Outcome::kPending);
  holder.release();  // handed to the waiter
  Acquisition late(set_of({r}));
  EXPECT_FALSE(late.try_acquire());
}

TEST(Acquisition, DestroyingAPendingOrGrantedAcquisitionLeavesNoTrace) {
  auto r = make_resource("db", 1);
  Recorder rec;
  {
    Acquisition holder(set_of({r}));
    ASSERT_TRUE(holder.try_acquire());
    {
      Acquisition pending(set_of({r}));
      ASSERT_EQ(pending.start(rec.callback()), Outcome::kPending);
    }
    EXPECT_EQ(r->waiting(), 0);
  }
  EXPECT_EQ(r->in_use(), 0);
  EXPECT_TRUE(rec.outcomes.empty());
}

TEST(Acquisition, StartingTwiceIsALogicError) {
  auto r = make_resource("db", 1);
  Acquisition acq(set_of({r}));
  ASSERT_EQ(acq.start(nullptr), Outcome::kGranted);
  EXPECT_THROW(acq.start(nullptr), std::logic_error);
  EXPECT_THROW(acq.try_acquire(), std::logic_error);
}

}  // namespace
}  // namespace concurrency_limiter

namespace concurrency_limiter {
namespace {

TEST(Acquisition, FailedTryOnASecondResourceLeavesNoTraceInTheFirstsStatistics) {
  auto db = testing::make_resource("db", 1);
  auto file = testing::make_resource("file", 1);
  Acquisition file_holder(testing::set_of({file}));
  ASSERT_TRUE(file_holder.try_acquire());
  Acquisition acq(testing::set_of({db, file}));
  EXPECT_FALSE(acq.try_acquire());
  const ResourceStatistics s = db->statistics();
  EXPECT_EQ(s.in_use, 0);
  EXPECT_EQ(s.acquired_total, 0u);
  EXPECT_EQ(s.wait_seconds.count, 0u);
  EXPECT_EQ(s.hold_seconds.count, 0u);
}

// The owner of a waiter may destroy it while another thread is completing
// its grant; it must never have to wait for that thread's callbacks.
TEST(Acquisition, OwnerNeverWaitsForACallbackRunningOnTheReleasingThread) {
  auto r = testing::make_resource("db", 1);
  auto set = testing::set_of({r});
  auto holder = std::make_unique<Acquisition>(set);
  ASSERT_TRUE(holder->try_acquire());
  std::atomic<bool> in_callback{false};
  std::atomic<bool> owner_done{false};
  auto waiter = std::make_unique<Acquisition>(set);
  ASSERT_EQ(waiter->start([&](Outcome) {
              in_callback = true;
              // Blocks until the owner has destroyed the acquisition: with a
              // destructor that waited for this callback, a deadlock.
              while (!owner_done) std::this_thread::yield();
            }),
            Outcome::kPending);
  std::thread releaser([&] { holder->release(); });
  ASSERT_TRUE(testing::eventually([&] { return in_callback.load(); }));
  waiter.reset();  // releases the slot it was granted
  owner_done = true;
  releaser.join();
  EXPECT_EQ(r->in_use(), 0);
}

}  // namespace
}  // namespace concurrency_limiter
