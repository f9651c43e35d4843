#include "concurrency_limiter/deadline_queue.h"

#include "concurrency_limiter/acquisition.h"

namespace concurrency_limiter {

DeadlineQueue::~DeadlineQueue() {
  for (Acquisition* a : heap_) a->deadlines_ = nullptr;
}

bool DeadlineQueue::before(const Acquisition& a, const Acquisition& b) noexcept {
  if (a.deadline_ != b.deadline_) return a.deadline_ < b.deadline_;
  return a.deadline_order_ < b.deadline_order_;
}

void DeadlineQueue::place(Acquisition& a, std::size_t index) noexcept {
  heap_[index] = &a;
  a.deadline_index_ = index;
}

void DeadlineQueue::sift_up(std::size_t index) noexcept {
  Acquisition& a = *heap_[index];
  while (index > 0) {
    const std::size_t parent = (index - 1) / 2;
    if (!before(a, *heap_[parent])) break;
    place(*heap_[parent], index);
    index = parent;
  }
  place(a, index);
}

void DeadlineQueue::sift_down(std::size_t index) noexcept {
  Acquisition& a = *heap_[index];
  const std::size_t n = heap_.size();
  for (;;) {
    std::size_t child = 2 * index + 1;
    if (child >= n) break;
    if (child + 1 < n && before(*heap_[child + 1], *heap_[child])) ++child;
    if (!before(*heap_[child], a)) break;
    place(*heap_[child], index);
    index = child;
  }
  place(a, index);
}

bool DeadlineQueue::add(Acquisition& a, double deadline) {
  if (a.deadlines_) a.deadlines_->remove(a);
  heap_.push_back(&a);  // may throw: `a` is not registered yet
  a.deadline_ = deadline;
  a.deadline_order_ = added_++;
  a.deadlines_ = this;
  a.deadline_index_ = heap_.size() - 1;
  sift_up(a.deadline_index_);
  return heap_.front() == &a;
}

void DeadlineQueue::remove(Acquisition& a) noexcept {
  if (a.deadlines_ == this) unlink(a);
}

void DeadlineQueue::unlink(Acquisition& a) noexcept {
  const std::size_t index = a.deadline_index_;
  Acquisition* last = heap_.back();
  heap_.pop_back();
  a.deadlines_ = nullptr;
  if (last == &a) return;
  // The last element fills the hole and moves whichever way it must.
  place(*last, index);
  if (index > 0 && before(*last, *heap_[(index - 1) / 2])) {
    sift_up(index);
  } else {
    sift_down(index);
  }
}

std::optional<double> DeadlineQueue::expire_due(double now) {
  while (!heap_.empty() && heap_.front()->deadline_ <= now) {
    Acquisition& a = *heap_.front();
    unlink(a);
    a.expire();  // may call back; the callback must not destroy `a`
  }
  return next_deadline();
}

std::optional<double> DeadlineQueue::next_deadline() const noexcept {
  if (heap_.empty()) return std::nullopt;
  return heap_.front()->deadline_;
}

}  // namespace concurrency_limiter
