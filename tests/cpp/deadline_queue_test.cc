#include <gtest/gtest.h>

#include <map>
#include <random>
#include <tuple>

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

TEST(DeadlineQueue, EqualDeadlinesExpireInTheOrderTheyWereAdded) {
  auto r = make_resource("db", 1);
  Acquisition holder(set_of({r}));
  ASSERT_TRUE(holder.try_acquire());
  std::vector<int> expired;
  std::vector<std::unique_ptr<Acquisition>> acqs;
  for (int i = 0; i < 6; ++i) {
    acqs.push_back(std::make_unique<Acquisition>(set_of({r})));
    acqs.back()->start([&expired, i](Outcome) { expired.push_back(i); });
  }
  DeadlineQueue q;
  q.add(*acqs[5], 9.0);
  for (int i : {2, 0, 3, 1}) q.add(*acqs[i], 7.0);
  q.add(*acqs[4], 1.0);
  q.expire_due(8.0);
  EXPECT_EQ(expired, (std::vector<int>{4, 2, 0, 3, 1}));
  EXPECT_EQ(q.size(), 1u);
}

// Routes with different timeouts interleave their deadlines (the case that
// used to cost O(n) per add). Random adds, moves, removals, destructions
// and expiries are checked against a reference model: the order in which
// acquisitions expire, the size and the next deadline after every step.
TEST(DeadlineQueue, RandomInterleavingsMatchAReferenceModel) {
  for (unsigned seed = 1; seed <= 20; ++seed) {
    std::mt19937 rng(seed);
    constexpr int kCount = 120;
    auto r = make_resource("db", 1);
    Acquisition holder(set_of({r}));
    ASSERT_TRUE(holder.try_acquire());
    std::vector<int> expired;  // ids, in the order their callbacks ran
    std::vector<std::unique_ptr<Acquisition>> acqs;
    for (int i = 0; i < kCount; ++i) {
      acqs.push_back(std::make_unique<Acquisition>(set_of({r})));
      ASSERT_EQ(acqs.back()->start([&expired, i](Outcome o) {
        EXPECT_EQ(o, Outcome::kTimeout);
        expired.push_back(i);
      }),
                Outcome::kPending);
    }
    DeadlineQueue q;
    // Reference: (deadline, add sequence) -> id, and id -> its key.
    std::map<std::pair<double, int>, int> model;
    std::map<int, std::pair<double, int>> key_of;
    std::vector<int> expected;
    int sequence = 0;
    double now = 0.0;
    const double timeouts[] = {0.5, 2.0, 5.0, 30.0};
    for (int step = 0; step < 600; ++step) {
      const int id = static_cast<int>(rng() % kCount);
      const bool alive = acqs[id] != nullptr;
      const bool pending = alive && acqs[id]->state() == Acquisition::State::kPending;
      switch (rng() % 8) {
        case 0: case 1: case 2: case 3: {  // add or move, interleaved timeouts
          if (!pending) break;
          const double deadline =
              rng() % 5 == 0 ? now + static_cast<double>(rng() % 40)
                             : now + timeouts[rng() % 4];
          if (key_of.count(id)) model.erase(key_of[id]);
          const auto key = std::make_pair(deadline, sequence++);
          model[key] = id;
          key_of[id] = key;
          const bool earliest = q.add(*acqs[id], deadline);
          EXPECT_EQ(earliest, model.begin()->second == id);
          break;
        }
        case 4: {  // remove (no effect when not registered)
          if (!alive) break;
          q.remove(*acqs[id]);
          if (key_of.count(id)) {
            model.erase(key_of[id]);
            key_of.erase(id);
          }
          break;
        }
        case 5: {  // an acquisition destroyed while registered
          if (!alive || rng() % 4 != 0) break;
          acqs[id].reset();
          if (key_of.count(id)) {
            model.erase(key_of[id]);
            key_of.erase(id);
          }
          break;
        }
        default: {  // time passes; the timer fires
          now += static_cast<double>(rng() % 300) / 100.0;
          while (!model.empty() && model.begin()->first.first <= now) {
            expected.push_back(model.begin()->second);
            key_of.erase(model.begin()->second);
            model.erase(model.begin());
          }
          const auto next = q.expire_due(now);
          EXPECT_EQ(next.has_value(), !model.empty());
          if (next && !model.empty()) {
            EXPECT_EQ(*next, model.begin()->first.first);
          }
          break;
        }
      }
      ASSERT_EQ(q.size(), model.size()) << "seed " << seed << " step " << step;
      if (!model.empty()) {
        ASSERT_EQ(q.next_deadline(), model.begin()->first.first);
      } else {
        ASSERT_EQ(q.next_deadline(), std::nullopt);
      }
      ASSERT_EQ(expired, expected) << "seed " << seed << " step " << step;
    }
  }
}

}  // namespace
}  // namespace concurrency_limiter
