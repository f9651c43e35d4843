// Helpers shared by the engine tests.
#pragma once

#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "concurrency_limiter/concurrency_limiter.h"

namespace concurrency_limiter::testing {

inline std::shared_ptr<Resource> make_resource(
    std::string name, std::int64_t capacity,
    std::optional<std::int64_t> max_waiting = std::nullopt,
    QueueDiscipline queue = QueueDiscipline::kFifo) {
  return std::make_shared<Resource>(ResourceOptions{.name = std::move(name),
                                                    .capacity = capacity,
                                                    .max_waiting = max_waiting,
                                                    .queue = queue});
}

inline std::shared_ptr<const ResourceSet> set_of(
    std::vector<std::shared_ptr<Resource>> rs) {
  return std::make_shared<const ResourceSet>(std::move(rs));
}

// Records the outcomes an acquisition's callback receives.
struct Recorder {
  std::vector<Outcome> outcomes;
  Acquisition::Callback callback() {
    return [this](Outcome o) { outcomes.push_back(o); };
  }
};

// Polls `predicate` until true or ~10 s pass (a hang guard, not a timing
// assertion).
template <class Predicate>
bool eventually(Predicate predicate) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!predicate()) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return true;
}

}  // namespace concurrency_limiter::testing
