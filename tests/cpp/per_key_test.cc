// Per-key shares (ResourceOptions::per_key): no key holds more than its share,
// the total stays within the limit, a key at its share does not hold up other
// keys, a timeout caused by the share says kKeyLimit, no key (std::nullopt)
// is exempt from the share only, and per-key state lives only while a key
// holds or waits.
#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

namespace concurrency_limiter {
namespace {

using namespace std::chrono_literals;
using testing::Recorder;
using testing::set_of;

std::shared_ptr<Resource> keyed(std::int64_t capacity, std::int64_t per_key,
                                QueueDiscipline queue = QueueDiscipline::kFifo,
                                std::optional<std::int64_t> max_waiting = std::nullopt) {
  return std::make_shared<Resource>(ResourceOptions{.name = "db",
                                                    .capacity = capacity,
                                                    .max_waiting = max_waiting,
                                                    .queue = queue,
                                                    .per_key = per_key});
}

// An acquisition of one resource for `key`, with its recorded outcomes.
struct Request {
  Request(const std::shared_ptr<Resource>& r, std::optional<std::string> key)
      : acq(set_of({r}), std::move(key)) {}
  Outcome start() { return acq.start(rec.callback()); }
  Recorder rec;
  Acquisition acq;
};

TEST(PerKey, ValidatesShare) {
  for (std::int64_t bad : {std::int64_t{-1}, std::int64_t{4}}) {
    try {
      keyed(3, bad);
      FAIL() << "per_key " << bad << " accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("per_key"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("capacity=3"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(keyed(3, 3)->per_key(), 3);
  EXPECT_EQ(keyed(3, 0)->per_key(), 0);
}

TEST(PerKey, HostScopeIsRefused) {
  try {
    Resource r(ResourceOptions{.name = "perkey-host", .capacity = 2,
                               .scope = Scope::kHost, .per_key = 1});
    FAIL() << "per_key with scope host accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("per_key"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("scope"), std::string::npos) << e.what();
  }
}

TEST(PerKey, ShareIsEnforced) {
  auto db = keyed(5, 2);
  Request a1(db, "A"), a2(db, "A"), a3(db, "A");
  EXPECT_EQ(a1.start(), Outcome::kGranted);
  EXPECT_EQ(a2.start(), Outcome::kGranted);
  EXPECT_EQ(a3.start(), Outcome::kPending);  // three slots are free, A has two
  ResourceStatistics s = db->statistics();
  EXPECT_EQ(s.in_use, 2);
  EXPECT_EQ(s.waiting, 1);
  EXPECT_EQ(s.active_keys, 1);

  a1.acq.release();  // A is below its share again: the slot goes to a3
  EXPECT_EQ(a3.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_EQ(db->in_use(), 2);
  a2.acq.release();
  a3.acq.release();
  s = db->statistics();
  EXPECT_EQ(s.in_use, 0);
  EXPECT_EQ(s.active_keys, 0);
}

TEST(PerKey, NewcomerOfAnotherKeyPassesAWaiterAtItsShare) {
  auto db = keyed(4, 1);
  Request a1(db, "A"), a2(db, "A"), b(db, "B");
  EXPECT_EQ(a1.start(), Outcome::kGranted);
  EXPECT_EQ(a2.start(), Outcome::kPending);
  // a2 cannot use the free slots: B takes one at once.
  EXPECT_EQ(b.start(), Outcome::kGranted);
  EXPECT_EQ(db->in_use(), 2);
  EXPECT_EQ(db->statistics().active_keys, 2);
}

TEST(PerKey, FreedSlotSkipsWaitersAtTheirShare) {
  auto db = keyed(3, 2);
  Request a1(db, "A"), a2(db, "A"), b1(db, "B");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  ASSERT_EQ(a2.start(), Outcome::kGranted);
  ASSERT_EQ(b1.start(), Outcome::kGranted);
  Request a3(db, "A"), b2(db, "B");
  ASSERT_EQ(a3.start(), Outcome::kPending);  // first in the queue
  ASSERT_EQ(b2.start(), Outcome::kPending);

  b1.acq.release();  // a3's key is at its share: b2 is served
  EXPECT_TRUE(a3.rec.outcomes.empty());
  EXPECT_EQ(b2.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  a1.acq.release();  // now a3's key has room
  EXPECT_EQ(a3.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
}

TEST(PerKey, TimeoutWhileHeldBackByTheShareIsKeyLimit) {
  auto db = keyed(3, 1);
  Request a1(db, "A"), a2(db, "A");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  ASSERT_EQ(a2.start(), Outcome::kPending);
  a2.acq.expire();
  EXPECT_EQ(a2.rec.outcomes, std::vector<Outcome>{Outcome::kKeyLimit});
  EXPECT_EQ(a2.acq.outcome(), Outcome::kKeyLimit);
  EXPECT_EQ(a2.acq.refused_by(), db.get());
  ResourceStatistics s = db->statistics();
  EXPECT_EQ(s.rejected(Outcome::kKeyLimit), 1u);
  EXPECT_EQ(s.rejected(Outcome::kTimeout), 0u);
  EXPECT_EQ(s.waiting, 0);
  EXPECT_EQ(s.active_keys, 1);  // A still holds a1's slot
  EXPECT_EQ(to_string(Outcome::kKeyLimit), "key_limit");
}

TEST(PerKey, HeldBackByTheShareStaysKeyLimitOnceOthersFillTheResource) {
  auto db = keyed(3, 1);
  Request a1(db, "A"), a2(db, "A");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  ASSERT_EQ(a2.start(), Outcome::kPending);  // two slots free, A at its share
  Request b(db, "B"), c(db, "C");
  ASSERT_EQ(b.start(), Outcome::kGranted);
  ASSERT_EQ(c.start(), Outcome::kGranted);  // full now
  a2.acq.expire();
  EXPECT_EQ(a2.rec.outcomes, std::vector<Outcome>{Outcome::kKeyLimit});
}

TEST(PerKey, PassedOverByAFreedSlotIsKeyLimit) {
  auto db = keyed(2, 1);
  Request a1(db, "A"), b1(db, "B"), a2(db, "A");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  ASSERT_EQ(b1.start(), Outcome::kGranted);
  ASSERT_EQ(a2.start(), Outcome::kPending);  // the resource is full
  b1.acq.release();  // the freed slot cannot go to a2
  EXPECT_TRUE(a2.rec.outcomes.empty());
  a2.acq.expire();
  EXPECT_EQ(a2.rec.outcomes, std::vector<Outcome>{Outcome::kKeyLimit});
}

TEST(PerKey, TimeoutOfAFullResourceIsTimeout) {
  auto db = keyed(2, 1);
  Request a1(db, "A"), b1(db, "B"), a2(db, "A");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  ASSERT_EQ(b1.start(), Outcome::kGranted);
  ASSERT_EQ(a2.start(), Outcome::kPending);
  a2.acq.expire();  // no room for anyone: the share is not the reason
  EXPECT_EQ(a2.rec.outcomes, std::vector<Outcome>{Outcome::kTimeout});
  // A cancel is a cancel, whatever held it back.
  Request a3(db, "A");
  ASSERT_EQ(a3.start(), Outcome::kPending);
  b1.acq.release();
  a3.acq.cancel();
  EXPECT_EQ(a3.rec.outcomes, std::vector<Outcome>{Outcome::kCancelled});
}

TEST(PerKey, BlockingAcquireWithAKey) {
  auto db = keyed(3, 1);
  Limiter limiter({db}, 1s);
  auto set = limiter.select({db});
  Permit first = limiter.acquire(set, std::optional<std::string>("A"));
  ASSERT_TRUE(first);
  Permit second = limiter.acquire_for(set, "A", 1ms);
  EXPECT_FALSE(second);
  EXPECT_EQ(second.outcome(), Outcome::kKeyLimit);
  EXPECT_EQ(second.refused_by_name(), "db");
  Permit other = limiter.acquire_for(set, "B", 1ms);
  EXPECT_TRUE(other);
  first.release();
  other.release();
  EXPECT_EQ(db->statistics().active_keys, 0);
}

TEST(PerKey, NoKeyIsExemptFromTheShareButCountsInTheTotal) {
  auto db = keyed(3, 1);
  Request n1(db, std::nullopt), n2(db, std::nullopt), a1(db, "A");
  EXPECT_EQ(n1.start(), Outcome::kGranted);
  EXPECT_EQ(n2.start(), Outcome::kGranted);  // above a share of 1: exempt
  EXPECT_EQ(a1.start(), Outcome::kGranted);
  EXPECT_EQ(db->statistics().active_keys, 1);  // no entry for "no key"

  // The total is full: a keyless request waits like any other.
  Request n3(db, std::nullopt);
  EXPECT_EQ(n3.start(), Outcome::kPending);
  EXPECT_FALSE(db->try_acquire());
  n3.acq.expire();
  EXPECT_EQ(n3.rec.outcomes, std::vector<Outcome>{Outcome::kTimeout});

  // The shorthand without a key, on a keyed resource.
  n1.acq.release();
  Permit p = db->acquire_for(1s);
  EXPECT_TRUE(p);
  EXPECT_EQ(db->in_use(), 3);
}

TEST(PerKey, KeyIsIgnoredWithoutAShare) {
  auto db = keyed(2, 0);
  Request a1(db, "A"), a2(db, "A");
  EXPECT_EQ(a1.start(), Outcome::kGranted);
  EXPECT_EQ(a2.start(), Outcome::kGranted);
  EXPECT_EQ(db->statistics().active_keys, 0);
}

TEST(PerKey, TryAcquireWithAKey) {
  auto db = keyed(3, 1);
  Acquisition a1(set_of({db}), "A"), a2(set_of({db}), "A"), b(set_of({db}), "B");
  EXPECT_TRUE(a1.try_acquire());
  EXPECT_FALSE(a2.try_acquire());  // A is at its share
  EXPECT_TRUE(b.try_acquire());
  EXPECT_EQ(db->statistics().rejected(Outcome::kKeyLimit), 0u);  // a try counts none
}

TEST(PerKey, MultiResourceRequestReturnsKeySlotsOnFailure) {
  auto db = keyed(2, 1);
  auto api = std::make_shared<Resource>(
      ResourceOptions{.name = "api", .capacity = 2, .per_key = 1});
  auto both = set_of({db, api});
  Request blocker(api, "A");
  ASSERT_EQ(blocker.start(), Outcome::kGranted);
  Acquisition a(both, "A");
  Recorder rec;
  ASSERT_EQ(a.start(rec.callback()), Outcome::kPending);  // holds db, waits for api
  EXPECT_EQ(db->in_use(), 1);
  a.expire();
  EXPECT_EQ(rec.outcomes, std::vector<Outcome>{Outcome::kKeyLimit});
  EXPECT_EQ(db->in_use(), 0);
  EXPECT_EQ(db->statistics().active_keys, 0);
  EXPECT_EQ(api->statistics().active_keys, 1);
}

TEST(PerKey, LifoServesTheNewestWaiterWithRoom) {
  auto db = keyed(2, 1, QueueDiscipline::kLifo);
  Request a1(db, "A"), b1(db, "B");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  ASSERT_EQ(b1.start(), Outcome::kGranted);
  Request b2(db, "B"), c1(db, "C"), a2(db, "A");
  ASSERT_EQ(b2.start(), Outcome::kPending);
  ASSERT_EQ(c1.start(), Outcome::kPending);
  ASSERT_EQ(a2.start(), Outcome::kPending);  // newest, but A is at its share
  b1.acq.release();
  EXPECT_TRUE(a2.rec.outcomes.empty());
  EXPECT_TRUE(b2.rec.outcomes.empty());
  EXPECT_EQ(c1.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
}

TEST(PerKey, AdaptiveQueueServesInOrderWhileNotStanding) {
  auto db = keyed(1, 1, QueueDiscipline::kAdaptive);
  Request a1(db, "A");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  Request a2(db, "A"), b1(db, "B");
  ASSERT_EQ(a2.start(), Outcome::kPending);
  ASSERT_EQ(b1.start(), Outcome::kPending);
  a1.acq.release();  // a2's key has room again, and it is first
  EXPECT_EQ(a2.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_TRUE(b1.rec.outcomes.empty());
}

TEST(PerKey, RaisedLimitGoesToWaitersWithRoom) {
  auto db = keyed(4, 1);
  db->set_limit(1);
  Request a1(db, "A");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  Request a2(db, "A"), b1(db, "B"), c1(db, "C");
  ASSERT_EQ(a2.start(), Outcome::kPending);
  ASSERT_EQ(b1.start(), Outcome::kPending);
  ASSERT_EQ(c1.start(), Outcome::kPending);
  db->set_limit(3);
  EXPECT_TRUE(a2.rec.outcomes.empty());
  EXPECT_EQ(b1.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_EQ(c1.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_EQ(db->in_use(), 3);
}

TEST(PerKey, FullQueueStillBoundsTheWaiters) {
  auto db = keyed(2, 1, QueueDiscipline::kFifo, 1);
  Request a1(db, "A"), a2(db, "A"), a3(db, "A");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  ASSERT_EQ(a2.start(), Outcome::kPending);
  EXPECT_EQ(a3.start(), Outcome::kQueueFull);
  EXPECT_EQ(db->statistics().active_keys, 1);
}

TEST(PerKey, FullQueueGivesANewcomerBelowItsShareThePlaceOfTheFloodingKeysNewest) {
  auto db = keyed(2, 1, QueueDiscipline::kFifo, 3);
  Request a1(db, "A"), c1(db, "C");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  ASSERT_EQ(c1.start(), Outcome::kGranted);
  Request a2(db, "A"), a3(db, "A"), a4(db, "A");
  ASSERT_EQ(a2.start(), Outcome::kPending);
  ASSERT_EQ(a3.start(), Outcome::kPending);
  ASSERT_EQ(a4.start(), Outcome::kPending);  // A alone fills the queue
  Request b1(db, "B");
  EXPECT_EQ(b1.start(), Outcome::kPending);  // B is below its share: it waits
  EXPECT_EQ(a4.rec.outcomes, std::vector<Outcome>{Outcome::kKeyLimit});
  EXPECT_EQ(a4.acq.refused_by(), db.get());
  EXPECT_TRUE(a2.rec.outcomes.empty());
  EXPECT_TRUE(a3.rec.outcomes.empty());
  ResourceStatistics s = db->statistics();
  EXPECT_EQ(s.waiting, 3);
  EXPECT_EQ(s.rejected(Outcome::kKeyLimit), 1u);
  EXPECT_EQ(s.rejected(Outcome::kQueueFull), 0u);
  c1.acq.release();  // A is still at its share: B is served
  EXPECT_EQ(b1.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  // A newcomer at its share is turned away as before, and so is any
  // newcomer once no key at its share waits.
  Request a5(db, "A");
  EXPECT_EQ(a5.start(), Outcome::kPending);  // the queue has room again
  Request a6(db, "A");
  EXPECT_EQ(a6.start(), Outcome::kQueueFull);
  EXPECT_TRUE(a5.rec.outcomes.empty());
}

TEST(PerKey, FullQueueTakesThePlaceFromTheKeyWithTheMostWaiters) {
  auto db = keyed(2, 1, QueueDiscipline::kFifo, 3);
  Request a1(db, "A"), d1(db, "D");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  ASSERT_EQ(d1.start(), Outcome::kGranted);
  Request a2(db, "A"), a3(db, "A"), d2(db, "D");
  ASSERT_EQ(a2.start(), Outcome::kPending);
  ASSERT_EQ(a3.start(), Outcome::kPending);
  ASSERT_EQ(d2.start(), Outcome::kPending);  // the newest waiter is D's
  Request n1(db, std::nullopt);  // no key: exempt from the share
  EXPECT_EQ(n1.start(), Outcome::kPending);
  EXPECT_EQ(a3.rec.outcomes, std::vector<Outcome>{Outcome::kKeyLimit});
  EXPECT_TRUE(d2.rec.outcomes.empty());
  // A and D have one waiter each now: one of them makes room, then the other.
  Request b1(db, "B");
  EXPECT_EQ(b1.start(), Outcome::kPending);
  EXPECT_EQ(a2.rec.outcomes.size() + d2.rec.outcomes.size(), 1u);
  Request e1(db, "E");
  EXPECT_EQ(e1.start(), Outcome::kPending);
  EXPECT_EQ(a2.rec.outcomes, std::vector<Outcome>{Outcome::kKeyLimit});
  EXPECT_EQ(d2.rec.outcomes, std::vector<Outcome>{Outcome::kKeyLimit});
  // Only waiters below their share are left: newcomers are turned away,
  // whether below their share or at it.
  Request g1(db, "G"), a4(db, "A");
  EXPECT_EQ(g1.start(), Outcome::kQueueFull);
  EXPECT_EQ(a4.start(), Outcome::kQueueFull);
  ResourceStatistics s = db->statistics();
  EXPECT_EQ(s.waiting, 3);
  EXPECT_EQ(s.rejected(Outcome::kKeyLimit), 3u);
  EXPECT_EQ(s.rejected(Outcome::kQueueFull), 2u);
  EXPECT_EQ(s.active_keys, 4);  // A, D (holding), B, E (waiting); none for n1
}

TEST(PerKey, KeyBackBelowItsShareIsServedInArrivalOrder) {
  auto db = keyed(2, 1);
  Request a1(db, "A"), c1(db, "C");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  ASSERT_EQ(c1.start(), Outcome::kGranted);
  Request a2(db, "A"), b1(db, "B"), a3(db, "A"), b2(db, "B");
  for (Request* r : {&a2, &b1, &a3, &b2}) ASSERT_EQ(r->start(), Outcome::kPending);
  c1.acq.release();  // A at its share: its older waiter is passed
  EXPECT_EQ(b1.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  a1.acq.release();  // A has room: its oldest waiter is the oldest of all
  EXPECT_EQ(a2.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_TRUE(a3.rec.outcomes.empty());
  EXPECT_TRUE(b2.rec.outcomes.empty());
  b1.acq.release();
  EXPECT_EQ(b2.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  a2.acq.release();
  EXPECT_EQ(a3.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
}

TEST(PerKey, LifoKeyBackBelowItsShareIsServedNewestFirst) {
  auto db = keyed(2, 1, QueueDiscipline::kLifo);
  Request a1(db, "A"), c1(db, "C");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  ASSERT_EQ(c1.start(), Outcome::kGranted);
  Request a2(db, "A"), b1(db, "B"), a3(db, "A"), b2(db, "B");
  for (Request* r : {&a2, &b1, &a3, &b2}) ASSERT_EQ(r->start(), Outcome::kPending);
  c1.acq.release();
  EXPECT_EQ(b2.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  a1.acq.release();  // B at its share now: A's newest
  EXPECT_EQ(a3.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  b2.acq.release();
  EXPECT_EQ(b1.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  EXPECT_TRUE(a2.rec.outcomes.empty());
}

TEST(PerKey, HandoffToAnOlderWaiterLeavesATimeoutATimeout) {
  auto db = keyed(2, 1);
  Request a1(db, "A"), c1(db, "C");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  ASSERT_EQ(c1.start(), Outcome::kGranted);
  Request b1(db, "B"), a2(db, "A"), b2(db, "B");
  for (Request* r : {&b1, &a2, &b2}) ASSERT_EQ(r->start(), Outcome::kPending);
  c1.acq.release();  // to b1, older than a2: a2 was not passed
  ASSERT_EQ(b1.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  a2.acq.expire();
  EXPECT_EQ(a2.rec.outcomes, std::vector<Outcome>{Outcome::kTimeout});
  // Passed by a handoff to a newer waiter: kKeyLimit.
  Request a3(db, "A"), b3(db, "B");
  ASSERT_EQ(a3.start(), Outcome::kPending);
  ASSERT_EQ(b3.start(), Outcome::kPending);
  b1.acq.release();  // to b2, older than a3
  ASSERT_EQ(b2.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  b2.acq.release();  // to b3, newer than a3
  ASSERT_EQ(b3.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  a3.acq.expire();
  EXPECT_EQ(a3.rec.outcomes, std::vector<Outcome>{Outcome::kKeyLimit});
}

TEST(PerKey, LifoHandoffPastANewerWaiterIsKeyLimit) {
  auto db = keyed(2, 1, QueueDiscipline::kLifo);
  Request a1(db, "A"), c1(db, "C");
  ASSERT_EQ(a1.start(), Outcome::kGranted);
  ASSERT_EQ(c1.start(), Outcome::kGranted);
  Request b1(db, "B"), a2(db, "A"), a3(db, "A");
  for (Request* r : {&b1, &a2, &a3}) ASSERT_EQ(r->start(), Outcome::kPending);
  c1.acq.release();  // to b1, past the newer a2 and a3
  ASSERT_EQ(b1.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  a2.acq.expire();
  EXPECT_EQ(a2.rec.outcomes, std::vector<Outcome>{Outcome::kKeyLimit});
  Request b2(db, "B");
  ASSERT_EQ(b2.start(), Outcome::kPending);
  b1.acq.release();  // to b2, the newest: a3 is not passed again, but was
  ASSERT_EQ(b2.rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
  a3.acq.expire();
  EXPECT_EQ(a3.rec.outcomes, std::vector<Outcome>{Outcome::kKeyLimit});
}

// A key with many waiters at its share: the others are served, in order,
// and everything drains with nothing left behind.
TEST(PerKey, FloodingKeyDrainsAndLeavesNothing) {
  for (QueueDiscipline q : {QueueDiscipline::kFifo, QueueDiscipline::kLifo,
                            QueueDiscipline::kAdaptive}) {
    auto db = keyed(3, 1, q);
    std::vector<std::unique_ptr<Request>> flood;
    for (int i = 0; i < 300; ++i) {
      flood.push_back(std::make_unique<Request>(db, "A"));
      flood.back()->start();
    }
    auto b = std::make_unique<Request>(db, "B");
    ASSERT_EQ(b->start(), Outcome::kGranted);
    for (int i = 0; i < 100; ++i) {
      auto next = std::make_unique<Request>(db, "B");
      ASSERT_EQ(next->start(), Outcome::kPending);
      b->acq.release();
      ASSERT_EQ(next->rec.outcomes, std::vector<Outcome>{Outcome::kGranted});
      b = std::move(next);
    }
    b->acq.release();
    EXPECT_EQ(db->in_use(), 1);  // A's first
    // A's waiters are served one at a time, each once the one before is done.
    for (std::size_t served = 0; served < flood.size(); ++served) {
      for (auto& r : flood) {
        if (r->acq.state() == Acquisition::State::kGranted) {
          r->acq.release();
          break;
        }
      }
    }
    for (auto& r : flood) {
      EXPECT_EQ(r->acq.state(), Acquisition::State::kReleased);
    }
    EXPECT_EQ(db->in_use(), 0);
    ResourceStatistics s = db->statistics();
    EXPECT_EQ(s.waiting, 0);
    EXPECT_EQ(s.active_keys, 0);
  }
}

// 10^5 distinct keys pass through a small resource, with a few of them
// holding and a few waiting at any time: the per-key state follows the
// active keys only, and nothing is left once they are gone.
TEST(PerKey, StateIsKeptOnlyForActiveKeys) {
  auto db = keyed(4, 1);
  constexpr int kKeys = 100'000;
  constexpr std::size_t kWindow = 12;  // 4 hold, up to 8 wait
  std::vector<std::unique_ptr<Request>> live;
  std::int64_t most_keys = 0;
  for (int i = 0; i < kKeys; ++i) {
    auto r = std::make_unique<Request>(db, "client-" + std::to_string(i));
    const Outcome o = r->start();
    ASSERT_TRUE(o == Outcome::kGranted || o == Outcome::kPending);
    live.push_back(std::move(r));
    if (live.size() == kWindow) {
      // The oldest is granted (FIFO, one slot per key): it finishes; one in
      // ten of the others gives up.
      live.front()->acq.release();
      live.erase(live.begin());
      if (i % 10 == 0) live.back()->acq.cancel();
    }
    most_keys = std::max(most_keys, db->statistics().active_keys);
  }
  EXPECT_LE(most_keys, static_cast<std::int64_t>(kWindow));
  live.clear();  // releases or cancels the rest
  const ResourceStatistics s = db->statistics();
  EXPECT_EQ(s.active_keys, 0);
  EXPECT_EQ(s.in_use, 0);
  EXPECT_EQ(s.waiting, 0);

  // A burst of many keys waiting at once, all timing out: nothing retained.
  Request holder(db, std::nullopt);
  db->set_limit(1);
  ASSERT_EQ(holder.start(), Outcome::kGranted);
  std::vector<std::unique_ptr<Request>> burst;
  for (int i = 0; i < 10'000; ++i) {
    burst.push_back(std::make_unique<Request>(db, "burst-" + std::to_string(i)));
    ASSERT_EQ(burst.back()->start(), Outcome::kPending);
  }
  EXPECT_EQ(db->statistics().active_keys, 10'000);
  for (auto& r : burst) r->acq.expire();
  EXPECT_EQ(db->statistics().active_keys, 0);
  EXPECT_EQ(db->statistics().rejected(Outcome::kTimeout), 10'000u);
}

// Threads with random keys (some without), random timeouts, cancellations
// through stop tokens and limit changes: no key ever holds more than its
// share, the total never exceeds capacity, and at the end nothing is held,
// queued or remembered.
class PerKeyStress : public ::testing::TestWithParam<QueueDiscipline> {};

TEST_P(PerKeyStress, InvariantsHoldAndNothingLeaks) {
  constexpr std::int64_t kCapacity = 6;
  constexpr std::int64_t kShare = 2;
  constexpr int kKeys = 5;
  constexpr int kThreads = 8;
  constexpr int kIterations = 300;
  auto db = std::make_shared<Resource>(ResourceOptions{
      .name = "db",
      .capacity = kCapacity,
      // Short enough to fill: newcomers below their share then take the
      // places of waiters of keys at theirs.
      .max_waiting = 4,
      .queue = GetParam(),
      .adaptive_target = 1ms,
      .adaptive_interval = 2ms,
      .per_key = kShare});
  Limiter limiter({db}, 5ms);
  auto set = limiter.select({db});

  std::array<std::atomic<std::int64_t>, kKeys> held{};
  std::atomic<std::int64_t> total{0};
  std::atomic<bool> over_share{false}, over_total{false};
  std::atomic<int> granted{0}, key_limited{0};
  std::atomic<bool> stop_limits{false};

  std::thread limits([&] {
    std::mt19937 rng(7);
    while (!stop_limits.load()) {
      db->set_limit(1 + static_cast<std::int64_t>(rng() % kCapacity));
      std::this_thread::sleep_for(std::chrono::microseconds(300));
    }
    db->set_limit(kCapacity);
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t) * 7919u + 1u);
      for (int i = 0; i < kIterations; ++i) {
        // Half the requests are key-0's, which floods; kKeys: no key.
        const int k = rng() % 2 == 0 ? 0 : static_cast<int>(rng() % (kKeys + 1));
        std::optional<std::string> key;
        if (k < kKeys) key = "key-" + std::to_string(k);
        std::stop_source stop;
        std::optional<std::jthread> canceller;
        if (rng() % 4 == 0) {
          canceller.emplace([&stop, delay = rng() % 2000] {
            std::this_thread::sleep_for(std::chrono::microseconds(delay));
            stop.request_stop();
          });
        }
        const auto timeout = std::chrono::microseconds(rng() % 4000);
        Permit p = limiter.acquire_for(set, key, timeout, stop.get_token());
        if (p) {
          ++granted;
          if (total.fetch_add(1) + 1 > kCapacity) over_total = true;
          if (k < kKeys && held[static_cast<std::size_t>(k)].fetch_add(1) + 1 > kShare) {
            over_share = true;
          }
          std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
          if (k < kKeys) held[static_cast<std::size_t>(k)].fetch_sub(1);
          total.fetch_sub(1);
        } else if (p.outcome() == Outcome::kKeyLimit) {
          ++key_limited;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  stop_limits = true;
  limits.join();

  EXPECT_FALSE(over_share);
  EXPECT_FALSE(over_total);
  EXPECT_GT(granted.load(), 0);
  const ResourceStatistics s = db->statistics();
  EXPECT_EQ(s.in_use, 0);
  EXPECT_EQ(s.waiting, 0);
  EXPECT_EQ(s.active_keys, 0);
  EXPECT_EQ(s.rejected(Outcome::kKeyLimit), static_cast<std::uint64_t>(key_limited.load()));
  EXPECT_EQ(s.acquired_total, static_cast<std::uint64_t>(granted.load()));
}

INSTANTIATE_TEST_SUITE_P(Disciplines, PerKeyStress,
                         ::testing::Values(QueueDiscipline::kFifo, QueueDiscipline::kLifo,
                                           QueueDiscipline::kAdaptive),
                         [](const auto& info) { return std::string(to_string(info.param)); });

}  // namespace
}  // namespace concurrency_limiter
