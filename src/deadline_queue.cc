#include "concurrency_limiter/deadline_queue.h"

#include "concurrency_limiter/acquisition.h"

namespace concurrency_limiter {

DeadlineQueue::~DeadlineQueue() {
  while (head_) unlink(*head_);
}

bool DeadlineQueue::add(Acquisition& a, double deadline) {
  if (a.deadlines_) a.deadlines_->remove(a);
  a.deadline_ = deadline;
  a.deadlines_ = this;
  // Walk back from the latest deadline: usually stops at once.
  Acquisition* after = tail_;
  while (after && after->deadline_ > deadline) after = after->deadline_prev_;
  a.deadline_prev_ = after;
  a.deadline_next_ = after ? after->deadline_next_ : head_;
  if (a.deadline_next_) {
    a.deadline_next_->deadline_prev_ = &a;
  } else {
    tail_ = &a;
  }
  if (after) {
    after->deadline_next_ = &a;
  } else {
    head_ = &a;
  }
  ++size_;
  return head_ == &a;
}

void DeadlineQueue::remove(Acquisition& a) noexcept {
  if (a.deadlines_ == this) unlink(a);
}

void DeadlineQueue::unlink(Acquisition& a) noexcept {
  if (a.deadline_prev_) {
    a.deadline_prev_->deadline_next_ = a.deadline_next_;
  } else {
    head_ = a.deadline_next_;
  }
  if (a.deadline_next_) {
    a.deadline_next_->deadline_prev_ = a.deadline_prev_;
  } else {
    tail_ = a.deadline_prev_;
  }
  a.deadline_prev_ = a.deadline_next_ = nullptr;
  a.deadlines_ = nullptr;
  --size_;
}

std::optional<double> DeadlineQueue::expire_due(double now) {
  while (head_ && head_->deadline_ <= now) {
    Acquisition& a = *head_;
    unlink(a);
    a.expire();  // may call back; the callback must not destroy `a`
  }
  return next_deadline();
}

std::optional<double> DeadlineQueue::next_deadline() const noexcept {
  if (!head_) return std::nullopt;
  return head_->deadline_;
}

}  // namespace concurrency_limiter
