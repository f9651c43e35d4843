#include "concurrency_limiter/resource_set.h"

#include <stdexcept>
#include <utility>

namespace concurrency_limiter {

ResourceSet::ResourceSet(std::vector<std::shared_ptr<Resource>> resources)
    : resources_(std::move(resources)) {
  if (resources_.empty()) {
    throw std::invalid_argument("resources must list at least one resource");
  }
  for (std::size_t i = 0; i < resources_.size(); ++i) {
    if (!resources_[i]) {
      throw std::invalid_argument("resources[" + std::to_string(i) +
                                  "] is null; expected a Resource");
    }
  }
}

std::string ResourceSet::describe() const {
  std::string out;
  for (const auto& r : resources_) {
    if (!out.empty()) out += ", ";
    out += "'" + r->name() + "'";
  }
  return out;
}

}  // namespace concurrency_limiter
