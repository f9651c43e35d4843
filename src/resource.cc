#include "concurrency_limiter/resource.h"

#include <atomic>
#include <stdexcept>
#include <string>
#include <utility>

#include "concurrency_limiter/permit.h"
#include "concurrency_limiter/resource_set.h"
#include "internal/host_pool.h"

namespace concurrency_limiter {
namespace {

using State = detail::WaiterNode::State;

std::string generated_name() {
  static std::atomic<std::uint64_t> counter{0};
  return "resource-" +
         std::to_string(counter.fetch_add(1, std::memory_order_relaxed) + 1);
}

ResourceOptions validated(ResourceOptions o) {
  if (o.capacity < 1) {
    throw std::invalid_argument("capacity must be an integer >= 1, got " +
                                std::to_string(o.capacity));
  }
  if (o.max_waiting && *o.max_waiting < 0) {
    throw std::invalid_argument(
        "max_waiting must be an integer >= 0, or None for an unbounded "
        "queue, got " +
        std::to_string(*o.max_waiting));
  }
  if (o.adaptive_target <= Clock::duration::zero()) {
    throw std::invalid_argument("adaptive_target must be > 0 seconds");
  }
  if (o.adaptive_interval <= Clock::duration::zero()) {
    throw std::invalid_argument("adaptive_interval must be > 0 seconds");
  }
  if (o.scope == Scope::kHost && o.name.empty()) {
    throw std::invalid_argument(
        "name is required for scope 'host': every process opening the same "
        "name shares its slots");
  }
  if (o.name.empty()) o.name = generated_name();
  return o;
}

double seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// CL_STATISTICS=0 compiles the counters and histograms out. It exists only
// to measure what they cost (bench/engine_bench.cc); statistics() then
// reports zeros.
#ifndef CL_STATISTICS
#define CL_STATISTICS 1
#endif
constexpr bool kStatistics = CL_STATISTICS != 0;

}  // namespace

namespace detail {

void NoticeList::push(WaiterNode* node) noexcept {
  node->next_ = nullptr;
  if (tail_) {
    tail_->next_ = node;
  } else {
    head_ = node;
  }
  tail_ = node;
}

void NoticeList::defer(Callback callback, Outcome outcome) {
  if (!first_) {
    first_ = std::move(callback);
    first_outcome_ = outcome;
  } else {
    more_.emplace_back(std::move(callback), outcome);
  }
}

void NoticeList::fire() noexcept {
  while (head_) {
    WaiterNode* node = head_;
    head_ = node->next_;
    if (!head_) tail_ = nullptr;
    node->next_ = nullptr;
    // on_complete() clears completing_ as its last touch of the node: from
    // then on the owner may free it, so the node is not touched again here.
    node->on_complete(node->outcome_, *this);
  }
  // User code last: every node is settled, no owner waits on this thread.
  if (first_) {
    Callback callback = std::move(first_);
    first_ = nullptr;
    callback(first_outcome_);
  }
  for (auto& [callback, outcome] : more_) callback(outcome);
  more_.clear();
}

}  // namespace detail

Resource::Resource(ResourceOptions options)
    : Resource(validated(std::move(options)), 0) {}

Resource::Resource(std::string name, std::int64_t capacity)
    : Resource([&] {
        ResourceOptions o;
        o.name = std::move(name);
        o.capacity = capacity;
        return o;
      }()) {}

// Private tag constructor: `o` is already validated.
Resource::Resource(ResourceOptions o, int)
    : name_(std::move(o.name)),
      capacity_(o.capacity),
      max_waiting_(o.max_waiting ? *o.max_waiting : -1),
      discipline_(o.queue),
      target_(o.adaptive_target),
      interval_(o.adaptive_interval) {
  stats_.name = name_;
  stats_.capacity = capacity_;
  stats_.max_waiting = o.max_waiting;
  stats_.queue = discipline_;
  if (o.scope == Scope::kHost) {
    o.name = name_;  // moved from above
    host_ = detail::HostPool::get(o);
  }
}

Resource::~Resource() = default;

std::optional<std::int64_t> Resource::max_waiting() const noexcept {
  if (max_waiting_ < 0) return std::nullopt;
  return max_waiting_;
}

std::int64_t Resource::in_use() const {
  if (host_) return host_->in_use();
  std::lock_guard lock(mu_);
  return in_use_;
}

std::int64_t Resource::waiting() const {
  if (host_) return host_->waiting();
  std::lock_guard lock(mu_);
  return waiting_;
}

ResourceStatistics Resource::statistics() const {
  if (host_) return host_->statistics();
  std::lock_guard lock(mu_);
  ResourceStatistics s = stats_;
  s.in_use = in_use_;
  s.waiting = waiting_;
  return s;
}

void Resource::note_grant_locked(double waited) {
  if constexpr (kStatistics) {
    if (in_use_ > stats_.peak_in_use) stats_.peak_in_use = in_use_;
    ++stats_.acquired_total;
    stats_.wait_seconds.observe(waited);
  }
}

void Resource::note_rejection_locked(Outcome reason) {
  if constexpr (kStatistics) ++stats_.rejected_total[rejection_index(reason)];
}

void Resource::grant_free_slot_locked(detail::WaiterNode& node,
                                      Clock::time_point now) {
  ++in_use_;
  note_grant_locked(0.0);
  node.granted_at_ = now;
  node.state_ = State::kGranted;
  node.outcome_ = Outcome::kGranted;
}

bool Resource::try_grant(detail::WaiterNode& node) {
  if (host_) return host_->try_grant(node);
  // The grant time only serves the hold-time histogram.
  const auto now = kStatistics ? Clock::now() : Clock::time_point{};
  std::lock_guard lock(mu_);
  if (in_use_ >= capacity_ || waiting_ > 0) return false;
  grant_free_slot_locked(node, now);
  return true;
}

Outcome Resource::enqueue(detail::WaiterNode& node,
                          detail::NoticeList& notices) {
  if (host_) return host_->enqueue(node, notices);
  const auto now = Clock::now();
  std::lock_guard lock(mu_);
  if (in_use_ < capacity_ && waiting_ == 0) {
    grant_free_slot_locked(node, now);
    return Outcome::kGranted;
  }
  shed_locked(now, notices);
  if (max_waiting_ >= 0 && waiting_ >= max_waiting_) {
    // FIFO order (also the adaptive queue's, until a queue stands) turns the
    // newcomer away; newest-first order pushes the oldest waiter out.
    const bool newest_first =
        discipline_ == QueueDiscipline::kLifo ||
        (discipline_ == QueueDiscipline::kAdaptive && standing_locked(now));
    if (!newest_first || waiting_ == 0) {
      note_rejection_locked(Outcome::kQueueFull);
      node.state_ = State::kRejected;
      node.outcome_ = Outcome::kQueueFull;
      return Outcome::kQueueFull;
    }
    // LIFO-like queues keep the newest: the oldest waiter makes room.
    reject_locked(*head_, Outcome::kQueueFull, notices);
  }
  link_tail(node, now);
  return Outcome::kPending;
}

State Resource::abandon(detail::WaiterNode& node, Outcome reason) {
  if (host_) return host_->abandon(node, reason);
  std::lock_guard lock(mu_);
  const State state = node.state_;
  if (state == State::kQueued) {
    unlink(node);
    node.state_ = State::kRejected;
    node.outcome_ = reason;
    note_rejection_locked(reason);
  }
  return state;
}

void Resource::revert_grant(detail::NoticeList& notices) {
  if (host_) return host_->revert_grant(notices);
  const auto now = Clock::now();
  std::lock_guard lock(mu_);
  if constexpr (kStatistics) {
    // Undo note_grant_locked(0.0) of try_grant(); peak_in_use stays, as the
    // slot was taken for an instant.
    --stats_.acquired_total;
    --stats_.wait_seconds.counts[0];
    --stats_.wait_seconds.count;
  }
  hand_over_locked(now, notices);
}

void Resource::count_rejection(Outcome reason) {
  if (host_) return host_->count_rejection(reason);
  std::lock_guard lock(mu_);
  note_rejection_locked(reason);
}

void Resource::release(Clock::time_point granted_at,
                       detail::NoticeList& notices) {
  if (host_) return host_->release(granted_at, notices);
  const auto now = Clock::now();
  std::lock_guard lock(mu_);
  if constexpr (kStatistics) stats_.hold_seconds.observe(seconds(now - granted_at));
  hand_over_locked(now, notices);
}

void Resource::hand_over_locked(Clock::time_point now,
                                detail::NoticeList& notices) {
  if (detail::WaiterNode* next = pick_locked(now, notices)) {
    grant_locked(*next, now);  // in_use_ stays the same
    notices.push(next);
  } else {
    --in_use_;
  }
}

void Resource::link_tail(detail::WaiterNode& node, Clock::time_point now) {
  node.enqueued_at_ = now;
  node.state_ = State::kQueued;
  node.outcome_ = Outcome::kPending;
  node.next_ = nullptr;
  node.prev_ = tail_;
  if (tail_) {
    tail_->next_ = &node;
  } else {
    head_ = &node;
  }
  tail_ = &node;
  ++waiting_;
}

void Resource::unlink(detail::WaiterNode& node) {
  if (node.prev_) {
    node.prev_->next_ = node.next_;
  } else {
    head_ = node.next_;
  }
  if (node.next_) {
    node.next_->prev_ = node.prev_;
  } else {
    tail_ = node.prev_;
  }
  node.prev_ = node.next_ = nullptr;
  --waiting_;
}

void Resource::reject_locked(detail::WaiterNode& node, Outcome reason,
                             detail::NoticeList& notices) {
  unlink(node);
  node.state_ = State::kRejected;
  node.outcome_ = reason;
  node.completing_.store(true, std::memory_order_relaxed);  // published by mu_
  note_rejection_locked(reason);
  notices.push(&node);
}

bool Resource::standing_locked(Clock::time_point now) {
  // CoDel's rule: the queue stands once its oldest waiter has been older than
  // the target without a break for a whole interval. The break is observed
  // lazily, at the events that call this. A queue no longer than the number
  // of slots drains within about one service time: it never stands (this
  // also ends the newest-first order once an overload is over, when the
  // waiters it had pushed back would otherwise keep the head old).
  if (!head_ || waiting_ <= capacity_ || now - head_->enqueued_at_ <= target_) {
    above_target_since_.reset();
    return false;
  }
  if (!above_target_since_) above_target_since_ = head_->enqueued_at_ + target_;
  return now - *above_target_since_ >= interval_;
}

void Resource::shed_locked(Clock::time_point now,
                           detail::NoticeList& notices) {
  if (discipline_ != QueueDiscipline::kAdaptive || !standing_locked(now)) {
    return;
  }
  // Served newest first, the oldest waiters would be served last: tell them
  // now instead of at their timeout.
  while (head_ && now - head_->enqueued_at_ > target_ + interval_) {
    reject_locked(*head_, Outcome::kShed, notices);
  }
}

detail::WaiterNode* Resource::pick_locked(Clock::time_point now,
                                          detail::NoticeList& notices) {
  switch (discipline_) {
    case QueueDiscipline::kFifo:
      return head_;
    case QueueDiscipline::kLifo:
      return tail_;
    case QueueDiscipline::kAdaptive:
      shed_locked(now, notices);
      return standing_locked(now) ? tail_ : head_;
  }
  return head_;
}

void Resource::grant_locked(detail::WaiterNode& node, Clock::time_point now) {
  unlink(node);
  node.state_ = State::kGranted;
  node.outcome_ = Outcome::kGranted;
  node.granted_at_ = now;
  node.completing_.store(true, std::memory_order_relaxed);  // published by mu_
  note_grant_locked(seconds(now - node.enqueued_at_));
}

Permit Resource::try_acquire() {
  auto acq = std::make_unique<Acquisition>(
      std::make_shared<const ResourceSet>(
          std::vector<std::shared_ptr<Resource>>{shared_from_this()}));
  acq->try_acquire();
  return make_permit(std::move(acq));
}

Permit Resource::acquire_until(Clock::time_point deadline,
                               std::stop_token stop) {
  return acquire_blocking(
      std::make_shared<const ResourceSet>(
          std::vector<std::shared_ptr<Resource>>{shared_from_this()}),
      deadline, std::move(stop));
}

Permit Resource::acquire_for(Clock::duration timeout, std::stop_token stop) {
  return acquire_until(Clock::now() + timeout, std::move(stop));
}

}  // namespace concurrency_limiter
