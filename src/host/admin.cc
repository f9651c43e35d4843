// Operators' view of this user's host resources: list and remove.
#include <dirent.h>
#include <sys/mman.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "concurrency_limiter/host_resource.h"
#include "internal/host_segment.h"

namespace concurrency_limiter {
namespace {

using detail::host::kMaxProcesses;
using detail::host::Segment;
using detail::host::SegmentLock;

std::vector<std::string> names() {
  std::vector<std::string> out;
  const std::string prefix = detail::host::segment_prefix();
  if (DIR* dir = ::opendir("/dev/shm")) {
    while (const dirent* d = ::readdir(dir)) {
      const std::string file = d->d_name;
      if (file.size() > prefix.size() && file.compare(0, prefix.size(), prefix) == 0) {
        out.push_back(file.substr(prefix.size()));
      }
    }
    ::closedir(dir);
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

std::vector<HostResourceInfo> list_host_resources() {
  std::vector<HostResourceInfo> out;
  for (const std::string& name : names()) {
    HostResourceInfo info;
    info.name = name;
    Segment* s = nullptr;
    try {
      s = detail::host::open_segment(name, nullptr);
    } catch (const std::exception&) {
      out.push_back(std::move(info));  // unreadable: capacity 0
      continue;
    }
    const auto& c = s->header.config;
    info.capacity = c.capacity;
    if (c.max_waiting >= 0) info.max_waiting = c.max_waiting;
    info.queue = static_cast<QueueDiscipline>(c.queue);
    info.adaptive = c.limit.kind != static_cast<std::uint32_t>(detail::host::LimitKind::kNone);
    std::vector<std::uint64_t> start_times;
    {
      SegmentLock lock(*s);
      info.in_use = s->header.in_use;
      info.limit = std::clamp<std::int64_t>(s->header.limit.load(std::memory_order_relaxed), 1,
                                            std::max<std::int64_t>(c.capacity, 1));
      info.waiting = s->header.waiting;
      info.repairs = s->header.repairs;
      for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
        const auto& q = s->processes[p];
        if (q.pid != 0) {
          info.processes.push_back(HostProcessInfo{q.pid, q.held, q.waiting, true});
          start_times.push_back(q.start_time);
        }
      }
    }
    // /proc is read after the lock is released.
    for (std::size_t k = 0; k < start_times.size(); ++k) {
      info.processes[k].alive = !detail::host::is_dead(info.processes[k].pid, start_times[k]);
    }
    ::munmap(s, sizeof(Segment));  // locked and unlocked by this thread only
    out.push_back(std::move(info));
  }
  return out;
}

void remove_host_resource(const std::string& name) {
  detail::host::check_name(name);
  Segment* s = nullptr;
  try {
    s = detail::host::open_segment(name, nullptr);
  } catch (const std::invalid_argument&) {
    throw;
  } catch (const std::runtime_error& e) {
    // A corrupt or foreign segment cannot be used by anyone: remove it.
    if (std::string(e.what()).find("no host resource named") != std::string::npos) throw;
    ::shm_unlink(detail::host::segment_name(name).c_str());
    return;
  }
  std::string live;
  {
    SegmentLock lock(*s);
    for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
      const auto& q = s->processes[p];
      if (q.pid != 0 && !detail::host::is_dead(q.pid, q.start_time)) {
        live += (live.empty() ? "" : ", ") + std::to_string(q.pid);
      }
    }
    // Retired under the lock: a process that opened it meanwhile opens a
    // new one instead of registering here.
    if (live.empty()) s->header.retired = 1;
  }
  ::munmap(s, sizeof(Segment));
  if (!live.empty()) {
    throw std::runtime_error("host resource '" + name + "' is in use by live processes (pids " +
                             live + "); stop them first");
  }
  ::shm_unlink(detail::host::segment_name(name).c_str());
}

}  // namespace concurrency_limiter
