// The textbook semaphore that the benchmarks measure the engine against: a
// count under a mutex, a condition variable for the waiters. No FIFO: a
// releasing thread may take the slot straight back.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace bench {

class CvSemaphore {
 public:
  explicit CvSemaphore(int count) : count_(count) {}
  void acquire() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [this] { return count_ > 0; });
    --count_;
  }
  bool try_acquire_for(std::chrono::nanoseconds timeout) {
    std::unique_lock lock(mu_);
    if (!cv_.wait_for(lock, timeout, [this] { return count_ > 0; })) return false;
    --count_;
    return true;
  }
  void release() {
    {
      std::lock_guard lock(mu_);
      ++count_;
    }
    cv_.notify_one();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int count_;  // guarded by mu_
};

}  // namespace bench
