// Permit: the RAII result of a blocking acquisition.
//
// A non-empty Permit holds one slot of every resource it was acquired for and
// gives them back when it is destroyed or release()d. An empty Permit tells
// why the request was turned away (outcome()) and by which resource
// (refused_by_name()). Move-only.
//
//   if (Permit p = limiter.acquire(set)) { handle(); }
//   else log("busy: ", p.refused_by_name(), " ", to_string(p.outcome()));
//
// A request that finds a free slot of every resource, with nobody waiting,
// gets a Permit holding the slots directly: no Acquisition, no allocation,
// no lock. One that had to wait holds its Acquisition. Either way, release()
// hands each slot to that resource's next waiter, if any.
//
// Lifetime: a Permit owns the resources it holds slots of, through
// shared_ptr, however it was granted: it stays valid after the Limiter, the
// ResourceSet and every other owner of those resources are gone. An empty
// Permit keeps only the refusing resource's name (refused_by_name()), not the
// resource, so it may outlive any resource. (A resource not owned by a
// shared_ptr must outlive the Permits holding its slots; see resource.h,
// "Lifetime".)
//
// Thread safety: a Permit is a value, like a std::unique_ptr: one object must
// not be used from two threads at once, but it may be moved to, released on
// or destroyed on any thread, concurrently with other Permits and with any
// call on the resources it holds. release() and the destructor never block
// on another request; they take a resource's mutex for a few instructions
// when someone waits for the slot.
#pragma once

#include <memory>
#include <optional>
#include <stop_token>
#include <string>
#include <type_traits>
#include <utility>

#include "concurrency_limiter/acquisition.h"
#include "concurrency_limiter/outcome.h"
#include "concurrency_limiter/resource_set.h"

namespace concurrency_limiter {

class Permit {
 public:
  Permit() noexcept = default;  // empty, kCancelled
  Permit(Permit&& other) noexcept
      : resource_(std::move(other.resource_)),
        set_(std::move(other.set_)),
        acquisition_(std::move(other.acquisition_)),
        granted_at_(other.granted_at_),
        measured_(other.measured_),
        outcome_(other.outcome_),
        predicted_wait_(other.predicted_wait_),
        refused_by_(std::move(other.refused_by_)) {}
  Permit& operator=(Permit&& other) noexcept {
    if (this != &other) {
      release();
      resource_ = std::move(other.resource_);
      set_ = std::move(other.set_);
      acquisition_ = std::move(other.acquisition_);
      granted_at_ = other.granted_at_;
      measured_ = other.measured_;
      outcome_ = other.outcome_;
      predicted_wait_ = other.predicted_wait_;
      refused_by_ = std::move(other.refused_by_);
    }
    return *this;
  }
  ~Permit() { release(); }

  // True while the permit holds its slots.
  explicit operator bool() const noexcept {
    return resource_ != nullptr || set_ != nullptr || acquisition_ != nullptr;
  }
  // kGranted for a permit that was granted (even after release()), otherwise
  // the reason it was turned away.
  Outcome outcome() const noexcept { return outcome_; }
  // For a permit refused with kPredictedTimeout (early rejection, see
  // ResourceOptions::early_reject): the wait in seconds that the refusing
  // resource predicted for it, longer than the time it had left; tell the
  // client to come back no sooner (the Python package's Retry-After is this
  // wait rounded up plus its retry_after). std::nullopt for any other
  // outcome (or when no prediction was made). See
  // Acquisition::predicted_wait().
  std::optional<double> predicted_wait() const noexcept {
    if (outcome_ != Outcome::kPredictedTimeout || !(predicted_wait_ > 0.0)) return std::nullopt;
    return predicted_wait_;
  }
  // Name of the resource that turned the request away; empty if granted.
  const std::string& refused_by_name() const noexcept {
    static const std::string none;
    return refused_by_ != nullptr ? *refused_by_ : none;
  }

  // Gives the slots back now, each to its resource's next waiter if one
  // waits; later calls do nothing. Never blocks on a waiter or a callback.
  // `completion` tells adaptive resources how the work went (kDropped: it
  // failed or timed out).
  void release(Completion completion = Completion::kSuccess) noexcept {
    // The common case inline: one slot, not timed, nobody waiting.
    if (resource_ != nullptr && !measured_ && resource_->try_give_back()) {
      resource_.reset();
      return;
    }
    if (*this) release_slow(completion);
  }

 private:
  friend Permit make_permit(std::unique_ptr<Acquisition> acquisition);
  friend class Limiter;
  friend class Resource;

  // Takes a slot of `resource` (of each resource of `set`) if every one has
  // a free slot and nobody waits; otherwise takes nothing, and the permit
  // says kTimeout, refused by the first resource without a free slot.
  bool take(const std::shared_ptr<Resource>& resource) noexcept {
    bool measure = false;
    if (!resource->try_grant(measure)) {
      outcome_ = resource->closed() ? Outcome::kUnavailable : Outcome::kTimeout;
      refused_by_ = resource->shared_name_;
      return false;
    }
    resource_ = resource;
    outcome_ = Outcome::kGranted;
    if (measure) start_measuring();
    return true;
  }
  bool take(const std::shared_ptr<const ResourceSet>& set) noexcept {
    const auto& resources = set->resources();
    return resources.size() == 1 ? take(resources.front()) : take_all(set);
  }
  bool take_all(const std::shared_ptr<const ResourceSet>& set) noexcept;
  void start_measuring() noexcept;
  void release_slow(Completion completion) noexcept;

  // At most one of the three holds slots; each owns its resources, however
  // the slots were granted.
  std::shared_ptr<Resource> resource_;  // one slot taken at once
  std::shared_ptr<const ResourceSet> set_;  // a slot of each, taken at once
  std::unique_ptr<Acquisition> acquisition_;  // slots granted after waiting
  // Start of the hold, when the statistics time it (resource_ and set_).
  Clock::time_point granted_at_{};
  bool measured_ = false;
  Outcome outcome_ = Outcome::kCancelled;
  double predicted_wait_ = 0.0;  // see predicted_wait()
  // The refusing resource's name, shared with it: valid after the resource
  // is gone, even one not owned by a shared_ptr.
  std::shared_ptr<const std::string> refused_by_;
  static std::shared_ptr<const std::string> name_of(const Resource& resource) noexcept {
    return resource.shared_name_;
  }
};

static_assert(std::is_nothrow_move_constructible_v<Permit>);
static_assert(std::is_nothrow_move_assignable_v<Permit>);
static_assert(!std::is_copy_constructible_v<Permit>);

// Blocks the calling thread on `acquisition` until it is decided, the
// deadline passes or `stop` is requested, for a request of `key` and
// `priority` (see acquisition.h). Used by the acquire_* functions.
Permit acquire_blocking(std::shared_ptr<const ResourceSet> set,
                        Clock::time_point deadline, std::stop_token stop,
                        std::optional<std::string> key = std::nullopt,
                        Priority priority = Priority::kCritical);

// Wraps a finished acquisition.
Permit make_permit(std::unique_ptr<Acquisition> acquisition);

}  // namespace concurrency_limiter
