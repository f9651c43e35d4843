#include "concurrency_limiter/acquisition.h"

#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

namespace concurrency_limiter {

using NodeState = detail::WaiterNode::State;

namespace {

// Refuses, before anything is queued, a priority the set cannot honour.
Priority checked(Priority priority, const ResourceSet* set) {
  if (priority_index(priority) >= kPriorityCount) {
    throw std::invalid_argument(
        "priority must be one of sheddable, sheddable_plus, critical, "
        "critical_plus, got the value " +
        std::to_string(static_cast<unsigned>(priority)));
  }
  if (priority == Priority::kCritical || set == nullptr) return priority;
  for (const auto& r : set->resources()) {
    if (r->per_key() != 0) {
      throw std::invalid_argument(
          "priority '" + std::string(to_string(priority)) +
          "' is not supported on resource '" + r->name() +
          "' (a per-key share) yet: use priority critical (the default) for the "
          "requests that need it");
    }
  }
  return priority;
}

}  // namespace

Acquisition::Acquisition(std::shared_ptr<const ResourceSet> set,
                         std::optional<std::string> key, Priority priority)
    : set_(std::move(set)),
      key_(std::move(key)),
      priority_(checked(priority, set_.get())),
      count_(set_ ? static_cast<std::uint32_t>(set_->size()) : 0),
      nodes_(new Node[count_]),
      refused_(count_) {
  if (!set_) throw std::invalid_argument("resource set must not be null");
  for (std::uint32_t i = 0; i < count_; ++i) {
    nodes_[i].owner = this;
    nodes_[i].index = i;
    nodes_[i].key_ = key_ptr();
    nodes_[i].priority_ = priority_;
  }
}

Acquisition::~Acquisition() {
  if (deadlines_) deadlines_->remove(*this);
  {
    detail::NoticeList notices;  // fired after mu_ is unlocked
    detail::MutexLock lock(mu_);
    if (state_ == State::kPending) {
      const NodeState s = resource(held_).abandon(nodes_[held_], Outcome::kCancelled);
      if (s == NodeState::kGranted) ++held_;  // the grant's notice is in flight
      callback_ = nullptr;  // nobody is left to tell
      release_held_locked(notices);
      state_ = State::kRejected;
      outcome_ = Outcome::kCancelled;
    } else if (state_ == State::kGranted) {
      release_held_locked(notices, Completion::kSuccess);
      state_ = State::kReleased;
    }
  }
  // A resource may still be inside one of our nodes' on_complete() on another
  // thread; it returns at once (state is final) but must finish before the
  // nodes are freed.
  for (std::uint32_t i = 0; i < count_; ++i) {
    while (nodes_[i].completing_.load(std::memory_order_acquire)) {
      std::this_thread::yield();
    }
  }
}

bool Acquisition::try_acquire() {
  detail::NoticeList notices;
  detail::MutexLock lock(mu_);
  if (state_ != State::kIdle) {
    throw std::logic_error("try_acquire() on an acquisition already started");
  }
  bool measure = false;
  for (std::uint32_t i = 0; i < count_; ++i) {
    bool m = false;
    if (!resource(i).try_grant(m, key_ptr(), priority_)) {
      refused_ = i;
      // Undo the slots taken on the way, leaving no trace in the statistics.
      for (std::uint32_t j = i; j-- > 0;) {
        resource(j).revert_grant(notices, key_ptr(), priority_);
      }
      return false;
    }
    measure = measure || m;
  }
  held_ = count_;
  state_ = State::kGranted;
  outcome_ = Outcome::kGranted;
  measured_ = measure;
  if (measure) granted_at_ = Clock::now();
  return true;
}

Outcome Acquisition::try_once() {
  if (try_acquire()) return Outcome::kGranted;
  detail::MutexLock lock(mu_);
  const Outcome reason = resource(refused_).refuse_try(key_ptr(), priority_);
  state_ = State::kRejected;
  outcome_ = reason;
  return reason;
}

Outcome Acquisition::refuse(Outcome reason) {
  if (!is_rejection(reason)) {
    throw std::invalid_argument("refuse() needs a rejection reason, got '" +
                                std::string(to_string(reason)) + "'");
  }
  detail::MutexLock lock(mu_);
  if (state_ != State::kIdle) {
    throw std::logic_error("refuse() on an acquisition already started");
  }
  refused_ = 0;
  resource(0).count_rejection(reason, priority_);
  state_ = State::kRejected;
  outcome_ = reason;
  return reason;
}

Outcome Acquisition::start(Callback callback) {
  return start(std::move(callback), Clock::time_point::max());
}

Outcome Acquisition::start(Callback callback, Clock::time_point deadline) {
  detail::NoticeList notices;
  detail::MutexLock lock(mu_);
  if (state_ != State::kIdle) {
    throw std::logic_error("start() on an acquisition already started");
  }
  for (std::uint32_t i = 0; i < count_; ++i) nodes_[i].deadline_ = deadline;
  state_ = State::kPending;
  callback_ = std::move(callback);
  const Outcome o = advance_locked(notices);
  if (o != Outcome::kPending) callback_ = nullptr;  // reported by the return
  return o;
}

Outcome Acquisition::advance_locked(detail::NoticeList& notices) {
  while (held_ < count_) {
    const Outcome o = resource(held_).enqueue(nodes_[held_], notices);
    if (o == Outcome::kGranted) {
      ++held_;
    } else if (o == Outcome::kPending) {
      return o;
    } else {
      reject_locked(held_, o, notices);
      return o;
    }
  }
  complete_locked();
  return Outcome::kGranted;
}

void Acquisition::complete_locked() {
  state_ = State::kGranted;
  outcome_ = Outcome::kGranted;
  // Node fields were written by the granting resource under its mutex, which
  // this thread has taken since (or it is the granting thread).
  bool measure = false;
  for (std::uint32_t i = 0; i < count_; ++i) measure = measure || nodes_[i].measure_;
  measured_ = measure;
  if (measure) {
    // The hold starts with the last slot: the earlier ones were held while
    // waiting for it, which is not service time.
    const Clock::time_point handed = nodes_[count_ - 1].granted_at_;
    granted_at_ = handed != Clock::time_point{} ? handed : Clock::now();
  }
}

void Acquisition::restart_service_clock() {
  detail::MutexLock lock(mu_);
  if (state_ == State::kGranted && measured_) granted_at_ = Clock::now();
}

void Acquisition::reject_locked(std::uint32_t index, Outcome reason,
                                detail::NoticeList& notices) {
  refused_ = index;
  release_held_locked(notices);
  state_ = State::kRejected;
  outcome_ = reason;
}

void Acquisition::release_held_locked(detail::NoticeList& notices,
                                      Completion completion) {
  // Only a granted acquisition's holds are timed: one that gives up after
  // taking its first resources never started its work.
  const bool measured = state_ == State::kGranted && measured_;
  const Clock::time_point now = measured ? Clock::now() : Clock::time_point{};
  while (held_ > 0) {
    --held_;
    resource(held_).release(measured, granted_at_, now, completion, notices,
                            key_ptr(), priority_);
  }
}

void Acquisition::on_node_complete(std::uint32_t index, Outcome outcome,
                                   detail::NoticeList& notices) noexcept {
  Callback callback;
  Outcome final_outcome = outcome;
  {
    detail::MutexLock lock(mu_);
    // cancel() already settled this node when it lost or won the race.
    if (state_ == State::kPending && index == held_) {
      if (outcome == Outcome::kGranted) {
        ++held_;
        final_outcome = advance_locked(notices);  // may push more nodes
        if (final_outcome != Outcome::kPending) {
          callback = std::exchange(callback_, nullptr);
        }
      } else {
        reject_locked(index, outcome, notices);
        callback = std::exchange(callback_, nullptr);
      }
    }
  }
  // Last touch of this object: from here on its owner may destroy it.
  nodes_[index].completing_.store(false, std::memory_order_release);
  if (callback) notices.defer(std::move(callback), final_outcome);
}

void Acquisition::cancel(Outcome reason) {
  if (!is_rejection(reason)) {
    throw std::invalid_argument("cancel() needs a rejection reason, got " +
                                std::string(to_string(reason)));
  }
  Callback callback;
  Outcome final_outcome = reason;
  {
    detail::NoticeList notices;
    detail::MutexLock lock(mu_);
    if (state_ != State::kPending) return;
    Node& node = nodes_[held_];
    const NodeState s = resource(held_).abandon(node, reason);
    if (s == NodeState::kQueued) {
      // The resource may have turned kTimeout into kKeyLimit; the node is
      // settled, nobody else writes it now.
      final_outcome = node.outcome_;
      reject_locked(held_, final_outcome, notices);
    } else if (s == NodeState::kGranted) {
      // The resource granted the slot first; its notice will find the state
      // settled and do nothing.
      ++held_;
      if (held_ == count_) {
        complete_locked();
        final_outcome = Outcome::kGranted;
      } else {
        // It still lacked a later resource when the deadline or the cancel
        // came: that one refused it.
        resource(held_).count_rejection(reason, priority_);
        reject_locked(held_, reason, notices);
      }
    } else {
      // Shed or pushed out of a full queue first: that is the reason.
      final_outcome = node.outcome_;
      reject_locked(held_, final_outcome, notices);
    }
    // Every branch above settled the acquisition: call back exactly once.
    callback = std::exchange(callback_, nullptr);
  }
  if (callback) callback(final_outcome);
}

void Acquisition::release(Completion completion) {
  detail::NoticeList notices;
  detail::MutexLock lock(mu_);
  if (state_ != State::kGranted) return;
  release_held_locked(notices, completion);
  state_ = State::kReleased;
}

Acquisition::State Acquisition::state() const {
  detail::MutexLock lock(mu_);
  return state_;
}

Outcome Acquisition::outcome() const {
  detail::MutexLock lock(mu_);
  return outcome_;
}

std::optional<double> Acquisition::predicted_wait() const {
  detail::MutexLock lock(mu_);
  if (state_ != State::kRejected || outcome_ != Outcome::kPredictedTimeout || refused_ >= count_) {
    return std::nullopt;
  }
  // Set (> 0: more than a time left >= 0) only by the resource's prediction.
  const double predicted = nodes_[refused_].predicted_wait_;
  if (!(predicted > 0.0)) return std::nullopt;
  return predicted;
}

const Resource* Acquisition::refused_by() const {
  detail::MutexLock lock(mu_);
  // Set by a rejection, or by a try_acquire() that found no free slot.
  if (state_ != State::kRejected && state_ != State::kIdle) return nullptr;
  return refused_ < count_ ? &resource(refused_) : nullptr;
}

}  // namespace concurrency_limiter
