// Coroutines sharing a database of 2 slots through async_acquire(). Six
// requests arrive at once: 2 run, the others wait without blocking the I/O
// thread, and those that get no slot within 150 ms are turned away, as a
// server would answer 503.
//
//   ./coroutine_limit
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <iostream>

#include "concurrency_limiter/asio.h"

namespace cl = concurrency_limiter;
using namespace std::chrono_literals;

asio::awaitable<void> handle(int id, const cl::Limiter& limiter,
                             std::shared_ptr<const cl::ResourceSet> needs_db) {
  auto [ec, permit] = co_await cl::async_acquire(
      limiter, needs_db, 150ms, asio::experimental::as_tuple(asio::use_awaitable));
  if (ec) {  // ec == cl::Outcome::kTimeout
    std::cout << "request " << id << ": 503 (" << ec.message() << ")\n";
    co_return;
  }
  // The query; the slot is held until `permit` is destroyed.
  asio::steady_timer query(co_await asio::this_coro::executor, 100ms);
  co_await query.async_wait(asio::use_awaitable);
  std::cout << "request " << id << ": 200\n";
}

int main() {
  auto db = cl::Resource::create("db", 2);
  cl::Limiter limiter({db}, 2s);
  const auto needs_db = limiter.select({db});  // validated once, at start-up

  asio::io_context io;
  for (int id = 0; id < 6; ++id) {
    asio::co_spawn(io, handle(id, limiter, needs_db), asio::detached);
  }
  io.run();

  const cl::ResourceStatistics s = db->statistics();
  std::cout << "served " << s.acquired_total << ", timed out "
            << s.rejected(cl::Outcome::kTimeout) << ", peak " << s.peak_in_use << "\n";
  return s.peak_in_use <= 2 && s.acquired_total + s.rejected(cl::Outcome::kTimeout) == 6 ? 0 : 1;
}
