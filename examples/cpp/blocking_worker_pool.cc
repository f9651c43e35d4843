// A pool of worker threads sharing one database that takes at most 2 queries
// at a time. Jobs that cannot get a slot within 50 ms are turned away, as a
// web server would answer 503, instead of piling onto the database.
//
//   ./blocking_worker_pool
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <utility>
#include <vector>

#include "concurrency_limiter/concurrency_limiter.h"

using namespace std::chrono_literals;
namespace cl = concurrency_limiter;

int main() {
  // Options set one by one: a designated initializer that leaves members out
  // trips GCC 12's -Wmissing-field-initializers (part of -Wextra).
  cl::ResourceOptions options;
  options.name = "db";
  options.capacity = 2;
  options.max_waiting = 4;
  options.queue = cl::QueueDiscipline::kAdaptive;
  auto db = cl::Resource::create(std::move(options));
  cl::Limiter limiter({db}, 50ms);
  const auto needs_db = limiter.select({db});  // validated once, at start-up

  std::atomic<int> served{0}, busy{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < 8; ++w) {
    workers.emplace_back([&] {
      for (int job = 0; job < 20; ++job) {
        if (cl::Permit permit = limiter.acquire(needs_db)) {
          std::this_thread::sleep_for(10ms);  // the query
          ++served;
        } else {
          ++busy;  // permit.outcome() says why: timeout, queue_full, shed
        }
      }
    });
  }
  for (auto& t : workers) t.join();

  const cl::ResourceStatistics s = db->statistics();
  std::printf("served %d, turned away %d\n", served.load(), busy.load());
  std::printf("db: peak_in_use=%lld acquired=%llu timeout=%llu queue_full=%llu shed=%llu\n",
              static_cast<long long>(s.peak_in_use),
              static_cast<unsigned long long>(s.acquired_total),
              static_cast<unsigned long long>(s.rejected(cl::Outcome::kTimeout)),
              static_cast<unsigned long long>(s.rejected(cl::Outcome::kQueueFull)),
              static_cast<unsigned long long>(s.rejected(cl::Outcome::kShed)));
  return s.peak_in_use <= s.capacity ? 0 : 1;
}
