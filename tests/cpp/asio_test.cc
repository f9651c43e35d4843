// async_acquire(): completion tokens, executors, timeout, cancellation and
// io_context destruction.
#include "concurrency_limiter/asio.h"

#include <gtest/gtest.h>

#include <asio/bind_allocator.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>
#include <atomic>
#include <chrono>
#include <optional>
#include <random>
#include <thread>
#include <variant>
#include <vector>

#include "test_util.h"

namespace concurrency_limiter {
namespace {

using namespace std::chrono_literals;
using testing::eventually;
using testing::make_resource;

struct Fixture {
  std::shared_ptr<Resource> db = make_resource("db", 1);
  Limiter limiter{{db}, 5s};
  std::shared_ptr<const ResourceSet> needs_db = limiter.select({db});
};

// What a handler saw.
struct Result {
  std::optional<std::error_code> ec;
  Permit permit;
  std::thread::id thread;
};

auto record(Result& r) {
  return [&r](std::error_code ec, Permit p) {
    r.ec = ec;
    r.permit = std::move(p);
    r.thread = std::this_thread::get_id();
  };
}

TEST(AsioErrors, ConditionsAndMessagesNameTheResource) {
  const std::error_code ec(static_cast<int>(Outcome::kTimeout), resource_category("db"));
  EXPECT_TRUE(ec == Outcome::kTimeout);
  EXPECT_FALSE(ec == Outcome::kQueueFull);
  EXPECT_TRUE(ec == std::errc::timed_out);
  EXPECT_EQ(ec.message(), "timed out waiting for resource 'db'");
  EXPECT_STREQ(ec.category().name(), "concurrency_limiter");
  const std::error_code cancelled(static_cast<int>(Outcome::kCancelled),
                                  resource_category("file"));
  EXPECT_TRUE(cancelled == std::errc::operation_canceled);
  EXPECT_TRUE(cancelled == Outcome::kCancelled);
  EXPECT_EQ(cancelled.message(), "cancelled while waiting for resource 'file'");
  EXPECT_EQ(&resource_category("db"), &resource_category("db"));
  EXPECT_EQ(std::error_code(static_cast<int>(Outcome::kShed), resource_category("x")).message(),
            "shed from the queue of resource 'x'");
}

TEST(AsyncAcquire, FreeSlotCompletesThroughTheExecutorNeverInline) {
  Fixture f;
  asio::io_context io;
  Result r;
  async_acquire(io, f.limiter, f.needs_db, 1s, record(r));
  EXPECT_FALSE(r.ec.has_value()) << "called inline";
  EXPECT_EQ(f.db->in_use(), 1);  // taken at once, delivered later
  io.run();
  ASSERT_TRUE(r.ec.has_value());
  EXPECT_FALSE(*r.ec);
  EXPECT_TRUE(r.permit);
  EXPECT_EQ(r.thread, std::this_thread::get_id());
  r.permit.release();
  EXPECT_EQ(f.db->in_use(), 0);
}

TEST(AsyncAcquire, HandoffFromAForeignThreadCompletesOnTheIoThread) {
  Fixture f;
  Permit held = f.limiter.try_acquire(f.needs_db);
  ASSERT_TRUE(held);
  asio::io_context io;
  Result r;
  async_acquire(io, f.limiter, f.needs_db, 5s, record(r));
  EXPECT_EQ(f.db->waiting(), 1);
  std::thread io_thread([&] { io.run(); });  // kept alive by the pending operation
  std::thread releaser([&] { held.release(); });
  const auto releaser_id = releaser.get_id();
  releaser.join();
  const auto io_id = io_thread.get_id();
  io_thread.join();
  ASSERT_TRUE(r.ec.has_value());
  EXPECT_FALSE(*r.ec);
  EXPECT_TRUE(r.permit);
  EXPECT_EQ(r.thread, io_id);
  EXPECT_NE(r.thread, releaser_id);
}

TEST(AsyncAcquire, CompletesOnTheHandlersStrandInASecondContext) {
  Fixture f;
  Permit held = f.limiter.try_acquire(f.needs_db);
  asio::io_context io1, io2;
  auto strand = asio::make_strand(io2);
  Result r;
  bool on_strand = false;
  async_acquire(io1, f.limiter, f.needs_db, 5s,
                asio::bind_executor(strand, [&](std::error_code ec, Permit p) {
                  on_strand = strand.running_in_this_thread();
                  record(r)(ec, std::move(p));
                }));
  held.release();
  EXPECT_EQ(io1.run(), 0u);  // nothing of it runs on io1
  EXPECT_FALSE(r.ec.has_value());
  io2.run();
  ASSERT_TRUE(r.ec.has_value());
  EXPECT_FALSE(*r.ec);
  EXPECT_TRUE(on_strand);
}

TEST(AsyncAcquire, TimeoutLeavesTheQueueAndNamesTheResource) {
  Fixture f;
  Permit held = f.limiter.try_acquire(f.needs_db);
  asio::io_context io;
  Result r;
  const auto started = Clock::now();
  async_acquire(io, f.limiter, f.needs_db, 30ms, record(r));
  io.run();
  EXPECT_GE(Clock::now() - started, 30ms);
  ASSERT_TRUE(r.ec.has_value());
  EXPECT_TRUE(*r.ec == Outcome::kTimeout);
  EXPECT_EQ(r.ec->message(), "timed out waiting for resource 'db'");
  EXPECT_FALSE(r.permit);
  EXPECT_EQ(r.permit.outcome(), Outcome::kTimeout);
  EXPECT_EQ(r.permit.refused_by_name(), "db");
  EXPECT_EQ(f.db->waiting(), 0);
  EXPECT_EQ(f.db->statistics().rejected(Outcome::kTimeout), 1u);
}

TEST(AsyncAcquire, KeyAtItsShareCompletesWithKeyLimitWhileOtherKeysGetIn) {
  auto db = std::make_shared<Resource>(
      ResourceOptions{.name = "db", .capacity = 3, .per_key = 1});
  Limiter limiter({db}, 5s);
  auto needs_db = limiter.select({db});
  asio::io_context io;
  Result first, second, other;
  async_acquire(io, limiter, needs_db, std::optional<std::string>("a"), 5s, record(first));
  async_acquire(io, limiter, needs_db, std::optional<std::string>("a"), 20ms, record(second));
  async_acquire(io, limiter, needs_db, std::optional<std::string>("b"), 5s, record(other));
  io.run();
  EXPECT_TRUE(first.permit);
  EXPECT_TRUE(other.permit);
  ASSERT_TRUE(second.ec.has_value());
  EXPECT_TRUE(*second.ec == Outcome::kKeyLimit);
  EXPECT_TRUE(*second.ec == std::errc::timed_out);
  EXPECT_EQ(second.ec->message(), "key at its per-key share of resource 'db'");
  first.permit.release();
  other.permit.release();
  EXPECT_EQ(db->statistics().active_keys, 0);
}

TEST(AsyncAcquire, ZeroTimeoutTriesOnce) {
  Fixture f;
  asio::io_context io;
  Result free_slot, busy;
  async_acquire(io, f.limiter, f.needs_db, 0s, record(free_slot));
  async_acquire(io, f.limiter, f.needs_db, 0s, record(busy));
  io.run();
  EXPECT_TRUE(free_slot.permit);
  EXPECT_TRUE(*busy.ec == Outcome::kTimeout);
}

TEST(AsyncAcquire, QueueFullIsReportedAtOnceThroughTheExecutor) {
  auto db = make_resource("db", 1, /*max_waiting=*/0);
  Limiter limiter({db}, 5s);
  auto set = limiter.select({db});
  Permit held = limiter.try_acquire(set);
  asio::io_context io;
  Result r;
  async_acquire(io, limiter, set, 5s, record(r));
  EXPECT_FALSE(r.ec.has_value());
  io.run();
  EXPECT_TRUE(*r.ec == Outcome::kQueueFull);
  EXPECT_EQ(r.ec->message(), "queue full for resource 'db'");
}

// async_acquire tells the resource its deadline: an early-rejecting
// resource with a long queue refuses at once (through the executor), not at
// the timeout, and the refused request leaves nothing held or queued.
TEST(AsyncAcquire, PredictedTimeoutIsReportedAtOnceThroughTheExecutor) {
  auto db = Resource::create(ResourceOptions{.name = "db", .capacity = 1, .early_reject = true});
  Limiter limiter({db}, 5s);
  auto set = limiter.select({db});
  {
    Permit first = limiter.try_acquire(set);  // a first timed hold: the estimate
    ASSERT_TRUE(first);
    std::this_thread::sleep_for(200ms);
  }
  Permit held = limiter.try_acquire(set);
  ASSERT_TRUE(held);
  asio::io_context io;
  int served = 0;
  for (int i = 0; i < 10; ++i) {  // predicted wait >= 10 x 200 ms = 2 s
    async_acquire(io, limiter, set, 30s, [&served](std::error_code ec, Permit) {
      if (!ec) ++served;  // and gives the slot back at once
    });
  }
  Result r;
  async_acquire(io, limiter, set, 1s, record(r));
  EXPECT_FALSE(r.ec.has_value());
  io.run_one();  // only the refusal is ready: the others wait for `held`
  ASSERT_TRUE(r.ec.has_value());
  EXPECT_TRUE(*r.ec == Outcome::kPredictedTimeout) << r.ec->message();
  // The empty Permit says how long the wait would have been: 10 ahead.
  ASSERT_TRUE(r.permit.predicted_wait().has_value());
  EXPECT_DOUBLE_EQ(*r.permit.predicted_wait(), 10.0 * *db->statistics().service_seconds);
  EXPECT_EQ(db->waiting(), 10);
  EXPECT_EQ(db->statistics().rejected(Outcome::kPredictedTimeout), 1u);
  EXPECT_EQ(db->statistics().rejected(Outcome::kTimeout), 0u);
  held = Permit();
  io.run();  // the 10 are served one after the other
  EXPECT_EQ(served, 10);
  EXPECT_EQ(db->in_use(), 0);
  EXPECT_EQ(db->waiting(), 0);
}

// The priority overloads: a freed slot goes to the highest class waiting
// (the coroutine form, without an I/O executor, too), and a class other
// than the default where classes are not kept is refused at the call.
TEST(AsyncAcquire, PriorityOverloadsServeTheHighestClassFirst) {
  Fixture f;
  Permit held = f.limiter.try_acquire(f.needs_db);
  ASSERT_TRUE(held);
  asio::io_context io;
  std::vector<std::string> order;
  auto note = [&order](std::string name) {
    return [&order, name](std::error_code ec, Permit) {
      if (!ec) order.push_back(name);  // and the slot goes back at once
    };
  };
  async_acquire(io, f.limiter, f.needs_db, std::nullopt, Priority::kSheddable, 5s,
                note("sheddable"));
  async_acquire(io, f.limiter, f.needs_db, std::nullopt, Priority::kCritical, 5s,
                note("critical"));
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        auto [ec, p] = co_await async_acquire(f.limiter, f.needs_db, std::nullopt,
                                              Priority::kCriticalPlus, 5s,
                                              asio::experimental::as_tuple(asio::use_awaitable));
        if (!ec) order.push_back("critical_plus");
      },
      asio::detached);
  io.poll();  // all three queued
  EXPECT_EQ(f.db->waiting(), 3);
  held = Permit();
  io.run();
  EXPECT_EQ(order, (std::vector<std::string>{"critical_plus", "critical", "sheddable"}));

  auto keyed = Resource::create(ResourceOptions{.name = "keyed", .capacity = 2, .per_key = 1});
  Limiter limiter({keyed}, 5s);
  EXPECT_THROW(async_acquire(io, limiter, limiter.select({keyed}), std::nullopt,
                             Priority::kSheddable, 5s, [](std::error_code, Permit) {}),
               std::invalid_argument);
  EXPECT_EQ(keyed->waiting(), 0);
  // A lazy token: the refusal comes at the call, not when the operation is
  // launched or awaited.
  EXPECT_THROW(static_cast<void>(async_acquire(io, limiter, limiter.select({keyed}),
                                               std::nullopt, Priority::kSheddable, 5s,
                                               asio::experimental::deferred)),
               std::invalid_argument);
  bool thrown_at_call = false;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        std::optional<asio::awaitable<Permit>> op;
        try {
          op.emplace(async_acquire(limiter, limiter.select({keyed}), std::nullopt,
                                   Priority::kSheddable, 5s, asio::use_awaitable));
        } catch (const std::invalid_argument&) {
          thrown_at_call = true;
          co_return;
        }
        static_cast<void>(co_await std::move(*op));  // not reached
      },
      asio::detached);
  io.restart();
  io.run();
  EXPECT_TRUE(thrown_at_call);
  EXPECT_EQ(keyed->waiting(), 0);
}

TEST(AsyncAcquire, CancellationSlotEndsTheWait) {
  Fixture f;
  Permit held = f.limiter.try_acquire(f.needs_db);
  asio::io_context io;
  asio::cancellation_signal signal;
  Result r;
  async_acquire(io, f.limiter, f.needs_db, 5s,
                asio::bind_cancellation_slot(signal.slot(), record(r)));
  EXPECT_EQ(f.db->waiting(), 1);
  io.poll();
  signal.emit(asio::cancellation_type::terminal);
  io.run();
  ASSERT_TRUE(r.ec.has_value());
  EXPECT_TRUE(*r.ec == Outcome::kCancelled);
  EXPECT_TRUE(*r.ec == std::errc::operation_canceled);
  EXPECT_FALSE(r.permit);
  EXPECT_EQ(f.db->waiting(), 0);
  // The slot was cleared for reuse: a later emit reaches nothing.
  signal.emit(asio::cancellation_type::terminal);
  held.release();
  EXPECT_EQ(f.db->in_use(), 0);
}

TEST(AsyncAcquire, CancelAfterTheGrantKeepsThePermit) {
  Fixture f;
  Permit held = f.limiter.try_acquire(f.needs_db);
  asio::io_context io;
  asio::cancellation_signal signal;
  Result r;
  async_acquire(io, f.limiter, f.needs_db, 5s,
                asio::bind_cancellation_slot(signal.slot(), record(r)));
  held.release();  // granted; its completion is posted
  signal.emit(asio::cancellation_type::terminal);  // too late: the grant won
  io.run();
  EXPECT_FALSE(*r.ec);
  EXPECT_TRUE(r.permit);
  EXPECT_EQ(f.db->in_use(), 1);
}

TEST(AsyncAcquire, Coroutine) {
  Fixture f;
  asio::io_context io;
  bool done = false;
  asio::co_spawn(io, [&]() -> asio::awaitable<void> {
    {
      Permit p = co_await async_acquire(f.limiter, f.needs_db, 1s, asio::use_awaitable);
      EXPECT_TRUE(p);
      EXPECT_EQ(f.db->in_use(), 1);
      // A rejection throws std::system_error with the error code.
      try {
        co_await async_acquire(f.limiter, f.needs_db, 10ms, asio::use_awaitable);
        ADD_FAILURE() << "expected a timeout";
      } catch (const std::system_error& e) {
        EXPECT_TRUE(e.code() == Outcome::kTimeout);
      }
      // Or without exceptions.
      auto [ec, q] = co_await async_acquire(
          f.limiter, f.needs_db, 10ms, asio::experimental::as_tuple(asio::use_awaitable));
      EXPECT_TRUE(ec == Outcome::kTimeout);
      EXPECT_FALSE(q);
    }
    EXPECT_EQ(f.db->in_use(), 0);
    done = true;
  }, asio::detached);
  io.run();
  EXPECT_TRUE(done);
}

TEST(AsyncAcquire, CoroutineRacesATimerWithAwaitableOperators) {
  using namespace asio::experimental::awaitable_operators;
  Fixture f;
  Permit held = f.limiter.try_acquire(f.needs_db);
  asio::io_context io;
  bool timer_won = false, acquired = false;
  asio::co_spawn(io, [&]() -> asio::awaitable<void> {
    asio::steady_timer timer(co_await asio::this_coro::executor, 20ms);
    auto first = co_await (async_acquire(f.limiter, f.needs_db, 10s, asio::use_awaitable) ||
                           timer.async_wait(asio::use_awaitable));
    timer_won = first.index() == 1;
    EXPECT_EQ(f.db->waiting(), 0);  // the loser left the queue
    held.release();
    timer.expires_after(10s);
    auto second = co_await (async_acquire(f.limiter, f.needs_db, 10s, asio::use_awaitable) ||
                            timer.async_wait(asio::use_awaitable));
    acquired = second.index() == 0 && std::get<0>(second);
  }, asio::detached);
  io.run();
  EXPECT_TRUE(timer_won);
  EXPECT_TRUE(acquired);
  EXPECT_EQ(f.db->in_use(), 0);
  EXPECT_EQ(f.db->waiting(), 0);
}

TEST(AsyncAcquire, DeferredAndFuture) {
  Fixture f;
  asio::io_context io;
  auto op = async_acquire(io, f.limiter, f.needs_db, 1s, asio::experimental::deferred);
  EXPECT_EQ(f.db->in_use(), 0);  // nothing happens until it is launched
  Result r;
  std::move(op)(record(r));
  io.run();
  EXPECT_TRUE(r.permit);
  r.permit.release();

  io.restart();
  std::thread io_thread;
  {
    auto work = asio::make_work_guard(io);
    io_thread = std::thread([&] { io.run(); });
    std::future<Permit> granted = async_acquire(io, f.limiter, f.needs_db, 1s, asio::use_future);
    Permit p = granted.get();
    EXPECT_TRUE(p);
    // A rejection makes get() throw std::system_error, as any Asio
    // operation's future does. Not exercised here: the exception object is
    // shared with the system executor's thread through libstdc++'s
    // uninstrumented reference count, which TSan reports as a race.
  }
  io_thread.join();
}

TEST(AsyncAcquire, MultiResourceTakesEverySlotOrNone) {
  auto db = make_resource("db", 1);
  auto file = make_resource("file", 1);
  Limiter limiter({db, file}, 5s);
  auto both = limiter.select({db, file});
  Permit file_held = limiter.try_acquire(limiter.select({file}));
  asio::io_context io;
  Result r;
  async_acquire(io, limiter, both, 20ms, record(r));
  io.run();
  EXPECT_TRUE(*r.ec == Outcome::kTimeout);
  EXPECT_EQ(r.permit.refused_by_name(), "file");
  EXPECT_EQ(db->in_use(), 0);  // held while waiting for file, released on timeout
}

// Destroys a handler's captures exactly once whether it runs or not.
struct Tracker {
  std::shared_ptr<std::atomic<int>> alive;
  explicit Tracker(std::shared_ptr<std::atomic<int>> a) : alive(std::move(a)) { ++*alive; }
  Tracker(const Tracker& o) : alive(o.alive) { ++*alive; }
  ~Tracker() { --*alive; }
};

TEST(AsyncAcquire, DestroyingTheIoContextEndsPendingOperations) {
  auto db = make_resource("db", 2);
  Limiter limiter({db}, 5s);
  auto set = limiter.select({db});
  auto alive = std::make_shared<std::atomic<int>>(0);
  std::atomic<int> called{0};
  Permit held = limiter.try_acquire(set);
  Permit held2 = limiter.try_acquire(set);
  {
    asio::io_context io;
    for (int i = 0; i < 5; ++i) {
      async_acquire(io, limiter, set, 10s,
                    [t = Tracker(alive), &called](std::error_code, Permit) { ++called; });
    }
    // A coroutine waiting too, and one with no deadline.
    asio::co_spawn(io, [&, t = Tracker(alive)]() -> asio::awaitable<void> {
      Permit p = co_await async_acquire(limiter, set, Clock::duration::max(), asio::use_awaitable);
      ++called;
    }, asio::detached);
    io.poll();
    EXPECT_EQ(db->waiting(), 6);
    held2.release();  // granted to the first waiter; its completion never runs
    EXPECT_EQ(db->in_use(), 2);
  }
  EXPECT_EQ(called, 0);
  EXPECT_EQ(*alive, 0);  // every handler destroyed
  EXPECT_EQ(db->waiting(), 0);
  EXPECT_EQ(db->in_use(), 1);  // only `held`: the posted grant was released
  held.release();
  EXPECT_EQ(db->in_use(), 0);
}

TEST(AsyncAcquire, DestroyingTheIoContextWhileAnotherThreadReleases) {
  auto db = make_resource("db", 1);
  Limiter limiter({db}, 5s);
  auto set = limiter.select({db});
  for (int round = 0; round < 50; ++round) {
    Permit held = limiter.try_acquire(set);
    auto io = std::make_unique<asio::io_context>();
    for (int i = 0; i < 4; ++i) {
      async_acquire(*io, limiter, set, 10s, [](std::error_code, Permit) {});
    }
    std::thread releaser([&] { held.release(); });
    io.reset();
    releaser.join();
    EXPECT_EQ(db->waiting(), 0);
    EXPECT_EQ(db->in_use(), 0);
  }
}

TEST(AsyncAcquireStress, RandomCancelsTimeoutsAndReleasesLoseNoSlot) {
  auto db = make_resource("db", 3);
  auto file = make_resource("file", 2);
  Limiter limiter({db, file}, 5s);
  const std::vector<std::shared_ptr<const ResourceSet>> sets = {
      limiter.select({db}), limiter.select({file}), limiter.select({db, file})};
  asio::io_context io;
  constexpr int kTasks = 2000;
  std::atomic<int> completed{0}, granted{0};
  std::vector<Permit> to_release_elsewhere;
  std::mutex elsewhere_mu;
  for (int i = 0; i < kTasks; ++i) {
    // A strand per coroutine: `||` then emits its cancellation on the same
    // strand as the operation completes, as Asio requires.
    asio::co_spawn(asio::make_strand(io), [&, i]() -> asio::awaitable<void> {
      using namespace asio::experimental::awaitable_operators;
      std::minstd_rand rng(i);
      auto ex = co_await asio::this_coro::executor;
      const auto& set = sets[rng() % sets.size()];
      asio::steady_timer cancel_timer(ex, std::chrono::microseconds(rng() % 3000));
      auto timeout = std::chrono::microseconds(rng() % 4000);
      auto r = co_await (async_acquire(limiter, set, timeout,
                                       asio::experimental::as_tuple(asio::use_awaitable)) ||
                         cancel_timer.async_wait(asio::use_awaitable));
      if (r.index() == 0) {
        auto& [ec, permit] = std::get<0>(r);
        if (permit) {
          ++granted;
          asio::steady_timer hold(ex, std::chrono::microseconds(rng() % 500));
          co_await hold.async_wait(asio::use_awaitable);
          if (rng() % 2) {  // released by another thread
            std::lock_guard lock(elsewhere_mu);
            to_release_elsewhere.push_back(std::move(permit));
          }
        } else {
          EXPECT_TRUE(is_rejection(permit.outcome()));
        }
      }
      ++completed;
    }, asio::detached);
  }
  std::atomic<bool> stop{false};
  std::thread releaser([&] {
    while (!stop) {
      std::vector<Permit> batch;
      {
        std::lock_guard lock(elsewhere_mu);
        batch.swap(to_release_elsewhere);
      }
      batch.clear();
      std::this_thread::yield();
    }
  });
  std::thread second([&] { io.run(); });
  io.run();
  second.join();
  stop = true;
  releaser.join();
  to_release_elsewhere.clear();
  EXPECT_EQ(completed, kTasks);
  EXPECT_GT(granted, 0);
  EXPECT_EQ(db->in_use(), 0);
  EXPECT_EQ(file->in_use(), 0);
  EXPECT_EQ(db->waiting(), 0);
  EXPECT_EQ(file->waiting(), 0);
  EXPECT_LE(db->statistics().peak_in_use, 3);
  EXPECT_LE(file->statistics().peak_in_use, 2);
}

// --- Lifetimes, zero timeouts and Asio conventions (issue 20) ---------------

TEST(AsyncAcquireLifetime, AnErrorNamesAResourceOnlyTheRequestStillOwned) {
  // A live reconfiguration drops the old limiter while a request waits on it.
  auto db = make_resource("db", 1);
  auto limiter = std::make_unique<Limiter>(std::vector{db}, 5s);
  auto set = limiter->select({db});
  Permit held = limiter->try_acquire(set);
  asio::io_context io;
  Result r;
  async_acquire(io, *limiter, set, 1ms, record(r));
  limiter.reset();
  set.reset();
  db.reset();
  io.run();
  ASSERT_TRUE(r.ec.has_value());
  EXPECT_EQ(r.ec->message(), "timed out waiting for resource 'db'");
  held.release();
}

TEST(AsyncAcquire, ClosingTheLimiterCompletesWaitersWithUnavailable) {
  Fixture f;
  Permit held = f.limiter.try_acquire(f.needs_db);
  asio::io_context io;
  Result waiting, later;
  async_acquire(io, f.limiter, f.needs_db, 5s, record(waiting));
  io.poll();
  f.limiter.close();
  async_acquire(io, f.limiter, f.needs_db, 5s, record(later));
  io.run();
  ASSERT_TRUE(waiting.ec.has_value() && later.ec.has_value());
  EXPECT_TRUE(*waiting.ec == Outcome::kUnavailable);
  EXPECT_TRUE(*later.ec == Outcome::kUnavailable);
  EXPECT_EQ(waiting.ec->message(),
            "resource 'db' unavailable (closed, or its shared state out of reach)");
  EXPECT_TRUE(held);
}

TEST(AsyncAcquire, ZeroTimeoutNeverTakesASlotReleasedAfterTheCall) {
  Fixture f;
  Permit held = f.limiter.try_acquire(f.needs_db);
  asio::io_context io;
  Result r;
  async_acquire(io, f.limiter, f.needs_db, 0s, record(r));
  EXPECT_EQ(f.db->waiting(), 0);
  held.release();  // after the call, before its completion runs
  io.run();
  ASSERT_TRUE(r.ec.has_value());
  EXPECT_TRUE(*r.ec == Outcome::kTimeout);
  EXPECT_EQ(r.ec->message(), "timed out waiting for resource 'db'");
  EXPECT_EQ(f.db->in_use(), 0);
}

TEST(AsyncAcquire, ZeroTimeoutNeverPushesAWaiterOutOfAFullLifoQueue) {
  auto db = make_resource("db", 1, /*max_waiting=*/1, QueueDiscipline::kLifo);
  Limiter limiter({db}, 10s);
  auto set = limiter.select({db});
  Permit held = limiter.try_acquire(set);
  asio::io_context io;
  Result waiter, probe;
  async_acquire(io, limiter, set, 10s, record(waiter));
  async_acquire(io, limiter, set, 0s, record(probe));
  io.poll();
  ASSERT_TRUE(probe.ec.has_value());
  EXPECT_TRUE(*probe.ec == Outcome::kTimeout);
  EXPECT_FALSE(waiter.ec.has_value());  // still waiting
  EXPECT_EQ(db->waiting(), 1);
  held.release();
  io.run();
  EXPECT_TRUE(waiter.permit);
}

TEST(AsyncAcquire, TotalCancellationAloneIsNotHonoured) {
  Fixture f;
  Permit held = f.limiter.try_acquire(f.needs_db);
  asio::io_context io;
  asio::cancellation_signal signal;
  Result r;
  async_acquire(io, f.limiter, f.needs_db, 5s,
                asio::bind_cancellation_slot(signal.slot(), record(r)));
  io.poll();
  signal.emit(asio::cancellation_type::total);
  io.poll();
  EXPECT_FALSE(r.ec.has_value());
  EXPECT_EQ(f.db->waiting(), 1);
  signal.emit(asio::cancellation_type::partial);
  io.run();
  ASSERT_TRUE(r.ec.has_value());
  EXPECT_TRUE(*r.ec == Outcome::kCancelled);
}

// Counts what is allocated through it.
template <class T>
struct CountingAllocator {
  using value_type = T;
  int* allocations;
  int* live;
  CountingAllocator(int* a, int* l) noexcept : allocations(a), live(l) {}
  template <class U>
  CountingAllocator(const CountingAllocator<U>& o) noexcept
      : allocations(o.allocations), live(o.live) {}
  T* allocate(std::size_t n) {
    ++*allocations;
    ++*live;
    return std::allocator<T>().allocate(n);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    --*live;
    std::allocator<T>().deallocate(p, n);
  }
  template <class U>
  bool operator==(const CountingAllocator<U>& o) const noexcept {
    return allocations == o.allocations;
  }
};

TEST(AsyncAcquire, AllocatesThroughTheHandlersAllocator) {
  Fixture f;
  asio::io_context io;
  int allocations = 0, live = 0;
  const CountingAllocator<void> allocator(&allocations, &live);
  Result at_once, waited;
  async_acquire(io, f.limiter, f.needs_db, 5s, asio::bind_allocator(allocator, record(at_once)));
  io.run();
  ASSERT_TRUE(at_once.permit);
  EXPECT_GE(allocations, 1);  // the posted completion
  EXPECT_EQ(live, 0);

  allocations = 0;
  io.restart();
  async_acquire(io, f.limiter, f.needs_db, 5s, asio::bind_allocator(allocator, record(waited)));
  EXPECT_GE(allocations, 3);  // the operation, its shared state, the timer's handler
  EXPECT_GT(live, 0);
  at_once.permit.release();
  io.run();
  EXPECT_TRUE(waited.permit);
  EXPECT_EQ(live, 0);
}

template <class Token>
concept AcceptedWithoutAnIoExecutor =
    requires(const Limiter& l, std::shared_ptr<const ResourceSet> s, Token t) {
      async_acquire(l, s, Clock::duration{}, std::move(t));
    };

TEST(AsyncAcquire, WithoutAnIoExecutorTheHandlerMustBringOne) {
  auto plain = [](std::error_code, Permit) {};
  using Bound = decltype(asio::bind_executor(std::declval<asio::io_context&>().get_executor(), plain));
  // A plain callback has nowhere to run but a hidden thread pool: refused.
  static_assert(!AcceptedWithoutAnIoExecutor<decltype(plain)>);
  static_assert(AcceptedWithoutAnIoExecutor<Bound>);
  static_assert(AcceptedWithoutAnIoExecutor<asio::use_awaitable_t<>>);

  Fixture f;
  Permit held = f.limiter.try_acquire(f.needs_db);
  asio::io_context io;
  Result r;
  async_acquire(f.limiter, f.needs_db, 5s, asio::bind_executor(io, record(r)));
  std::thread([&] { held.release(); }).join();
  io.run();
  EXPECT_TRUE(r.permit);
  EXPECT_EQ(r.thread, std::this_thread::get_id());  // the io_context's thread
}

TEST(AsyncAcquire, KeyedCoroutineWithoutAnExecutorArgument) {
  Fixture f;
  asio::io_context io;
  std::optional<std::error_code> got;
  bool granted = false;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        auto [ec, permit] = co_await async_acquire(
            f.limiter, f.needs_db, "tenant", 1s,
            asio::experimental::as_tuple(asio::use_awaitable));
        got = ec;
        granted = static_cast<bool>(permit);
      },
      asio::detached);
  io.run();
  ASSERT_TRUE(got.has_value());
  EXPECT_FALSE(*got);
  EXPECT_TRUE(granted);
}

}  // namespace
}  // namespace concurrency_limiter
