#include <gtest/gtest.h>

#include "test_util.h"

namespace concurrency_limiter {
namespace {

using testing::make_resource;
using testing::Recorder;
using testing::set_of;

struct Waiters {
  explicit Waiters(int n) : r(make_resource("db", 1)), holder(set_of({r})), recs(n) {
    EXPECT_TRUE(holder.try_acquire());
    for (int i = 0; i < n; ++i) {
      acqs.push_back(std::make_unique<Acquisition>(set_of({r})));
      EXPECT_EQ(acqs.back()->start(recs[i].callback()), Outcome::kPending);
    }
  }
  std::shared_ptr<Resource> r;
  Acquisition holder;
  std::vector<Recorder> recs;
  std::vector<std::unique_ptr<Acquisition>> acqs;
};

TEST(DeadlineQueue, ExpiresOnlyWhatIsDueAndReportsTheNextDeadline) {
  Waiters w(3);
  DeadlineQueue q;
  EXPECT_TRUE(q.add(*w.acqs[0], 10.0));
  EXPECT_FALSE(q.add(*w.acqs[1], 20.0));
  EXPECT_TRUE(q.add(*w.acqs[2], 5.0));  // out of order: becomes the earliest
  EXPECT_EQ(q.next_deadline(), 5.0);
  EXPECT_EQ(q.expire_due(10.0), 20.0);
  EXPECT_EQ(w.recs[2].outcomes, std::vector<Outcome>{Outcome::kTimeout});
  EXPECT_EQ(w.recs[0].outcomes, std::vector<Outcome>{Outcome::kTimeout});
  EXPECT_TRUE(w.recs[1].outcomes.empty());
  EXPECT_EQ(q.size(), 1u);
  EXPECT_EQ(w.r->waiting(), 1);
}

TEST(DeadlineQueue, RemovedOrGrantedAcquisitionsAreNotExpired) {
  Waiters w(2);
  DeadlineQueue q;
  q.add(*w.acqs[0], 1.0);
  q.add(*w.acqs[1], 2.0);
  w.holder.release();  // grants acqs[0]
  q.remove(*w.acqs[1]);
  EXPECT_EQ(q.expire_due(100.0), std::nullopt);
  EXPECT_EQ(w.recs[0].outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_TRUE(w.recs[1].outcomes.empty());
  EXPECT_EQ(q.size(), 0u);
}

TEST(DeadlineQueue, AnAcquisitionDestroyedWhileRegisteredLeavesTheQueue) {
  Waiters w(2);
  DeadlineQueue q;
  q.add(*w.acqs[0], 1.0);
  q.add(*w.acqs[1], 2.0);
  w.acqs[0].reset();
  EXPECT_EQ(q.size(), 1u);
  EXPECT_EQ(q.next_deadline(), 2.0);
  EXPECT_EQ(q.expire_due(3.0), std::nullopt);
  EXPECT_EQ(w.recs[1].outcomes, std::vector<Outcome>{Outcome::kTimeout});
}

}  // namespace
}  // namespace concurrency_limiter
