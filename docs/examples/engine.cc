// A thread pool's requests limited to 5 database queries at a time: each
// worker thread blocks in acquire() until it holds a slot, or answers 503
// after 2 s.
#include <chrono>
#include <iostream>
#include <memory>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "concurrency_limiter/concurrency_limiter.h"
namespace cl = concurrency_limiter;

void run_query() { std::this_thread::sleep_for(std::chrono::milliseconds(10)); }

void reply_503(std::string_view resource, std::string_view reason) {
  std::cout << "503: " << resource << " " << reason << "\n";
}

int main() {
  cl::ResourceOptions options;  // set one by one: see "Options" in docs/cpp.md
  options.name = "db";
  options.capacity = 5;
  options.queue = cl::QueueDiscipline::kAdaptive;
  auto db = cl::Resource::create(std::move(options));
  cl::Limiter limiter({db}, std::chrono::seconds(2));
  const auto needs_db = limiter.select({db});        // validated at start-up

  std::vector<std::jthread> workers;
  for (int i = 0; i < 20; ++i) {
    workers.emplace_back([&] {
      if (cl::Permit permit = limiter.acquire(needs_db)) {   // blocks this thread
        run_query();                                          // slot held until `permit` dies
      } else {
        reply_503(permit.refused_by_name(), cl::to_string(permit.outcome()));
      }
    });
  }
  workers.clear();  // joins them
  std::cout << "peak in use: " << db->statistics().peak_in_use << "\n";
}
