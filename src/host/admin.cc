// Operators' view of this user's host resources: list and remove.
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "concurrency_limiter/host_resource.h"
#include "internal/host_segment.h"

namespace concurrency_limiter {
namespace {

namespace host = detail::host;
using host::kMaxProcesses;
using host::Segment;

// Names of this user's segments: valid names of regular files that belong
// to this user (anything else in the directory is not ours to show).
std::vector<std::string> names() {
  std::vector<std::string> out;
  const int dir = host::open_segment_dir(false);
  if (dir < 0) return out;
  DIR* listing = ::fdopendir(dir);  // takes `dir`
  if (!listing) {
    ::close(dir);
    return out;
  }
  while (const dirent* d = ::readdir(listing)) {
    const std::string file = d->d_name;
    try {
      host::check_name(file);
    } catch (const std::invalid_argument&) {
      continue;
    }
    struct stat st {};
    if (::fstatat(::dirfd(listing), file.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        S_ISREG(st.st_mode) && st.st_uid == ::getuid()) {
      out.push_back(file);
    }
  }
  ::closedir(listing);
  std::sort(out.begin(), out.end());
  return out;
}

std::string validate_config_of(const Segment& s) {
  const auto& c = s.header.config;
  try {
    host::SharedAlgorithm check(c);
  } catch (const std::exception& e) {
    return std::string("corrupt (limit algorithm out of range: ") + e.what() + ")";
  }
  return c.capacity < 1 || c.max_waiting < -1 || c.queue > 2 ? "corrupt (configuration out of range)"
                                                              : "";
}

void close_opened(const host::Opened& o) {
  if (o.segment) ::munmap(o.segment, sizeof(Segment));
  if (o.fd >= 0) ::close(o.fd);
}

}  // namespace

std::vector<HostResourceInfo> list_host_resources() {
  std::vector<HostResourceInfo> out;
  const std::uint64_t my_namespace = host::pid_namespace();
  for (const std::string& name : names()) {
    HostResourceInfo info;
    info.name = name;
    host::Opened o;
    try {
      o = host::inspect_segment(name);
    } catch (const std::exception& e) {
      info.problem = e.what();
      out.push_back(std::move(info));
      continue;
    }
    if (!o.segment) {
      info.problem = "corrupt or of another version: " + o.note;
      close_opened(o);
      out.push_back(std::move(info));
      continue;
    }
    Segment* s = o.segment;
    try {
      host::SegmentLock lock(*s);
      const auto& c = s->header.config;
      info.problem = validate_config_of(*s);
      info.capacity = c.capacity;
      if (c.max_waiting >= 0) info.max_waiting = c.max_waiting;
      info.queue = static_cast<QueueDiscipline>(c.queue);
      for (std::size_t k = 0; k < kPriorityCount; ++k) info.reserve[k] = c.reserve[k];
      info.adaptive = c.limit.kind != static_cast<std::uint32_t>(host::LimitKind::kNone);
      info.in_use = s->header.in_use;
      info.limit = std::clamp<std::int64_t>(s->header.limit.load(std::memory_order_relaxed), 1,
                                            std::max<std::int64_t>(c.capacity, 1));
      info.waiting = s->header.waiting;
      info.repairs = s->header.repairs;
      for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
        const auto& q = s->processes[p];
        if (q.pid == 0) continue;
        HostProcessInfo process{.pid = q.pid, .waiting = q.waiting};
        // As the repair would count them: adding up to the held slots.
        process.held_by_class = host::held_by_class(q, s->header.held_bound);
        for (const std::int64_t n : process.held_by_class) process.held += n;
        // Through this call's own descriptor: every registered process's
        // lock is another's, this process's own included.
        process.alive = host::liveness(o.fd, p) != host::Liveness::kDead;
        process.other_pid_namespace =
            q.pid_namespace != 0 && my_namespace != 0 && q.pid_namespace != my_namespace;
        info.processes.push_back(process);
      }
    } catch (const host::Unavailable& e) {
      info.problem = e.what();  // skipped, not waited for
      info.capacity = s->header.capacity_now.load(std::memory_order_relaxed);
    }
    close_opened(o);
    out.push_back(std::move(info));
  }
  return out;
}

void remove_host_resource(const std::string& name, bool force) {
  host::check_name(name);
  const std::string path = host::segment_path(name);
  const int dir = host::open_segment_dir(false);
  if (dir < 0) throw std::runtime_error("no host resource named '" + name + "'");
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } dir_closer{dir};
  // Who uses it, from the liveness locks: no mutex is taken, so this works
  // on a corrupt segment or one whose lock a stopped process holds.
  const int fd = ::openat(dir, name.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) throw std::runtime_error("no host resource named '" + name + "'");
  Segment* s = nullptr;
  std::string live;
  if (fd >= 0) {
    try {
      host::Opened o = host::inspect_segment(name);
      s = o.segment;
      if (o.fd >= 0) ::close(o.fd);
    } catch (const std::exception&) {
      // Not a segment of ours (mode, owner): only its removal is tried.
    }
    for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
      if (host::liveness(fd, p) != host::Liveness::kAlive) continue;
      const pid_t pid = s ? s->processes[p].pid : 0;
      live += (live.empty() ? "" : ", ") + (pid > 0 ? std::to_string(pid) : std::string("?"));
    }
    ::close(fd);
  }
  if (!live.empty() && !force) {
    if (s) ::munmap(s, sizeof(Segment));
    throw std::runtime_error("host resource '" + name +
                             "' is in use by live processes (pids " + live +
                             "); stop them first, or use --force (they then attach to a "
                             "new segment at their next request)");
  }
  if (::unlinkat(dir, name.c_str(), 0) != 0) {
    const int err = errno;
    if (s) ::munmap(s, sizeof(Segment));
    struct stat st {};
    std::string owner;
    if (::fstatat(dir, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
      owner = " (owned by uid " + std::to_string(st.st_uid) + ")";
    }
    throw std::runtime_error("host resource '" + name + "': cannot remove " + path + owner +
                             ": " + std::strerror(err));
  }
  if (s) {
    // Removed: processes that still have it open move to a new one at their
    // next operation. Set without the mutex, which may be unusable.
    s->header.retired.store(1, std::memory_order_release);
    ::munmap(s, sizeof(Segment));
  }
}

}  // namespace concurrency_limiter
