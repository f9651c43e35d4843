// Uses the installed library as an application would: a limiter over two
// resources, a blocking acquisition, a rejection, the statistics.
#include <concurrency_limiter/concurrency_limiter.h>

#include <chrono>
#include <cstdio>
#include <memory>

#ifdef CONSUMER_EXPECTS_CXX23
// The build asked for C++23: nothing the library exports may lower it.
static_assert(__cplusplus > 202002L, "compiled as C++20 although the consumer asked for C++23");
#endif

namespace cl = concurrency_limiter;

int main() {
  auto db = std::make_shared<cl::Resource>(cl::ResourceOptions{.name = "db", .capacity = 1});
  auto file = cl::Resource::create("file", 2);  // the factory
  cl::Limiter limiter({db, file}, std::chrono::milliseconds(10));
  const auto both = limiter.select({db, file});
  {
    cl::Permit permit = limiter.acquire(both);
    if (!permit) return 1;
    cl::Permit second = limiter.acquire(both);  // db is taken: times out
    if (second || second.outcome() != cl::Outcome::kTimeout ||
        second.refused_by_name() != "db") {
      return 2;
    }
  }
  const cl::ResourceStatistics s = db->statistics();
  if (s.in_use != 0 || s.acquired_total != 1 || s.rejected(cl::Outcome::kTimeout) != 1) {
    return 3;
  }
  std::printf("consumer: ok (db acquired %llu, timed out %llu)\n",
              static_cast<unsigned long long>(s.acquired_total),
              static_cast<unsigned long long>(s.rejected(cl::Outcome::kTimeout)));
  return 0;
}
