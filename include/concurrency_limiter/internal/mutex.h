// Mutex, MutexLock and CondVar: std::mutex and std::condition_variable with
// Clang thread-safety annotations (libstdc++'s own types carry none, so the
// analysis could not see them being locked).
//
// Internal: not part of the library's API.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "concurrency_limiter/internal/thread_annotations.h"

namespace concurrency_limiter::detail {

class CL_CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() CL_ACQUIRE() { mu_.lock(); }
  void unlock() CL_RELEASE() { mu_.unlock(); }

 private:
  friend class CondVar;
  std::mutex mu_;
};

// Holds `mu` for its scope (std::lock_guard, annotated).
class CL_SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) CL_ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  ~MutexLock() CL_RELEASE() { mu_.unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex& mu_;
};

// A condition variable used with a Mutex the caller holds.
class CondVar {
 public:
  void notify_one() noexcept { cv_.notify_one(); }

  // Blocks until notified (or woken spuriously: callers loop on their
  // condition); `mu` is released while blocked and held again on return.
  void wait(Mutex& mu) CL_REQUIRES(mu) {
    std::unique_lock<std::mutex> lock(mu.mu_, std::adopt_lock);
    cv_.wait(lock);
    lock.release();  // still held: the caller's scope unlocks it
  }

  // As wait(), but returns false once `deadline` has passed.
  template <class Clock, class Duration>
  bool wait_until(Mutex& mu, std::chrono::time_point<Clock, Duration> deadline)
      CL_REQUIRES(mu) {
    std::unique_lock<std::mutex> lock(mu.mu_, std::adopt_lock);
    const bool notified = cv_.wait_until(lock, deadline) == std::cv_status::no_timeout;
    lock.release();
    return notified;
  }

 private:
  std::condition_variable cv_;
};

}  // namespace concurrency_limiter::detail
