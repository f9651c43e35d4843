// Outcome of an attempt to acquire slots, and the reasons a request is turned
// away.
//
// Every acquisition ends in exactly one outcome: it is granted, or it is
// rejected for one reason. `kPending` is only ever returned by
// `Acquisition::start()` while the request waits in a queue; it is never
// delivered to a completion callback.
//
// Thread safety: plain values and pure functions, usable from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace concurrency_limiter {

enum class Outcome : std::uint8_t {
  kGranted = 0,  // every requested slot is held by the caller
  kTimeout,      // the deadline passed while waiting
  kQueueFull,    // the queue was at `max_waiting`: rejected on arrival, or
                 // (LIFO order) pushed out later by a newer request
  kShed,         // the adaptive queue dropped a waiter that waited too long
  kDisconnected, // the client went away while waiting (set by the front end)
  kCancelled,    // the caller cancelled the wait
  kKeyLimit,     // the deadline passed while the request's key held its
                 // whole per-key share, which had kept it from a slot the
                 // resource had for other keys; or, queued at its share, it
                 // made room in a full queue for a request of a key below
                 // its share (ResourceOptions::per_key)
  kUnavailable,  // the resource was closed (Resource::close()), or its
                 // shared state could not be reached in time (host scope: its
                 // lock held by a process stopped inside it, or a corrupt
                 // segment); refused at once
  kDeadline,     // the client's own deadline (a budget it sent with the
                 // request) was spent before a slot came: refused before
                 // queueing if already spent on arrival, else it ended the
                 // wait before the timeout would have (set by the front end)
  kPredictedTimeout,  // early rejection (ResourceOptions::early_reject): the
                      // wait predicted from the waiters ahead and the
                      // resource's service-time estimate exceeded the
                      // request's timeout; refused before it queues at that
                      // resource (after a wait for an earlier resource of
                      // its set, if it had to wait there)
  kLowerPriority,  // pushed out of a full queue (max_waiting) to make room
                   // for a request of a higher priority class: the newest
                   // waiter of the lowest class that has waiters goes
                   // (priority.h)
  kPending,      // still queued; the completion callback will say how it ends
};

// Number of rejection reasons, i.e. outcomes other than kGranted and kPending.
inline constexpr std::size_t kRejectionReasonCount = 10;
// A reason added to Outcome without updating the count fails to compile here
// (kPending stays last, right after the reasons).
static_assert(kRejectionReasonCount == static_cast<std::size_t>(Outcome::kPending) - 1,
              "kRejectionReasonCount must be the number of Outcome values between "
              "kGranted and kPending: update it with the enum");

// True for the outcomes that mean "turned away".
constexpr bool is_rejection(Outcome o) noexcept {
  return o != Outcome::kGranted && o != Outcome::kPending;
}

// Dense index 0..kRejectionReasonCount-1 of a rejection reason, for counters.
constexpr std::size_t rejection_index(Outcome o) noexcept {
  return static_cast<std::size_t>(o) - 1;
}

// Stable lower-case names used in errors, statistics and metrics labels:
// "granted", "timeout", "queue_full", "shed", "disconnected", "cancelled",
// "key_limit", "unavailable", "deadline", "predicted_timeout",
// "lower_priority", "pending".
std::string_view to_string(Outcome o) noexcept;

}  // namespace concurrency_limiter
