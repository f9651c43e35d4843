// DeadlineQueue: one timer for many waiting acquisitions.
//
// An event loop that gave every waiting request its own timer would pay for
// a timer per request. Instead, register each pending Acquisition here with
// its deadline, arm one loop timer for next_deadline(), and when it fires call
// expire_due(now): every acquisition whose deadline has passed is expired
// (Acquisition::expire(), which calls its callback from this thread).
//
//   DeadlineQueue deadlines;                      // one per event loop
//   if (deadlines.add(acq, loop_now + timeout))  // earliest deadline changed
//     rearm_timer(*deadlines.next_deadline());
//   ...timer fires:
//   if (auto next = deadlines.expire_due(loop_now)) rearm_timer(*next);
//   ...the acquisition finished (granted, rejected) or is about to go away:
//   deadlines.remove(acq);
//
// Deadlines are plain numbers in the caller's clock (e.g. asyncio's
// loop.time()), so the queue never reads a clock itself. Kept as a binary
// heap whose position is stored in each Acquisition: add() and remove() are
// O(log n) whatever the mix of timeouts, next_deadline() is O(1), and
// expire_due() is O(log n) per acquisition expired. Equal deadlines expire in
// the order they were added.
//
// Not thread-safe: use a queue from one thread only (the event loop's).
// Acquisitions may still be granted by other threads meanwhile; expire() on
// an acquisition that is no longer pending does nothing. An Acquisition
// destroyed while registered removes itself.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

namespace concurrency_limiter {

class Acquisition;

class DeadlineQueue {
 public:
  DeadlineQueue() = default;
  DeadlineQueue(const DeadlineQueue&) = delete;
  DeadlineQueue& operator=(const DeadlineQueue&) = delete;
  ~DeadlineQueue();

  // Registers `acquisition` to expire at `deadline` (moving it if it was
  // registered already). Returns true if it is now the earliest deadline.
  bool add(Acquisition& acquisition, double deadline);
  // Unregisters it; no effect if it is not registered here.
  void remove(Acquisition& acquisition) noexcept;
  // Expires and unregisters every acquisition with deadline <= now, earliest
  // first. Returns the next deadline still registered, if any.
  std::optional<double> expire_due(double now);
  std::optional<double> next_deadline() const noexcept;
  std::size_t size() const noexcept { return heap_.size(); }

 private:
  // Heap order: earlier deadline first, then earlier add().
  static bool before(const Acquisition& a, const Acquisition& b) noexcept;
  void place(Acquisition& a, std::size_t index) noexcept;
  void sift_up(std::size_t index) noexcept;
  void sift_down(std::size_t index) noexcept;
  void unlink(Acquisition& a) noexcept;

  std::vector<Acquisition*> heap_;  // heap_[0]: earliest deadline
  std::uint64_t added_ = 0;         // add() calls so far, for ties
};

}  // namespace concurrency_limiter
