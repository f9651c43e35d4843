// Priority classes (priority.h): grant order per class and queue discipline,
// shedding of the lowest class from a full queue, reserved shares, early
// rejection's count of the waiters ahead, per-class statistics, refusals,
// and a stress test of reserves with timeouts and cancellations.
#include <gtest/gtest.h>

#include <unistd.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

#include "internal/host_segment.h"
#include "internal/test_hooks.h"
#include "test_util.h"

namespace concurrency_limiter {
namespace {

using namespace std::chrono_literals;
using testing::Recorder;
using testing::set_of;

constexpr Priority S = Priority::kSheddable;
constexpr Priority SP = Priority::kSheddablePlus;
constexpr Priority C = Priority::kCritical;
constexpr Priority CP = Priority::kCriticalPlus;

std::array<std::int64_t, kPriorityCount> reserve_of(std::map<Priority, std::int64_t> r) {
  std::array<std::int64_t, kPriorityCount> out{};
  for (const auto& [p, n] : r) out[priority_index(p)] = n;
  return out;
}

std::shared_ptr<Resource> resource(ResourceOptions o) {
  if (o.name.empty()) o.name = "r";
  return Resource::create(std::move(o));
}

// Requests of given classes on one resource, each labelled, with what they
// were told.
struct Requests {
  explicit Requests(std::shared_ptr<Resource> r) : resource(std::move(r)), set(set_of({resource})) {}

  // A request of `priority` started now (callback only if it waits).
  Outcome start(const std::string& label, Priority priority,
                Clock::time_point deadline = Clock::time_point::max()) {
    auto& e = entries[label];
    e.acq = std::make_unique<Acquisition>(set, std::nullopt, priority);
    return e.acq->start(e.rec.callback(), deadline);
  }
  Acquisition& operator[](const std::string& label) { return *entries.at(label).acq; }
  const std::vector<Outcome>& told(const std::string& label) { return entries.at(label).rec.outcomes; }

  // The label of the one request granted by a handoff since the last call
  // (released here so that the next call sees the next grant), or "".
  std::string next_granted() {
    for (auto& [label, e] : entries) {
      if (!e.rec.outcomes.empty() && e.rec.outcomes.back() == Outcome::kGranted &&
          e.acq->state() == Acquisition::State::kGranted) {
        e.acq->release();
        return label;
      }
    }
    return "";
  }
  // Releases `first`, then every request granted in turn: their order.
  std::vector<std::string> service_order(Acquisition& first) {
    std::vector<std::string> order;
    first.release();
    for (std::string l = next_granted(); !l.empty(); l = next_granted()) order.push_back(l);
    return order;
  }

  // A request of the default class that takes a slot now, so that the
  // requests started after it queue (on a resource of capacity 1).
  Acquisition& hold() {
    holder = std::make_unique<Acquisition>(set);
    EXPECT_TRUE(holder->try_acquire());
    return *holder;
  }

  struct Entry {
    std::unique_ptr<Acquisition> acq;
    Recorder rec;
  };
  std::shared_ptr<Resource> resource;
  std::shared_ptr<const ResourceSet> set;
  std::map<std::string, Entry> entries;
  std::unique_ptr<Acquisition> holder;  // see hold()
};

// ---- grant order ----

class PriorityGrantOrder : public ::testing::TestWithParam<QueueDiscipline> {};

TEST_P(PriorityGrantOrder, HighestClassFirstThenTheDisciplineWithinIt) {
  auto r = resource({.capacity = 1, .queue = GetParam(), .adaptive_target = 10s,
                     .adaptive_interval = 10s});
  Requests q(r);
  Acquisition& holder = q.hold();
  for (const auto& [label, p] : std::vector<std::pair<std::string, Priority>>{
           {"s1", S}, {"c1", C}, {"sp1", SP}, {"s2", S}, {"cp1", CP}, {"c2", C}}) {
    ASSERT_EQ(q.start(label, p), Outcome::kPending) << label;
  }
  const std::vector<std::string> expected =
      GetParam() == QueueDiscipline::kLifo
          ? std::vector<std::string>{"cp1", "c2", "c1", "sp1", "s2", "s1"}
          : std::vector<std::string>{"cp1", "c1", "c2", "sp1", "s1", "s2"};
  EXPECT_EQ(q.service_order(holder), expected);
}

INSTANTIATE_TEST_SUITE_P(Disciplines, PriorityGrantOrder,
                         ::testing::Values(QueueDiscipline::kFifo, QueueDiscipline::kLifo,
                                           QueueDiscipline::kAdaptive),
                         [](const auto& info) { return std::string(to_string(info.param)); });

TEST(PriorityGrantOrder, AStandingAdaptiveQueueServesTheNewestOfTheHighestClass) {
  // Target 100 ms, interval 1 s: the oldest waiter (t=0) makes the queue
  // stand from t=1.1 s on; the others (t=0.9 s) are 0.3 s old at t=1.2 s,
  // 0.8 s younger than the 1.1 s past which a waiter is shed (a margin for
  // a busy machine: sleeps only ever make the ages larger).
  auto r = resource({.capacity = 1, .queue = QueueDiscipline::kAdaptive,
                     .adaptive_target = 100ms, .adaptive_interval = 1000ms});
  Requests q(r);
  Acquisition& holder = q.hold();
  ASSERT_EQ(q.start("old", CP), Outcome::kPending);
  std::this_thread::sleep_for(900ms);
  for (const auto& [label, p] : std::vector<std::pair<std::string, Priority>>{
           {"s1", S}, {"c1", C}, {"s2", S}, {"c2", C}}) {
    ASSERT_EQ(q.start(label, p), Outcome::kPending) << label;
  }
  std::this_thread::sleep_for(300ms);
  // The queue stands: newest first within the highest class. The stale
  // waiter is of the highest class, and a class is shed only once every
  // lower one is: it is served first, not shed.
  EXPECT_EQ(q.service_order(holder),
            (std::vector<std::string>{"old", "c2", "c1", "s2", "s1"}));
}

TEST(PriorityGrantOrder, AStandingAdaptiveQueueShedsTheLowestClassFirst) {
  // As above, with the stale waiter of the lowest class: it is shed, and a
  // stale waiter of a higher class is not while it waits.
  auto r = resource({.capacity = 1, .queue = QueueDiscipline::kAdaptive,
                     .adaptive_target = 100ms, .adaptive_interval = 1000ms});
  Requests q(r);
  Acquisition& holder = q.hold();
  ASSERT_EQ(q.start("old-s", S), Outcome::kPending);
  ASSERT_EQ(q.start("old-cp", CP), Outcome::kPending);
  std::this_thread::sleep_for(900ms);
  for (const auto& [label, p] : std::vector<std::pair<std::string, Priority>>{
           {"s1", S}, {"c1", C}}) {
    ASSERT_EQ(q.start(label, p), Outcome::kPending) << label;
  }
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(q.service_order(holder), (std::vector<std::string>{"old-cp", "c1", "s1"}));
  EXPECT_EQ(q.told("old-s"), std::vector<Outcome>{Outcome::kShed});
}

TEST(PriorityGrantOrder, RaisingTheLimitGrantsInClassOrder) {
  auto r = resource({.capacity = 3});
  r->set_limit(1);
  Requests q(r);
  q.hold();
  ASSERT_EQ(q.start("s", S), Outcome::kPending);
  ASSERT_EQ(q.start("c", C), Outcome::kPending);
  ASSERT_EQ(q.start("cp", CP), Outcome::kPending);
  r->set_limit(3);  // two slots: the two highest classes
  EXPECT_EQ(q["cp"].state(), Acquisition::State::kGranted);
  EXPECT_EQ(q["c"].state(), Acquisition::State::kGranted);
  EXPECT_EQ(q["s"].state(), Acquisition::State::kPending);
}

// ---- full queue ----

TEST(PriorityFullQueue, AHigherClassPushesOutTheNewestOfTheLowestClass) {
  auto r = resource({.capacity = 1, .max_waiting = 3});
  Requests q(r);
  Acquisition& holder = q.hold();
  ASSERT_EQ(q.start("s1", S), Outcome::kPending);
  ASSERT_EQ(q.start("s2", S), Outcome::kPending);
  ASSERT_EQ(q.start("sp1", SP), Outcome::kPending);
  // Full. A critical request: the newest sheddable one makes room.
  ASSERT_EQ(q.start("c1", C), Outcome::kPending);
  EXPECT_EQ(q.told("s2"), std::vector<Outcome>{Outcome::kLowerPriority});
  EXPECT_TRUE(q.told("s1").empty());
  // A sheddable newcomer finds no lower class: FIFO turns it away.
  EXPECT_EQ(q.start("s3", S), Outcome::kQueueFull);
  // Sheddable_plus is above the lowest waiting class (sheddable): s1 goes.
  ASSERT_EQ(q.start("sp2", SP), Outcome::kPending);
  EXPECT_EQ(q.told("s1"), std::vector<Outcome>{Outcome::kLowerPriority});
  // Critical_plus: the lowest class is now sheddable_plus, its newest goes.
  ASSERT_EQ(q.start("cp1", CP), Outcome::kPending);
  EXPECT_EQ(q.told("sp2"), std::vector<Outcome>{Outcome::kLowerPriority});
  EXPECT_TRUE(q.told("sp1").empty());
  EXPECT_EQ(r->waiting(), 3);

  const ResourceStatistics s = r->statistics();
  EXPECT_EQ(s.rejected(Outcome::kLowerPriority), 3u);
  EXPECT_EQ(s.classes[priority_index(S)].rejected(Outcome::kLowerPriority), 2u);
  EXPECT_EQ(s.classes[priority_index(S)].rejected(Outcome::kQueueFull), 1u);
  EXPECT_EQ(s.classes[priority_index(SP)].rejected(Outcome::kLowerPriority), 1u);
  EXPECT_EQ(s.classes[priority_index(C)].rejected(Outcome::kLowerPriority), 0u);
  EXPECT_EQ(q.service_order(holder), (std::vector<std::string>{"cp1", "c1", "sp1"}));
}

TEST(PriorityFullQueue, EqualOrLowerClassFollowsTheDisciplinesRule) {
  // FIFO: a newcomer not above the lowest waiting class is turned away.
  {
    auto r = resource({.capacity = 1, .max_waiting = 2});
    Requests q(r);
    q.hold();
    ASSERT_EQ(q.start("c1", C), Outcome::kPending);
    ASSERT_EQ(q.start("cp1", CP), Outcome::kPending);
    EXPECT_EQ(q.start("c2", C), Outcome::kQueueFull);
    EXPECT_EQ(q.start("s1", S), Outcome::kQueueFull);
    EXPECT_TRUE(q.told("c1").empty());
  }
  // LIFO: the oldest waiter of the newcomer's own class makes room; a
  // class with no waiter below the lowest waiting class is turned away.
  {
    auto r = resource({.capacity = 1, .max_waiting = 3, .queue = QueueDiscipline::kLifo});
    Requests q(r);
    Acquisition& holder = q.hold();
    ASSERT_EQ(q.start("c1", C), Outcome::kPending);
    ASSERT_EQ(q.start("cp1", CP), Outcome::kPending);
    ASSERT_EQ(q.start("c2", C), Outcome::kPending);
    ASSERT_EQ(q.start("c3", C), Outcome::kPending);
    EXPECT_EQ(q.told("c1"), std::vector<Outcome>{Outcome::kQueueFull});
    EXPECT_TRUE(q.told("cp1").empty());
    EXPECT_EQ(q.start("s1", S), Outcome::kQueueFull);
    EXPECT_TRUE(q.told("c2").empty());
    const ResourceStatistics s = r->statistics();
    EXPECT_EQ(s.classes[priority_index(C)].rejected(Outcome::kQueueFull), 1u);
    EXPECT_EQ(s.classes[priority_index(S)].rejected(Outcome::kQueueFull), 1u);
    EXPECT_EQ(q.service_order(holder), (std::vector<std::string>{"cp1", "c3", "c2"}));
  }
}

TEST(PriorityFullQueue, TryOnceSaysQueueFullOnlyWhereArrivalWouldBeTurnedAway) {
  auto r = resource({.capacity = 1, .max_waiting = 1});
  Requests q(r);
  q.hold();
  ASSERT_EQ(q.start("c1", C), Outcome::kPending);
  Acquisition lower(q.set, std::nullopt, S), higher(q.set, std::nullopt, CP);
  EXPECT_EQ(lower.try_once(), Outcome::kQueueFull);
  // A higher class would have pushed c1 out: it would have queued.
  EXPECT_EQ(higher.try_once(), Outcome::kTimeout);
  EXPECT_TRUE(q.told("c1").empty());
}

// ---- reserves ----

TEST(PriorityReserve, NeverLentToLowerClasses) {
  auto r = resource({.capacity = 4, .reserve = reserve_of({{CP, 2}})});
  EXPECT_EQ(r->reserve(), reserve_of({{CP, 2}}));
  Requests q(r);
  // The default class (the lock-free calls included) takes 2 slots, no more.
  Permit a = r->try_acquire();
  Permit b = r->try_acquire();
  ASSERT_TRUE(a && b);
  EXPECT_FALSE(r->try_acquire());
  EXPECT_EQ(q.start("c", C), Outcome::kPending);  // two slots free, for cp
  EXPECT_EQ(q.start("s", S), Outcome::kPending);
  EXPECT_EQ(r->in_use(), 2);
  EXPECT_EQ(q.start("cp1", CP), Outcome::kGranted);
  EXPECT_EQ(q.start("cp2", CP), Outcome::kGranted);
  EXPECT_EQ(q.start("cp3", CP), Outcome::kPending);
  // A critical_plus slot freed goes to the waiting critical_plus request;
  // then one freed goes to nobody below it.
  q["cp1"].release();
  EXPECT_EQ(q["cp3"].state(), Acquisition::State::kGranted);
  q["cp2"].release();
  EXPECT_EQ(q["c"].state(), Acquisition::State::kPending);
  EXPECT_EQ(r->in_use(), 3);
  // A critical slot freed goes to the critical request, not to the lower one.
  a.release();
  EXPECT_EQ(q["c"].state(), Acquisition::State::kGranted);
  EXPECT_EQ(q["s"].state(), Acquisition::State::kPending);
}

TEST(PriorityReserve, AClassMayUseEverySlotNotReservedAboveIt) {
  // 6 slots, 1 for critical_plus, 2 for critical (or higher): sheddable
  // classes 3, critical 5, critical_plus all 6.
  const auto reserve = reserve_of({{CP, 1}, {C, 2}});
  for (const auto& [p, most] :
       std::vector<std::pair<Priority, int>>{{S, 3}, {SP, 3}, {C, 5}, {CP, 6}}) {
    auto r = resource({.capacity = 6, .reserve = reserve});
    std::vector<std::unique_ptr<Acquisition>> held;
    for (;;) {
      held.push_back(std::make_unique<Acquisition>(set_of({r}), std::nullopt, p));
      if (!held.back()->try_acquire()) break;
    }
    EXPECT_EQ(r->in_use(), most) << to_string(p);
  }
  // Mixed: what the lower classes hold counts toward the higher ones'.
  auto r = resource({.capacity = 6, .reserve = reserve});
  Requests q(r);
  ASSERT_EQ(q.start("s1", S), Outcome::kGranted);
  ASSERT_EQ(q.start("s2", S), Outcome::kGranted);
  ASSERT_EQ(q.start("sp1", SP), Outcome::kGranted);
  ASSERT_EQ(q.start("c1", C), Outcome::kGranted);
  ASSERT_EQ(q.start("s3", S), Outcome::kPending);  // classes <= sp hold 3
  ASSERT_EQ(q.start("c2", C), Outcome::kGranted);
  ASSERT_EQ(q.start("c3", C), Outcome::kPending);  // classes <= c hold 5
  ASSERT_EQ(q.start("cp1", CP), Outcome::kGranted);
  // A sheddable slot freed: the critical waiter may take it, and comes first.
  q["s1"].release();
  EXPECT_EQ(q["c3"].state(), Acquisition::State::kGranted);
  EXPECT_EQ(q["s3"].state(), Acquisition::State::kPending);
  // The critical_plus slot freed may go to neither lower class: the
  // classes <= c hold their 5.
  q["cp1"].release();
  EXPECT_EQ(q["s3"].state(), Acquisition::State::kPending);
  EXPECT_EQ(r->in_use(), 5);
  // A critical slot freed: sheddable's 3 have room again.
  q["c1"].release();
  EXPECT_EQ(q["s3"].state(), Acquisition::State::kGranted);
}

// Reserves are shares of the capacity: below it (set_limit(), an adaptive
// limit) they shrink in proportion, so a limit at or below the reserves
// does not shut the lower classes out of an idle resource.
TEST(PriorityReserve, ALimitBelowTheCapacityShrinksTheReservesInProportion) {
  auto r = resource({.capacity = 10, .reserve = reserve_of({{CP, 4}})});
  r->set_limit(5);  // the reserve keeps 4 x 5 / 10 = 2: critical and below hold 3
  Requests q(r);
  EXPECT_EQ(q.start("c1", C), Outcome::kGranted);
  EXPECT_EQ(q.start("c2", C), Outcome::kGranted);
  EXPECT_EQ(q.start("c3", C), Outcome::kGranted);
  EXPECT_EQ(q.start("c4", C), Outcome::kPending);
  EXPECT_EQ(q.start("cp1", CP), Outcome::kGranted);
  EXPECT_EQ(q.start("cp2", CP), Outcome::kGranted);
  EXPECT_EQ(q.start("cp3", CP), Outcome::kPending);
  // Raised to the capacity: the whole reserve of 4 (critical and below: 6);
  // the new slots go to critical_plus first, then to critical.
  r->set_limit(10);
  EXPECT_EQ(q["cp3"].state(), Acquisition::State::kGranted);
  EXPECT_EQ(q["c4"].state(), Acquisition::State::kGranted);
  EXPECT_EQ(r->in_use(), 7);
  // Lowered below what is held: nothing revoked; released slots retire.
  // At a limit of 2 the reserve keeps 4 x 2 / 10 = 0.8, rounded up: 1 slot
  // (at most limit - 1: critical keeps one).
  r->set_limit(2);
  EXPECT_EQ(q.start("c5", C), Outcome::kPending);
  for (const char* label : {"c1", "c2", "c3", "c4", "cp1", "cp2"}) q[label].release();
  EXPECT_EQ(q["c5"].state(), Acquisition::State::kGranted);
  EXPECT_EQ(r->in_use(), 2);  // cp3 and c5
  q["cp3"].release();
  EXPECT_EQ(q.start("c6", C), Outcome::kPending);  // the free slot is the reserve's
  EXPECT_EQ(q.start("cp4", CP), Outcome::kGranted);
  // At a limit of 1 the classes below keep their one slot.
  r->set_limit(1);
  q["cp4"].release();
  q["c5"].release();
  EXPECT_EQ(q["c6"].state(), Acquisition::State::kGranted);
}

// A small reserve does not vanish under a lower limit: 4 of 100 keep
// 4 x 20 / 100 = 0.8, rounded up: 1 slot of an adaptive limit of 20.
TEST(PriorityReserve, ASmallReserveKeepsASlotUnderALowerLimit) {
  auto r = resource({.capacity = 100, .reserve = reserve_of({{CP, 4}})});
  r->set_limit(20);
  Requests q(r);
  for (int i = 0; i < 19; ++i) {
    ASSERT_EQ(q.start("s" + std::to_string(i), S), Outcome::kGranted) << i;
  }
  EXPECT_EQ(q.start("s19", S), Outcome::kPending);
  EXPECT_EQ(q.start("cp", CP), Outcome::kGranted);
}

// Reserves that add up to the whole capacity keep the lower classes out at
// any limit: what they were configured for.
TEST(PriorityReserve, ReservesOfTheWholeCapacityKeepTheLowerClassesOut) {
  auto r = resource({.capacity = 4, .reserve = reserve_of({{CP, 4}})});
  r->set_limit(2);
  Requests q(r);
  EXPECT_EQ(q.start("c", C), Outcome::kPending);
  EXPECT_EQ(q.start("cp", CP), Outcome::kGranted);
  EXPECT_EQ(r->in_use(), 1);
}

TEST(PriorityReserve, RejectedWithAClearErrorOutsideItsRange) {
  const auto message = [](ResourceOptions o) -> std::string {
    try {
      Resource r(std::move(o));
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "";
  };
  {
    const std::string m = message({.name = "r", .capacity = 4, .reserve = reserve_of({{C, -1}})});
    EXPECT_NE(m.find("reserve[critical]"), std::string::npos) << m;
    EXPECT_NE(m.find("[0, capacity=4]"), std::string::npos) << m;
  }
  {
    const std::string m = message({.name = "r", .capacity = 4, .reserve = reserve_of({{S, 1}})});
    EXPECT_NE(m.find("reserve[sheddable] must be 0"), std::string::npos) << m;
  }
  {
    const std::string m =
        message({.name = "r", .capacity = 4, .reserve = reserve_of({{C, 3}, {CP, 2}})});
    EXPECT_NE(m.find("reserve must sum to at most capacity=4"), std::string::npos) << m;
  }
  {
    const std::string m =
        message({.name = "r", .capacity = 4, .per_key = 1, .reserve = reserve_of({{CP, 1}})});
    EXPECT_NE(m.find("reserve is not supported with per_key"), std::string::npos) << m;
  }
  EXPECT_EQ(message({.name = "r", .capacity = 4, .reserve = reserve_of({{SP, 1}, {C, 1}, {CP, 2}})}),
            "");
}

// ---- early rejection ----

TEST(PriorityEarlyReject, WaitersAheadAreTheHigherClassesAndInFifoOrderTheOwn) {
  for (const QueueDiscipline d : {QueueDiscipline::kFifo, QueueDiscipline::kLifo}) {
    auto r = resource({.capacity = 1, .queue = d, .early_reject = true});
    {
      // One timed hold of >= 100 ms: the estimate, read back, is exact.
      Acquisition teach(set_of({r}));
      ASSERT_TRUE(teach.try_acquire());
      std::this_thread::sleep_for(100ms);
      teach.release();
    }
    const std::optional<double> estimate = r->statistics().service_seconds;
    ASSERT_TRUE(estimate.has_value());
    const auto times = [&](double n) {
      return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                std::chrono::duration<double>(n * *estimate));
    };
    Requests q(r);
    Acquisition& holder = q.hold();
    ASSERT_EQ(q.start("cp1", CP), Outcome::kPending);
    ASSERT_EQ(q.start("cp2", CP), Outcome::kPending);
    ASSERT_EQ(q.start("c1", C), Outcome::kPending);
    ASSERT_EQ(q.start("c2", C), Outcome::kPending);
    // Ahead of a sheddable request: the 4 above it (2 x the estimate each
    // way would be too little), in either order.
    EXPECT_EQ(q.start("s1", S, times(3.5)), Outcome::kPredictedTimeout) << to_string(d);
    EXPECT_EQ(q.start("s2", S, times(4.5)), Outcome::kPending) << to_string(d);
    // Ahead of a critical_plus request: its own class, in FIFO order only.
    const bool fifo = d == QueueDiscipline::kFifo;
    EXPECT_EQ(q.start("cp3", CP, times(1.5)),
              fifo ? Outcome::kPredictedTimeout : Outcome::kPending)
        << to_string(d);
    // Ahead of a critical one: the critical_plus (FIFO 2, LIFO 3 with cp3),
    // and in FIFO order the 2 critical.
    EXPECT_EQ(q.start("c3", C, times(3.5)),
              fifo ? Outcome::kPredictedTimeout : Outcome::kPending)
        << to_string(d);
    const ResourceStatistics s = r->statistics();
    EXPECT_EQ(s.classes[priority_index(S)].rejected(Outcome::kPredictedTimeout), 1u);
    EXPECT_EQ(s.classes[priority_index(C)].rejected(Outcome::kPredictedTimeout), fifo ? 1u : 0u);
    holder.release();
    for (auto& [label, e] : q.entries) e.acq->cancel();
  }
}

// ---- statistics ----

TEST(PriorityStatistics, CountEachClassAndSumToTheResources) {
  for (const bool reserved : {false, true}) {
    auto r = resource({.capacity = 3,
                       .max_waiting = 2,
                       .reserve = reserved ? reserve_of({{CP, 1}}) : reserve_of({})});
    Requests q(r);
    // Lock-free grants of two classes (without reserves), and a third's.
    q.entries["s"].acq = std::make_unique<Acquisition>(q.set, std::nullopt, S);
    ASSERT_TRUE(q["s"].try_acquire());
    Permit c = r->try_acquire();
    ASSERT_TRUE(c);
    ASSERT_EQ(q.start("cp", CP), Outcome::kGranted);
    ASSERT_EQ(q.start("sp1", SP), Outcome::kPending);
    ASSERT_EQ(q.start("c1", C), Outcome::kPending);
    ASSERT_EQ(q.start("c2", C), Outcome::kPending);  // sp1 pushed out
    EXPECT_EQ(Acquisition(q.set, std::nullopt, S).try_once(), Outcome::kQueueFull);
    q["c1"].cancel();

    ResourceStatistics st = r->statistics();
    const auto& cls = st.classes;
    EXPECT_EQ(cls[priority_index(S)].in_use, 1);
    EXPECT_EQ(cls[priority_index(SP)].in_use, 0);
    EXPECT_EQ(cls[priority_index(C)].in_use, 1);
    EXPECT_EQ(cls[priority_index(CP)].in_use, 1);
    EXPECT_EQ(cls[priority_index(C)].waiting, 1);
    EXPECT_EQ(cls[priority_index(SP)].waiting, 0);
    EXPECT_EQ(cls[priority_index(SP)].rejected(Outcome::kLowerPriority), 1u);
    EXPECT_EQ(cls[priority_index(S)].rejected(Outcome::kQueueFull), 1u);
    EXPECT_EQ(cls[priority_index(C)].rejected(Outcome::kCancelled), 1u);
    EXPECT_EQ(cls[priority_index(CP)].acquired_total, 1u);
    EXPECT_EQ(cls[priority_index(S)].acquired_total, 1u);
    EXPECT_EQ(cls[priority_index(C)].acquired_total, 1u);

    // Released: the waiter of the critical class takes the slot (handoff).
    q["s"].release();
    q["cp"].release();
    st = r->statistics();
    EXPECT_EQ(st.classes[priority_index(S)].in_use, 0);
    EXPECT_EQ(st.classes[priority_index(CP)].in_use, 0);
    EXPECT_EQ(st.classes[priority_index(C)].in_use, 2);
    EXPECT_EQ(st.classes[priority_index(C)].acquired_total, 2u);
    std::int64_t in_use = 0, waiting = 0;
    std::uint64_t acquired = 0, rejected = 0;
    for (const ClassStatistics& k : st.classes) {
      in_use += k.in_use;
      waiting += k.waiting;
      acquired += k.acquired_total;
      for (const std::uint64_t n : k.rejected_total) rejected += n;
    }
    std::uint64_t rejected_all = 0;
    for (const std::uint64_t n : st.rejected_total) rejected_all += n;
    EXPECT_EQ(in_use, st.in_use);
    EXPECT_EQ(waiting, st.waiting);
    EXPECT_EQ(acquired, st.acquired_total);
    EXPECT_EQ(rejected, rejected_all);
  }
}

// ---- refusals ----

TEST(PriorityRefusals, APriorityOtherThanCriticalWhereClassesAreNotKept) {
  const auto keyed = resource({.name = "keyed", .capacity = 2, .per_key = 1});
  const auto plain = resource({.name = "plain", .capacity = 2});
  try {
    Acquisition a(set_of({plain, keyed}), "k", S);
    FAIL() << "a sheddable request on a per-key share was accepted";
  } catch (const std::invalid_argument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("priority 'sheddable'"), std::string::npos) << m;
    EXPECT_NE(m.find("'keyed'"), std::string::npos) << m;
  }
  EXPECT_NO_THROW(Acquisition(set_of({plain, keyed}), "k", C));
  EXPECT_THROW(Acquisition(set_of({plain}), std::nullopt, static_cast<Priority>(7)),
               std::invalid_argument);
  Limiter limiter({plain, keyed}, 1s);
  EXPECT_THROW((void)limiter.acquire(limiter.select({keyed}), std::nullopt, CP),
               std::invalid_argument);

  const std::string name = "t" + std::to_string(::getpid()) + "-priority";
  {
    // Host scope takes every class (host_resource_test.cc, HostPriority).
    const auto host = resource({.name = name, .capacity = 2, .scope = Scope::kHost});
    Acquisition plus(set_of({host}), std::nullopt, CP);
    ASSERT_TRUE(plus.try_acquire());
    Acquisition ok(set_of({host}), std::nullopt, C);
    ASSERT_TRUE(ok.try_acquire());
    EXPECT_EQ(host->in_use(), 2);
  }
  ::unlink(detail::host::segment_path(name).c_str());
}

TEST(PriorityLimiter, BlockingCallsCarryTheClass) {
  auto r = resource({.capacity = 1, .max_waiting = 1});
  Limiter limiter({r}, 10s);
  const auto set = limiter.select({r});
  Permit held = limiter.acquire(set, std::nullopt, S);
  ASSERT_TRUE(held);
  EXPECT_EQ(r->statistics().classes[priority_index(S)].in_use, 1);
  std::thread lower([&] {
    Permit p = limiter.acquire(set, std::nullopt, S);
    EXPECT_EQ(p.outcome(), Outcome::kLowerPriority);
  });
  ASSERT_TRUE(testing::eventually([&] { return r->waiting() == 1; }));
  std::thread higher([&] {
    Permit p = limiter.acquire_for(set, "k", CP, 10s);
    EXPECT_TRUE(p);
  });
  lower.join();
  held.release();
  higher.join();
  EXPECT_EQ(r->statistics().classes[priority_index(CP)].acquired_total, 1u);
}

// ---- stress ----

// Checks the reserve rule at every grant (under the resource's mutex).
std::atomic<int> rule_broken{0};
std::atomic<int> reserved_grants{0};
void check_rule(const Resource& r, const std::array<std::int64_t, kPriorityCount>& held,
                std::int64_t limit) {
  ++reserved_grants;
  std::int64_t up_to = 0;
  for (std::size_t c = 0; c < kPriorityCount; ++c) {
    up_to += held[c];
    std::int64_t above = 0;
    for (std::size_t p = c + 1; p < kPriorityCount; ++p) above += r.reserve()[p];
    if (held[c] < 0 || up_to > limit - above) ++rule_broken;
  }
}

class PriorityStress : public ::testing::TestWithParam<QueueDiscipline> {};

TEST_P(PriorityStress, ReservesHoldAtEveryGrantAndNothingIsLeft) {
  rule_broken = 0;
  reserved_grants = 0;
  testing::set_reserve_grant_hook(&check_rule);
  auto r = resource({.capacity = 4,
                     .max_waiting = 4,
                     .queue = GetParam(),
                     .adaptive_target = 1ms,
                     .adaptive_interval = 2ms,
                     .reserve = reserve_of({{SP, 1}, {C, 1}, {CP, 1}})});
  auto plain = resource({.name = "plain", .capacity = 2, .max_waiting = 3, .queue = GetParam()});
  Limiter limiter({r, plain}, 5ms);  // the timeouts are the calls'; see below
  const std::vector<std::shared_ptr<const ResourceSet>> sets = {
      limiter.select({r}), limiter.select({plain}), limiter.select({r, plain})};
  constexpr int kThreads = 8;
  constexpr int kIterations = 200;
  std::array<std::shared_ptr<std::stop_source>, kThreads> stops;
  std::mutex stops_mu;
  std::atomic<bool> running{true};
  std::atomic<int> granted{0};
  std::thread canceller([&] {
    std::mt19937 rng(11);
    while (running) {
      {
        std::lock_guard lock(stops_mu);
        if (auto& s = stops[rng() % kThreads]) s->request_stop();
      }
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
    }
  });
  std::vector<std::thread> workers;
  for (int t = 0; t < kThreads; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t) + 100);
      for (int i = 0; i < kIterations; ++i) {
        auto stop = std::make_shared<std::stop_source>();
        {
          std::lock_guard lock(stops_mu);
          stops[t] = stop;
        }
        const auto& set = sets[rng() % sets.size()];
        const auto priority = static_cast<Priority>(rng() % kPriorityCount);
        Permit p = limiter.acquire_for(set, std::nullopt, priority,
                                       std::chrono::microseconds(rng() % 4000),
                                       stop->get_token());
        if (p) {
          ++granted;
          std::this_thread::sleep_for(std::chrono::microseconds(rng() % 1000));
        } else {
          EXPECT_TRUE(is_rejection(p.outcome()));
        }
      }
    });
  }
  for (auto& w : workers) w.join();
  running = false;
  canceller.join();
  testing::set_reserve_grant_hook(nullptr);

  EXPECT_GT(granted.load(), 0);
  EXPECT_GT(reserved_grants.load(), 0);
  EXPECT_EQ(rule_broken.load(), 0);
  for (const auto& res : {r, plain}) {
    const ResourceStatistics s = res->statistics();
    EXPECT_EQ(s.in_use, 0) << s.name;
    EXPECT_EQ(s.waiting, 0) << s.name;
    std::uint64_t acquired = 0;
    for (const ClassStatistics& k : s.classes) {
      EXPECT_EQ(k.in_use, 0) << s.name;
      EXPECT_EQ(k.waiting, 0) << s.name;
      acquired += k.acquired_total;
    }
    EXPECT_EQ(acquired, s.acquired_total) << s.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Disciplines, PriorityStress,
                         ::testing::Values(QueueDiscipline::kFifo, QueueDiscipline::kLifo,
                                           QueueDiscipline::kAdaptive),
                         [](const auto& info) { return std::string(to_string(info.param)); });

// An adaptive limit starts below the capacity (AIMD: 20 of 100) and may
// back off to its minimum: reserves shrink with it, so the default class
// still gets a slot of an idle resource, and its grants feed the algorithm.
TEST(PriorityReserve, AnAdaptiveLimitBelowTheReservesStillServesTheOtherClasses) {
  auto started = Resource::create({.name = "api",
                                   .capacity = 100,
                                   .limit_algorithm = std::make_shared<AimdLimit>(),
                                   .reserve = reserve_of({{CP, 30}})});
  ASSERT_EQ(started->limit(), 20);
  auto backed_off = Resource::create(
      {.name = "api2",
       .capacity = 10,
       .limit_algorithm =
           std::make_shared<AimdLimit>(AimdOptions{.min_limit = 1, .initial_limit = 1}),
       .reserve = reserve_of({{CP, 2}})});
  for (const auto& r : {started, backed_off}) {
    Limiter limiter({r}, 2s);
    const auto set = limiter.select({r});
    for (int i = 0; i < 3; ++i) {
      Permit p = limiter.acquire(set);  // critical; an idle resource
      EXPECT_TRUE(p) << r->name() << " at limit " << r->limit() << ": "
                     << to_string(p.outcome());
    }
  }
}

// Without reserves the default class's share is derived (the resource's
// counts less the other classes'): while only sheddable requests run, its
// acquired_total stays 0 at every snapshot and never goes down (a
// Prometheus counter); its in_use (a gauge) may show a sheddable hold for
// the moment of a whole grant and release between two reads, rarely.
TEST(PriorityStatistics, TheDefaultClassCountsNoOtherClasssGrants) {
  auto r = Resource::create({.name = "r", .capacity = 2});
  const auto set = set_of({r});
  std::atomic<bool> stop{false};
  std::vector<std::thread> workers;
  for (int t = 0; t < 2; ++t) {
    workers.emplace_back([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        Acquisition a(set, std::nullopt, S);
        if (a.try_acquire()) a.release();
      }
    });
  }
  int phantom_in_use = 0, phantom_acquired = 0, went_down = 0, reads = 0;
  std::uint64_t sheddable_last = 0;
  std::uint64_t last = 0;
  const auto until = Clock::now() + 500ms;
  while (Clock::now() < until) {
    const ResourceStatistics s = r->statistics();
    const ClassStatistics& c = s.classes[priority_index(C)];
    ++reads;
    if (c.in_use != 0) ++phantom_in_use;
    if (c.acquired_total != 0) ++phantom_acquired;
    if (c.acquired_total < last) ++went_down;
    last = c.acquired_total;
    const std::uint64_t sheddable = s.classes[priority_index(S)].acquired_total;
    if (sheddable < sheddable_last) ++went_down;
    sheddable_last = sheddable;
  }
  stop = true;
  for (auto& w : workers) w.join();
  EXPECT_EQ(phantom_acquired, 0) << "of " << reads << " snapshots";
  std::printf("default class showing a sheddable hold: %d of %d snapshots\n", phantom_in_use,
              reads);
  EXPECT_EQ(went_down, 0) << "of " << reads << " snapshots";
  const ResourceStatistics s = r->statistics();
  EXPECT_EQ(s.classes[priority_index(S)].acquired_total, s.acquired_total);
}

// The waiters of the higher classes are served by every slot, reserves
// included: 10 critical_plus waiters on 10 slots are one service time ahead
// of a critical newcomer, whatever the 8 slots reserved for them.
TEST(PriorityEarlyReject, HigherClassesWaitersShareEverySlot) {
  auto r = Resource::create(
      {.name = "r", .capacity = 10, .early_reject = true, .reserve = reserve_of({{CP, 8}})});
  const auto set = set_of({r});
  {
    Acquisition teach(set, std::nullopt, CP);
    ASSERT_TRUE(teach.try_acquire());
    std::this_thread::sleep_for(50ms);
    teach.release();
  }
  const double estimate = r->statistics().service_seconds.value_or(0.0);
  ASSERT_GT(estimate, 0.0);
  std::vector<std::unique_ptr<Acquisition>> holders, waiters;
  for (int i = 0; i < 10; ++i) {
    holders.push_back(std::make_unique<Acquisition>(set, std::nullopt, CP));
    ASSERT_TRUE(holders.back()->try_acquire());
  }
  for (int i = 0; i < 10; ++i) {
    waiters.push_back(std::make_unique<Acquisition>(set, std::nullopt, CP));
    ASSERT_EQ(waiters.back()->start([](Outcome) {}, Clock::time_point::max()),
              Outcome::kPending);
  }
  Acquisition critical(set, std::nullopt, C);
  const auto patience = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(3.0 * estimate));
  EXPECT_EQ(critical.start([](Outcome) {}, Clock::now() + patience), Outcome::kPending);
  critical.cancel();
}

// A class below a reserve is served by the slots it may use, not the whole
// limit: capacity 4 with 3 kept for critical_plus leaves critical 1; with it
// held and 2 critical waiting, a critical request with 1.5 service times
// to spare is refused at once (it would wait about 2 to 3).
TEST(PriorityEarlyReject, WaitersAheadShareOnlyTheSlotsTheClassMayUse) {
  auto r = Resource::create(
      {.name = "r", .capacity = 4, .early_reject = true, .reserve = reserve_of({{CP, 3}})});
  const auto set = set_of({r});
  {
    Acquisition teach(set, std::nullopt, CP);
    ASSERT_TRUE(teach.try_acquire());
    std::this_thread::sleep_for(100ms);
    teach.release();
  }
  const std::optional<double> estimate = r->statistics().service_seconds;
  ASSERT_TRUE(estimate.has_value());
  const auto in = [&](double n) {
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                              std::chrono::duration<double>(n * *estimate));
  };
  Acquisition holder(set, std::nullopt, C);
  ASSERT_TRUE(holder.try_acquire());
  Acquisition w1(set, std::nullopt, C), w2(set, std::nullopt, C), late(set, std::nullopt, C);
  ASSERT_EQ(w1.start([](Outcome) {}, Clock::time_point::max()), Outcome::kPending);
  ASSERT_EQ(w2.start([](Outcome) {}, Clock::time_point::max()), Outcome::kPending);
  EXPECT_EQ(late.start([](Outcome) {}, in(1.5)), Outcome::kPredictedTimeout);
  // critical_plus may use all 4 slots: 2 ahead share 3 free ones.
  Acquisition top(set, std::nullopt, CP);
  EXPECT_EQ(top.start([](Outcome) {}, in(1.5)), Outcome::kGranted);
}

}  // namespace
}  // namespace concurrency_limiter
