#include "concurrency_limiter/limiter.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

#include "internal/deadline.h"

namespace concurrency_limiter {
namespace {

std::string quoted_names(const std::vector<std::shared_ptr<Resource>>& rs) {
  std::string out = "[";
  for (const auto& r : rs) {
    if (out.size() > 1) out += ", ";
    out += r ? "'" + r->name() + "'" : std::string("null");
  }
  return out + "]";
}

}  // namespace

Limiter::Limiter(std::vector<std::shared_ptr<Resource>> resources,
                 Clock::duration timeout)
    : resources_(std::move(resources)), timeout_(timeout) {
  if (timeout_ < Clock::duration::zero()) {
    throw std::invalid_argument("timeout must be a number of seconds >= 0");
  }
  for (std::size_t i = 0; i < resources_.size(); ++i) {
    if (!resources_[i]) {
      throw std::invalid_argument("resources[" + std::to_string(i) +
                                  "] is null; expected a Resource");
    }
    for (std::size_t j = 0; j < i; ++j) {
      if (resources_[j] == resources_[i]) {
        throw std::invalid_argument("resource '" + resources_[i]->name() +
                                    "' is registered twice; list each "
                                    "resource once");
      }
      if (resources_[j]->name() == resources_[i]->name()) {
        throw std::invalid_argument("two resources are named '" +
                                    resources_[i]->name() +
                                    "'; resource names must be unique "
                                    "within a Limiter");
      }
    }
  }
}

std::shared_ptr<const ResourceSet> Limiter::select(
    const std::vector<std::shared_ptr<Resource>>& resources) const {
  if (resources.empty()) {
    throw std::invalid_argument(
        "resources must list at least one resource registered with the "
        "Limiter; registered: " +
        quoted_names(resources_));
  }
  std::size_t previous = 0;
  for (std::size_t i = 0; i < resources.size(); ++i) {
    const auto& r = resources[i];
    if (!r) {
      throw std::invalid_argument("resources[" + std::to_string(i) +
                                  "] is null; expected a Resource");
    }
    const auto it = std::find(resources_.begin(), resources_.end(), r);
    if (it == resources_.end()) {
      throw std::invalid_argument("resource '" + r->name() +
                                  "' is not registered with this Limiter; "
                                  "registered: " +
                                  quoted_names(resources_));
    }
    for (std::size_t j = 0; j < i; ++j) {
      if (resources[j] == r) {
        throw std::invalid_argument(
            "resource '" + r->name() +
            "' is listed twice; a request would wait for a slot it holds. "
            "List each resource once");
      }
    }
    const auto position = static_cast<std::size_t>(it - resources_.begin());
    if (i > 0 && position < previous) {
      throw std::invalid_argument(
          "resources must be listed in the Limiter's registration order " +
          quoted_names(resources_) + " so that requests cannot deadlock; got " +
          quoted_names(resources));
    }
    previous = position;
  }
  return std::make_shared<const ResourceSet>(resources);
}

Permit Limiter::acquire_for(const std::shared_ptr<const ResourceSet>& set,
                            Clock::duration timeout,
                            std::stop_token stop) const {
  Permit p;
  if (!p.take(set)) p = acquire_waiting(set, timeout, std::move(stop));
  return p;
}

Permit Limiter::acquire_for(const std::shared_ptr<const ResourceSet>& set,
                            std::optional<std::string> key,
                            Clock::duration timeout, std::stop_token stop) const {
  // The Acquisition takes free slots at once, under the resources' mutexes.
  return acquire_blocking(set, detail::deadline_after(timeout), std::move(stop),
                          std::move(key));
}

Permit Limiter::acquire_for(const std::shared_ptr<const ResourceSet>& set,
                            std::optional<std::string> key, Priority priority,
                            Clock::duration timeout, std::stop_token stop) const {
  return acquire_blocking(set, detail::deadline_after(timeout), std::move(stop),
                          std::move(key), priority);
}

Permit Limiter::acquire_waiting(const std::shared_ptr<const ResourceSet>& set,
                                Clock::duration timeout,
                                std::stop_token stop) const {
  // The clock is read only by a request that has to wait.
  return acquire_blocking(set, detail::deadline_after(timeout), std::move(stop));
}

Permit Limiter::acquire_until(const std::shared_ptr<const ResourceSet>& set,
                              Clock::time_point deadline,
                              std::stop_token stop) const {
  Permit p;
  if (!p.take(set)) p = acquire_blocking(set, deadline, std::move(stop));
  return p;
}

Permit Limiter::try_acquire(const std::shared_ptr<const ResourceSet>& set) const {
  Permit p;
  p.take(set);
  return p;
}

void Limiter::close() {
  for (const auto& r : resources_) r->close();
}

std::vector<ResourceStatistics> Limiter::statistics() const {
  std::vector<ResourceStatistics> out;
  out.reserve(resources_.size());
  for (const auto& r : resources_) out.push_back(r->statistics());
  return out;
}

}  // namespace concurrency_limiter
