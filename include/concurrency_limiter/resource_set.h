// ResourceSet: the resources one request needs, validated and in the order in
// which they are always acquired.
//
// Acquiring several resources in one global order is what keeps two requests
// from deadlocking each other (A holds db and waits for file while B holds
// file and waits for db). Limiter::select() builds a ResourceSet and rejects
// lists that break the order; build one directly only for a single resource.
// Immutable after construction, so it is shared freely between threads.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "concurrency_limiter/resource.h"

namespace concurrency_limiter {

class ResourceSet {
 public:
  // Throws std::invalid_argument if `resources` is empty or holds a null
  // pointer. The order is trusted: use Limiter::select() to check it.
  explicit ResourceSet(std::vector<std::shared_ptr<Resource>> resources);

  const std::vector<std::shared_ptr<Resource>>& resources() const noexcept {
    return resources_;
  }
  std::size_t size() const noexcept { return resources_.size(); }
  // "'db', 'file'": for messages.
  std::string describe() const;

 private:
  std::vector<std::shared_ptr<Resource>> resources_;
};

}  // namespace concurrency_limiter
