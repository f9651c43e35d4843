// Permit: the RAII result of a blocking acquisition.
//
// A non-empty Permit holds one slot of every resource it was acquired for and
// gives them back when it is destroyed or release()d. An empty Permit tells
// why the request was turned away (outcome()) and by which resource
// (refused_by_name()). Move-only.
//
//   if (Permit p = limiter.acquire(set)) { handle(); }
//   else log("busy: ", p.refused_by_name(), " ", to_string(p.outcome()));
#pragma once

#include <memory>
#include <string>
#include <type_traits>

#include "concurrency_limiter/acquisition.h"
#include "concurrency_limiter/outcome.h"

namespace concurrency_limiter {

class Permit {
 public:
  Permit() noexcept = default;  // empty, kCancelled
  Permit(Permit&&) noexcept = default;
  Permit& operator=(Permit&& other) noexcept {
    if (this != &other) {
      release();
      granted_ = std::move(other.granted_);
      outcome_ = other.outcome_;
      refused_by_ = std::move(other.refused_by_);
    }
    return *this;
  }
  ~Permit() { release(); }

  // True while the permit holds its slots.
  explicit operator bool() const noexcept { return granted_ != nullptr; }
  // kGranted for a permit that was granted (even after release()), otherwise
  // the reason it was turned away.
  Outcome outcome() const noexcept { return outcome_; }
  // Name of the resource that turned the request away; empty if granted.
  const std::string& refused_by_name() const noexcept { return refused_by_; }

  // Gives the slots back now; later calls do nothing. `completion` tells
  // adaptive resources how the work went (see Acquisition::release()).
  void release(Completion completion = Completion::kSuccess) noexcept {
    if (granted_) {
      granted_->release(completion);
      granted_.reset();
    }
  }

 private:
  friend Permit make_permit(std::unique_ptr<Acquisition> acquisition);

  std::unique_ptr<Acquisition> granted_;  // null when empty or released
  Outcome outcome_ = Outcome::kCancelled;
  std::string refused_by_;
};

static_assert(std::is_nothrow_move_constructible_v<Permit>);
static_assert(std::is_nothrow_move_assignable_v<Permit>);
static_assert(!std::is_copy_constructible_v<Permit>);

// Blocks the calling thread on `acquisition` until it is decided, the
// deadline passes or `stop` is requested. Used by the acquire_* functions.
Permit acquire_blocking(std::shared_ptr<const ResourceSet> set,
                        Clock::time_point deadline, std::stop_token stop);

// Wraps a finished acquisition.
Permit make_permit(std::unique_ptr<Acquisition> acquisition);

}  // namespace concurrency_limiter
