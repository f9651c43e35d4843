#include "internal/host_segment.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "concurrency_limiter/outcome.h"
#include "concurrency_limiter/resource.h"
#include "concurrency_limiter/statistics.h"

namespace concurrency_limiter::detail::host {
namespace {

std::runtime_error os_error(const std::string& what, int err) {
  return std::runtime_error(what + ": " + std::strerror(err));
}

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             Clock::now().time_since_epoch())
      .count();
}

void init_segment(Segment& s, const std::string& name, const Config& config,
                  std::int64_t limit, const AlgorithmState& algorithm) {
  // Fresh pages from ftruncate are zero; set what is not.
  Header& h = s.header;
  h.version = kVersion;
  h.header_size = sizeof(Header);
  h.total_size = sizeof(Segment);
  h.max_processes = kMaxProcesses;
  h.max_waiters = kMaxWaiters;
  h.process_size = sizeof(Process);
  h.entry_size = sizeof(Entry);
  h.mutex_size = sizeof(pthread_mutex_t);
  h.config = config;
  h.config_generation = 1;
  h.held_bound = config.capacity;
  h.capacity_now.store(config.capacity, std::memory_order_relaxed);
  h.max_waiting_now.store(config.max_waiting, std::memory_order_relaxed);
  h.queue_now.store(config.queue, std::memory_order_relaxed);
  std::snprintf(h.name, sizeof h.name, "%s", name.c_str());
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(&h.mutex, &attr);
  pthread_mutexattr_destroy(&attr);
  h.next_ticket = 1;
  h.next_incarnation = 1;
  h.above_target_since_ns = -1;
  h.algorithm_current = 0;
  h.algorithm[0] = algorithm;
  h.algorithm[1] = algorithm;
  h.limit.store(limit, std::memory_order_relaxed);
  for (List& q : h.queues) q = {kNone, kNone};
  for (Process& p : s.processes) p.decided = {kNone, kNone};
  for (std::uint32_t i = 0; i < kMaxWaiters; ++i) {
    s.entries[i].priority = static_cast<std::uint32_t>(priority_index(Priority::kCritical));
    s.entries[i].prev = kNone;
    s.entries[i].next = i + 1 < kMaxWaiters ? i + 1 : kNone;
  }
  h.free_head = 0;
}

// What is wrong with the configuration (read under the mutex), or "".
std::string validate_config(const Config& c) {
  if (c.capacity < 1 || c.capacity > Resource::kMaxCapacity || c.max_waiting < -1 ||
      c.queue > 2 || c.target_ns <= 0 || c.interval_ns <= 0) {
    return "corrupt (configuration out of range)";
  }
  std::int64_t reserved = 0;
  for (const std::int64_t r : c.reserve) {
    if (r < 0 || r > c.capacity) return "corrupt (reserve out of range)";
    reserved += r;
  }
  if (reserved > c.capacity || c.reserve[priority_index(Priority::kSheddable)] != 0) {
    return "corrupt (reserve out of range)";
  }
  try {
    SharedAlgorithm check(c);
  } catch (const std::exception& e) {
    return std::string("corrupt (limit algorithm out of range: ") + e.what() + ")";
  }
  return "";
}

// What is wrong with the header's layout, or "" if it describes this one.
// The configuration is not read here: it changes under the mutex.
std::string validate_layout(const Segment& s, const std::string& name) {
  const Header& h = s.header;
  const auto bad = [](const std::string& what) {
    return "corrupt or of another version (" + what + ")";
  };
  if (h.version != kVersion) return bad("version " + std::to_string(h.version));
  if (h.header_size != sizeof(Header) || h.total_size != sizeof(Segment) ||
      h.max_processes != kMaxProcesses || h.max_waiters != kMaxWaiters ||
      h.process_size != sizeof(Process) || h.entry_size != sizeof(Entry) ||
      h.mutex_size != sizeof(pthread_mutex_t)) {
    return bad("layout");
  }
  if (std::strncmp(h.name, name.c_str(), sizeof h.name) != 0) return bad("name");
  return "";
}

std::string seconds_text(Clock::duration d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", std::chrono::duration<double>(d).count());
  return buf;
}

std::string describe_limit(const LimitConfig& l) {
  char buf[128];
  switch (static_cast<LimitKind>(l.kind)) {
    case LimitKind::kNone:
      return "adaptive=False";
    case LimitKind::kFixed:
      return "adaptive=FixedLimit(" + std::to_string(l.fixed) + ")";
    case LimitKind::kAimd: {
      const AimdOptions& o = l.aimd;
      std::snprintf(buf, sizeof buf, "backoff=%g", o.backoff);
      return "adaptive=AimdLimit(min_limit=" + std::to_string(o.min_limit) +
             ", initial_limit=" + std::to_string(o.initial_limit) + ", " + buf +
             ", timeout=" + seconds_text(o.timeout) + ", window=" + seconds_text(o.window) +
             ", min_window_samples=" + std::to_string(o.min_window_samples) + ")";
    }
    case LimitKind::kGradient: {
      const GradientOptions& o = l.gradient;
      std::snprintf(buf, sizeof buf, "tolerance=%g, backoff=%g, drop_rate=%g", o.tolerance,
                    o.backoff, o.drop_rate);
      return "adaptive=GradientLimit(min_limit=" + std::to_string(o.min_limit) +
             ", initial_limit=" + std::to_string(o.initial_limit) + ", " + buf +
             ", window=" + seconds_text(o.window) +
             ", min_window_samples=" + std::to_string(o.min_window_samples) + ")";
    }
    case LimitKind::kGradient2: {
      const Gradient2Options& o = l.gradient2;
      char more[160];
      std::snprintf(buf, sizeof buf, "tolerance=%g, smoothing=%g, queue_size=%g", o.tolerance,
                    o.smoothing, o.queue_size);
      std::snprintf(more, sizeof more,
                    "smoothing_samples=%g, long_window=%g, backoff=%g, drop_rate=%g",
                    o.smoothing_samples, o.long_window, o.backoff, o.drop_rate);
      return "adaptive=Gradient2Limit(min_limit=" + std::to_string(o.min_limit) +
             ", initial_limit=" + std::to_string(o.initial_limit) + ", " + buf + ", " + more +
             ", window=" + seconds_text(o.window) +
             ", min_window_samples=" + std::to_string(o.min_window_samples) + ")";
    }
    case LimitKind::kVegas: {
      const VegasOptions& o = l.vegas;
      char more[160];
      std::snprintf(buf, sizeof buf, "alpha=%g, beta=%g, threshold=%g, min_queue=%g", o.alpha,
                    o.beta, o.threshold, o.min_queue);
      std::snprintf(more, sizeof more,
                    "smoothing=%g, smoothing_samples=%g, long_window=%g, backoff=%g, "
                    "drop_rate=%g",
                    o.smoothing, o.smoothing_samples, o.long_window, o.backoff, o.drop_rate);
      return "adaptive=VegasLimit(min_limit=" + std::to_string(o.min_limit) +
             ", initial_limit=" + std::to_string(o.initial_limit) + ", " + buf + ", " + more +
             ", window=" + seconds_text(o.window) +
             ", min_window_samples=" + std::to_string(o.min_window_samples) + ")";
    }
  }
  return "adaptive=<unknown kind " + std::to_string(l.kind) + ">";
}

bool same_limit(const LimitConfig& a, const LimitConfig& b) {
  if (a.kind != b.kind) return false;
  switch (static_cast<LimitKind>(a.kind)) {
    case LimitKind::kNone:
      return true;
    case LimitKind::kFixed:
      return a.fixed == b.fixed;
    case LimitKind::kAimd:
      return a.aimd == b.aimd;
    case LimitKind::kGradient:
      return a.gradient == b.gradient;
    case LimitKind::kGradient2:
      return a.gradient2 == b.gradient2;
    case LimitKind::kVegas:
      return a.vegas == b.vegas;
  }
  return false;
}

// Every algorithm's state, empty (below).
AlgorithmState empty_state();

}  // namespace

bool same_reserve(const Config& a, const Config& b) {
  return std::equal(std::begin(a.reserve), std::end(a.reserve), std::begin(b.reserve));
}

std::string describe_reserve(const Config& c) {
  std::string out = "reserve={";
  bool first = true;
  for (std::size_t p = 0; p < kPriorityCount; ++p) {
    if (c.reserve[p] == 0) continue;
    if (!first) out += ", ";
    first = false;
    out += std::string(to_string(static_cast<Priority>(p))) + ": " + std::to_string(c.reserve[p]);
  }
  return out + "}";
}

bool same_config(const Config& a, const Config& b) {
  return same_reserve(a, b) && a.capacity == b.capacity && a.max_waiting == b.max_waiting &&
         a.queue == b.queue &&
         (a.queue != static_cast<std::uint32_t>(QueueDiscipline::kAdaptive) ||
          (a.target_ns == b.target_ns && a.interval_ns == b.interval_ns)) &&
         same_limit(a.limit, b.limit);
}

LimitConfig limit_config_of(const LimitAlgorithm* algorithm) {
  LimitConfig l{};
  l.kind = static_cast<std::uint32_t>(LimitKind::kNone);
  if (!algorithm) return l;
  if (const auto* g = dynamic_cast<const GradientLimit*>(algorithm)) {
    l.kind = static_cast<std::uint32_t>(LimitKind::kGradient);
    l.gradient = g->options();
  } else if (const auto* g2 = dynamic_cast<const Gradient2Limit*>(algorithm)) {
    l.kind = static_cast<std::uint32_t>(LimitKind::kGradient2);
    l.gradient2 = g2->options();
  } else if (const auto* v = dynamic_cast<const VegasLimit*>(algorithm)) {
    l.kind = static_cast<std::uint32_t>(LimitKind::kVegas);
    l.vegas = v->options();
  } else if (const auto* a = dynamic_cast<const AimdLimit*>(algorithm)) {
    l.kind = static_cast<std::uint32_t>(LimitKind::kAimd);
    l.aimd = a->options();
  } else if (const auto* f = dynamic_cast<const FixedLimit*>(algorithm)) {
    l.kind = static_cast<std::uint32_t>(LimitKind::kFixed);
    l.fixed = f->value();
  } else {
    throw std::invalid_argument(
        "limit_algorithm of a resource of scope 'host' must be a Gradient2Limit, "
        "VegasLimit, GradientLimit, AimdLimit or FixedLimit: one algorithm serves "
        "every process, so its state "
        "lives in shared memory, which a custom LimitAlgorithm cannot");
  }
  return l;
}

SharedAlgorithm::SharedAlgorithm(const Config& config)
    : kind_(static_cast<LimitKind>(config.limit.kind)), capacity_(config.capacity) {
  switch (kind_) {
    case LimitKind::kNone:
      break;
    case LimitKind::kFixed:
      fixed_.emplace(config.limit.fixed);
      break;
    case LimitKind::kAimd:
      aimd_.emplace(config.limit.aimd);
      break;
    case LimitKind::kGradient:
      gradient_.emplace(config.limit.gradient);
      break;
    case LimitKind::kGradient2:
      gradient2_.emplace(config.limit.gradient2);
      break;
    case LimitKind::kVegas:
      vegas_.emplace(config.limit.vegas);
      break;
    default:
      throw std::invalid_argument("unknown limit algorithm kind " +
                                  std::to_string(config.limit.kind));
  }
  // Checks the options against the capacity (throws if they do not fit).
  AlgorithmState unused = empty_state();
  start(unused);
}

std::int64_t SharedAlgorithm::start(AlgorithmState& state) {
  std::int64_t limit = capacity_;
  switch (kind_) {
    case LimitKind::kNone:
      break;
    case LimitKind::kFixed:
      limit = fixed_->start(capacity_);
      break;
    case LimitKind::kAimd:
      limit = aimd_->start(capacity_);
      state.aimd = aimd_->state();
      break;
    case LimitKind::kGradient:
      limit = gradient_->start(capacity_);
      state.gradient = gradient_->state();
      break;
    case LimitKind::kGradient2:
      limit = gradient2_->start(capacity_);
      state.gradient2 = gradient2_->state();
      break;
    case LimitKind::kVegas:
      limit = vegas_->start(capacity_);
      state.vegas = vegas_->state();
      break;
  }
  return std::clamp<std::int64_t>(limit, 1, capacity_);
}

std::int64_t SharedAlgorithm::update(Header& h, const LimitSample& sample) noexcept {
  const std::uint32_t current = h.algorithm_current & 1;
  const AlgorithmState& from = h.algorithm[current];
  AlgorithmState& to = h.algorithm[current ^ 1];
  std::int64_t limit = h.limit.load(std::memory_order_relaxed);
  switch (kind_) {
    case LimitKind::kNone:
      return limit;
    case LimitKind::kFixed:
      // The limit it started the segment with, or the last set_limit()'s.
      return std::clamp<std::int64_t>(limit, 1, capacity_);
    case LimitKind::kAimd:
      aimd_->restore(from.aimd, capacity_, sample.end);
      limit = aimd_->update(sample);
      to.aimd = aimd_->state();
      break;
    case LimitKind::kGradient:
      gradient_->restore(from.gradient, capacity_, sample.end);
      limit = gradient_->update(sample);
      to.gradient = gradient_->state();
      break;
    case LimitKind::kGradient2:
      gradient2_->restore(from.gradient2, capacity_, sample.end);
      limit = gradient2_->update(sample);
      to.gradient2 = gradient2_->state();
      break;
    case LimitKind::kVegas:
      vegas_->restore(from.vegas, capacity_, sample.end);
      limit = vegas_->update(sample);
      to.vegas = vegas_->state();
      break;
  }
  // The commit: until this store, the committed copy is the old one.
  h.algorithm_current = current ^ 1;
  return std::clamp<std::int64_t>(limit, 1, capacity_);
}

void SharedAlgorithm::set_limit(Header& h, std::int64_t limit, Clock::time_point now) noexcept {
  const std::uint32_t current = h.algorithm_current & 1;
  const AlgorithmState& from = h.algorithm[current];
  AlgorithmState& to = h.algorithm[current ^ 1];
  switch (kind_) {
    case LimitKind::kNone:
    case LimitKind::kFixed:
      return;  // no shared state: a fixed limit stays where set_limit puts it
    case LimitKind::kAimd:
      aimd_->restore(from.aimd, capacity_, now);
      aimd_->on_set_limit(limit, now);
      to.aimd = aimd_->state();
      break;
    case LimitKind::kGradient:
      gradient_->restore(from.gradient, capacity_, now);
      gradient_->on_set_limit(limit, now);
      to.gradient = gradient_->state();
      break;
    case LimitKind::kGradient2:
      gradient2_->restore(from.gradient2, capacity_, now);
      gradient2_->on_set_limit(limit, now);
      to.gradient2 = gradient2_->state();
      break;
    case LimitKind::kVegas:
      vegas_->restore(from.vegas, capacity_, now);
      vegas_->on_set_limit(limit, now);
      to.vegas = vegas_->state();
      break;
  }
  h.algorithm_current = current ^ 1;
}

void check_name(const std::string& name) {
  const bool ok =
      !name.empty() && name.size() <= kMaxNameLength &&
      std::all_of(name.begin(), name.end(), [](char ch) {
        return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
               (ch >= '0' && ch <= '9') || ch == '_' || ch == '-' || ch == '.';
      }) &&
      !std::all_of(name.begin(), name.end(), [](char ch) { return ch == '.'; });
  if (!ok) {
    throw std::invalid_argument(
        "name must be 1 to 64 letters, digits, '_', '-' or '.' (not dots only) for "
        "scope 'host', got '" + name + "'");
  }
}

namespace {

const char* custom_dir() {
  const char* dir = std::getenv("FCL_HOST_DIR");
  return dir && *dir ? dir : nullptr;
}

struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

// Opens `name` in `dir`: its descriptor, or -1 if there is none. Throws
// unless it is a regular file private to this user.
int open_file(int dir, const std::string& name, struct stat& st) {
  const int fd = ::openat(dir, name.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return -1;
    throw os_error("host resource '" + name + "': cannot open " + segment_path(name), errno);
  }
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw os_error("host resource '" + name + "': cannot stat " + segment_path(name), err);
  }
  if (!S_ISREG(st.st_mode) || st.st_uid != ::getuid() || (st.st_mode & 077) != 0) {
    ::close(fd);
    char mode[8];
    std::snprintf(mode, sizeof mode, "%03o", static_cast<unsigned>(st.st_mode & 0777));
    throw std::runtime_error("host resource '" + name + "': " + segment_path(name) +
                             " is not a file private to this user (owner uid " +
                             std::to_string(st.st_uid) + ", mode " + mode +
                             "); refusing to use it");
  }
  return fd;
}

// Maps the segment open as `fd` if it is a valid one of this layout; null
// otherwise, with what is wrong in `problem`.
Segment* map_valid(int fd, const struct stat& st, const std::string& name,
                   std::string& problem) {
  if (static_cast<std::uint64_t>(st.st_size) != sizeof(Segment)) {
    problem = "of " + std::to_string(st.st_size) + " bytes, expected " +
              std::to_string(sizeof(Segment)) + " (corrupt, or of another version)";
    return nullptr;
  }
  void* p = ::mmap(nullptr, sizeof(Segment), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    throw os_error("host resource '" + name + "': cannot map " + segment_path(name), errno);
  }
  auto* s = static_cast<Segment*>(p);
  if (s->header.magic.load(std::memory_order_acquire) != kMagic) {
    problem = "not a host resource segment (foreign or corrupt header)";
  } else {
    problem = validate_layout(*s, name);
  }
  if (!problem.empty()) {
    ::munmap(p, sizeof(Segment));
    return nullptr;
  }
  return s;
}

// Removes `name` from `dir` if it is still the file with `inode`.
void unlink_if_same(int dir, const std::string& name, ino_t inode) {
  struct stat st {};
  if (::fstatat(dir, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && st.st_ino == inode) {
    ::unlinkat(dir, name.c_str(), 0);
  }
}

AlgorithmState empty_state() {
  return AlgorithmState{.aimd = {.window = SampleWindow({}, 1)},
                        .gradient = {.window = SampleWindow({}, 1)},
                        .gradient2 = Gradient2Limit().state(),
                        .vegas = VegasLimit().state()};
}

// Builds a complete segment under no name, then links it into `dir` as
// `name`, so that nobody ever sees a half-made one. Returns it, or an empty
// Opened if `name` exists already (another process linked first).
Opened create_linked(int dir, const std::string& name, const Config& config) {
  AlgorithmState state = empty_state();
  const std::int64_t limit = SharedAlgorithm(config).start(state);
  std::string temp;  // where O_TMPFILE is not supported
  int fd = ::openat(dir, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
    static std::atomic<unsigned> counter{0};
    // '~' is not allowed in names: never taken for a segment by anyone.
    // Appended piecewise: GCC 12 at -O3 warns (-Wrestrict) on "~" + string.
    temp = "~";
    temp += std::to_string(::getpid());
    temp += '.';
    temp += std::to_string(++counter);
    temp += '.';
    temp += name;
    fd = ::openat(dir, temp.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  }
  if (fd < 0) {
    throw os_error("host resource '" + name + "': cannot create " + segment_path(name), errno);
  }
  void* p = MAP_FAILED;
  const auto fail = [&](const char* what, int err) {
    if (p != MAP_FAILED) ::munmap(p, sizeof(Segment));
    ::close(fd);
    if (!temp.empty()) ::unlinkat(dir, temp.c_str(), 0);
    return os_error("host resource '" + name + "': cannot " + what + " " + segment_path(name), err);
  };
  if (::fchmod(fd, 0600) != 0 || ::ftruncate(fd, sizeof(Segment)) != 0) throw fail("size", errno);
  p = ::mmap(nullptr, sizeof(Segment), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) throw fail("map", errno);
  auto* s = static_cast<Segment*>(p);
  init_segment(*s, name, config, limit, state);
  s->header.magic.store(kMagic, std::memory_order_release);
  // From here on it is visible, and complete.
  int rc;
  if (temp.empty()) {
    char self[64];
    std::snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
    rc = ::linkat(AT_FDCWD, self, dir, name.c_str(), AT_SYMLINK_FOLLOW);
  } else {
    rc = ::linkat(dir, temp.c_str(), dir, name.c_str(), 0);
  }
  const int err = errno;
  if (rc != 0) {
    if (err == EEXIST) {
      ::munmap(p, sizeof(Segment));
      ::close(fd);
      if (!temp.empty()) ::unlinkat(dir, temp.c_str(), 0);
      return {};
    }
    throw fail("link", err);
  }
  if (!temp.empty()) ::unlinkat(dir, temp.c_str(), 0);
  struct stat st {};
  ::fstat(fd, &st);
  Opened out;
  out.segment = s;
  out.fd = fd;
  out.inode = st.st_ino;
  return out;
}

// The kind field of a mutex made as init_segment() makes it.
int mutex_kind() {
  static const int kind = [] {
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_t m;
    pthread_mutex_init(&m, &attr);
    const int k = m.__data.__kind;
    pthread_mutex_destroy(&m);
    pthread_mutexattr_destroy(&attr);
    return k;
  }();
  return kind;
}

// The previous release kept segments at /dev/shm/fcl-host.<uid>.<name>,
// with no liveness locks. A process still mapping it (a worker of the old
// release during a rolling upgrade) shows in /proc/PID/maps: then the two
// releases cannot share one limit, and opening is refused; otherwise the
// file is removed. Returns what was done, for the log ("" if nothing).
std::string retire_previous_release(const std::string& name) {
  std::string flat = "/dev/shm/fcl-host.";
  flat += std::to_string(::getuid());
  flat += '.';
  flat += name;
  struct stat st {};
  if (::lstat(flat.c_str(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::getuid()) {
    return "";
  }
  std::string users;
  if (DIR* proc = ::opendir("/proc")) {
    while (const dirent* d = ::readdir(proc)) {
      if (d->d_name[0] < '1' || d->d_name[0] > '9') continue;
      const std::string maps = std::string("/proc/") + d->d_name + "/maps";
      std::FILE* f = std::fopen(maps.c_str(), "re");
      if (!f) continue;  // gone, or another user's
      char line[4096];
      bool uses = false;
      while (!uses && std::fgets(line, sizeof line, f)) {
        const char* path = std::strchr(line, '/');
        if (!path) continue;
        const std::size_t n = std::strcspn(path, "\n");
        uses = std::string(path, n).rfind(flat, 0) == 0;
      }
      std::fclose(f);
      if (uses) users += (users.empty() ? "" : ", ") + std::string(d->d_name);
    }
    ::closedir(proc);
  }
  if (!users.empty()) {
    throw std::runtime_error(
        "host resource '" + name + "': " + flat +
        " belongs to an older release of fastapi-concurrency-limiter, still used by pids " +
        users + "; the two releases cannot share one limit: stop those processes first (a "
        "restart, not a rolling reload, across this upgrade)");
  }
  ::unlink(flat.c_str());
  return "host resource '" + name + "': removed " + flat +
         ", left by an older release and used by no process";
}

std::string header_name(const Header& h) {
  return std::string(h.name, ::strnlen(h.name, sizeof h.name));
}

}  // namespace

std::string segment_dir() {
  if (const char* dir = custom_dir()) return dir;
  return "/dev/shm/fcl-host." + std::to_string(::getuid());
}

std::string segment_path(const std::string& name) {
  // Appended piecewise: GCC 12 at -O3 warns (-Wrestrict) on "/" + string.
  std::string out = segment_dir();
  out += '/';
  out += name;
  return out;
}

int open_segment_dir(bool create) {
  const std::string dir = segment_dir();
  const bool custom = custom_dir() != nullptr;
  if (create && !custom && ::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    throw os_error("host scope: cannot create the directory " + dir, errno);
  }
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  const std::string fix =
      "; remove it (it may take root), or set FCL_HOST_DIR to a directory that only this "
      "user can write, such as $XDG_RUNTIME_DIR";
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT && !create) return -1;
    if (err == ELOOP || err == ENOTDIR) {
      throw std::runtime_error("host scope: " + dir +
                               " is a symbolic link or not a directory; refusing to use it" +
                               fix);
    }
    struct stat st {};
    if (::lstat(dir.c_str(), &st) == 0 && st.st_uid != ::getuid()) {
      // Typically EACCES: another user's private directory.
      throw std::runtime_error("host scope: the directory " + dir + " belongs to uid " +
                               std::to_string(st.st_uid) + ", not to this user (uid " +
                               std::to_string(::getuid()) + "): another user created it first (" +
                               std::strerror(err) + ")" + fix);
    }
    throw os_error("host scope: cannot open the directory " + dir, err);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw os_error("host scope: cannot stat the directory " + dir, err);
  }
  if (st.st_uid != ::getuid()) {
    ::close(fd);
    throw std::runtime_error("host scope: the directory " + dir + " belongs to uid " +
                             std::to_string(st.st_uid) + ", not to this user (uid " +
                             std::to_string(::getuid()) +
                             "): another user created it first" + fix);
  }
  if ((st.st_mode & 077) != 0) {
    // Ours: the default directory is made private again; a directory the
    // user chose is refused if others can write in it.
    if (custom ? (st.st_mode & 022) != 0 : ::fchmod(fd, 0700) != 0) {
      ::close(fd);
      throw std::runtime_error("host scope: the directory " + dir +
                               " is writable by other users; refusing to use it" + fix);
    }
  }
  return fd;
}

std::string reserve_mismatch(const std::string& name, const Config& theirs,
                             const Config& ours) {
  return "reserve of host resource '" + name + "' must be the same in every process that uses "
         "it: the processes using it have " + describe_reserve(theirs) + ", this one asks for " +
         describe_reserve(ours) + " (stop them, or pass the same reserve)";
}

std::string describe(const Config& c) {
  std::string out = "capacity=" + std::to_string(c.capacity) + ", max_waiting=" +
                    (c.max_waiting < 0 ? std::string("None")
                                       : std::to_string(c.max_waiting)) +
                    ", queue=" +
                    std::string(to_string(static_cast<QueueDiscipline>(c.queue)));
  if (c.queue == static_cast<std::uint32_t>(QueueDiscipline::kAdaptive)) {
    out += ", adaptive_target=" + std::to_string(c.target_ns / 1e9) +
           ", adaptive_interval=" + std::to_string(c.interval_ns / 1e9);
  }
  out += ", " + describe_limit(c.limit);
  if (has_reserve(c)) out += ", " + describe_reserve(c);
  return out;
}

bool is_linked(const std::string& name, ino_t inode) {
  struct stat st {};
  if (::stat(segment_path(name).c_str(), &st) == 0) return st.st_ino == inode;
  return errno != ENOENT && errno != ENOTDIR;  // only proof counts
}

bool lock_slot(int fd, std::uint32_t slot) noexcept {
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = kLockBase + slot;
  fl.l_len = 1;
  return fd >= 0 && ::fcntl(fd, F_OFD_SETLK, &fl) == 0;
}

void unlock_slot(int fd, std::uint32_t slot) noexcept {
  struct flock fl {};
  fl.l_type = F_UNLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = kLockBase + slot;
  fl.l_len = 1;
  if (fd >= 0) ::fcntl(fd, F_OFD_SETLK, &fl);
}

namespace {

Liveness probe(int fd, off_t start, off_t len) noexcept {
  if (fd < 0) return Liveness::kUnknown;
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = len;
  if (::fcntl(fd, F_OFD_GETLK, &fl) != 0) return Liveness::kUnknown;
  return fl.l_type == F_UNLCK ? Liveness::kDead : Liveness::kAlive;
}

}  // namespace

Liveness liveness(int fd, std::uint32_t slot) noexcept { return probe(fd, kLockBase + slot, 1); }

Liveness any_alive(int fd) noexcept { return probe(fd, kLockBase, kMaxProcesses); }

std::uint64_t pid_namespace() noexcept {
  struct stat st {};
  return ::stat("/proc/self/ns/pid", &st) == 0 ? static_cast<std::uint64_t>(st.st_ino) : 0;
}

void install_config(Segment& s, const Config& config) {
  AlgorithmState state = empty_state();
  const std::int64_t limit = SharedAlgorithm(config).start(state);  // may throw: first
  Header& h = s.header;
  h.config = config;
  ++h.config_generation;
  h.held_bound = std::clamp<std::int64_t>(std::max(h.held_bound, config.capacity), 1,
                                          Resource::kMaxCapacity);
  h.capacity_now.store(config.capacity, std::memory_order_relaxed);
  h.max_waiting_now.store(config.max_waiting, std::memory_order_relaxed);
  h.queue_now.store(config.queue, std::memory_order_relaxed);
  h.algorithm[0] = state;
  h.algorithm[1] = state;
  h.algorithm_current = 0;
  h.above_target_since_ns = -1;
  h.limit.store(std::clamp<std::int64_t>(limit, 1, config.capacity), std::memory_order_relaxed);
}

Opened open_segment(const std::string& name, const Config& config, Adopt adopt) {
  check_name(name);
  SharedAlgorithm check(config);  // std::invalid_argument before anything is made
  const int dir = open_segment_dir(true);
  FdCloser dir_closer{dir};
  const std::string path = segment_path(name);
  std::string replaced = retire_previous_release(name);
  for (int attempt = 0;; ++attempt) {
    if (attempt == 100) {
      throw std::runtime_error("host resource '" + name + "': " + path +
                               " keeps being replaced while this process opens it");
    }
    struct stat st {};
    const int fd = open_file(dir, name, st);
    if (fd < 0) {
      Opened created = create_linked(dir, name, config);
      if (!created.segment) continue;  // another process linked one first: use it
      created.note = replaced;
      return created;
    }
    std::string problem;
    Segment* s = nullptr;
    try {
      s = map_valid(fd, st, name, problem);
    } catch (...) {
      ::close(fd);
      throw;
    }
    Opened out;
    out.segment = s;
    out.fd = fd;
    out.inode = st.st_ino;
    bool retired = false;
    std::string mismatch;  // reserves other than those of the live processes
    if (s && s->header.retired.load(std::memory_order_acquire) != 0) {
      problem = "retired by an operator's reset";
      retired = true;
    }
    if (s && problem.empty()) {
      try {
        SegmentLock lock(*s);
        const std::string bad_config = validate_config(s->header.config);
        if (!bad_config.empty()) {
          // Garbage where the configuration should be: this one replaces it.
          install_config(*s, config);
          out.note = "host resource '" + name + "': " + bad_config + " replaced by " +
                     describe(config);
          out.others_alive = true;
        } else if (adopt == Adopt::kNewestWins && !same_reserve(s->header.config, config) &&
                   any_alive(fd) != Liveness::kDead) {
          // Reserves are not a setting the newest may change under the
          // others: each process grants by them.
          mismatch = reserve_mismatch(name, s->header.config, config);
        } else if (!same_config(s->header.config, config) && adopt == Adopt::kNewestWins) {
          const std::string theirs = describe(s->header.config);
          // Nobody's lock is this process's yet: every live one is another's.
          out.others_alive = any_alive(fd) == Liveness::kAlive;
          install_config(*s, config);
          out.note = "host resource '" + name + "': configuration " + theirs + " replaced by " +
                     describe(config) +
                     (out.others_alive
                          ? " (newest wins: the processes using it follow the new one; "
                            "slots they hold stay held)"
                          : " (no live process used it)");
        }
      } catch (const Unavailable& e) {
        if (e.corrupt()) {
          problem = e.what();
        } else {
          // Held by a process stopped inside the lock: attach anyway; every
          // operation is refused as unavailable until the lock comes back.
          out.note = std::string(e.what()) + "; configuration not compared";
          out.others_alive = true;
        }
      }
      if (!mismatch.empty()) {
        ::munmap(s, sizeof(Segment));
        ::close(fd);
        throw std::invalid_argument(mismatch);
      }
      if (problem.empty()) {
        if (out.note.empty()) out.note = replaced;
        return out;
      }
      ::munmap(s, sizeof(Segment));  // never locked by this process's other threads
    }
    // Corrupt or of another version: replaced when no live process uses
    // it. Retired: an operator removed it already, whoever still has it.
    if (!retired && any_alive(fd) != Liveness::kDead) {
      ::close(fd);
      throw std::runtime_error(
          "host resource '" + name + "': " + path + " is " + problem +
          ", and a live process still uses it; stop the processes that use it, or remove it "
          "with `python -m fastapi_concurrency_limiter reset --force " + name + "`");
    }
    unlink_if_same(dir, name, st.st_ino);
    ::close(fd);
    replaced = "host resource '" + name + "': replaced " + path + ", which was " + problem +
               " and used by no live process";
  }
}

Opened inspect_segment(const std::string& name) {
  check_name(name);
  const int dir = open_segment_dir(false);
  if (dir < 0) throw std::runtime_error("no host resource named '" + name + "'");
  FdCloser dir_closer{dir};
  struct stat st {};
  const int fd = open_file(dir, name, st);
  if (fd < 0) throw std::runtime_error("no host resource named '" + name + "'");
  Opened out;
  out.fd = fd;
  out.inode = st.st_ino;
  try {
    out.segment = map_valid(fd, st, name, out.note);
  } catch (...) {
    ::close(fd);
    throw;
  }
  return out;
}

void push_back(Segment& s, List& list, std::uint32_t i) {
  Entry& e = s.entries[i];
  e.next = kNone;
  e.prev = list.tail;
  if (list.tail == kNone) {
    list.head = i;
  } else if (list.tail < kMaxWaiters) {
    s.entries[list.tail].next = i;
  } else {
    s.header.needs_rebuild = 1;
    e.prev = kNone;
    list.head = i;
  }
  list.tail = i;
}

void unlink(Segment& s, List& list, std::uint32_t i) {
  Entry& e = s.entries[i];
  // An end of `list` that is not `i`: the entry is in another list (its
  // class overwritten, say): `list` is left alone, and the rebuild puts
  // every entry back where its primary fields say.
  if (e.prev == kNone) {
    if (list.head == i) {
      list.head = e.next;
    } else {
      s.header.needs_rebuild = 1;
    }
  } else if (e.prev < kMaxWaiters) {
    s.entries[e.prev].next = e.next;
  } else {
    s.header.needs_rebuild = 1;
  }
  if (e.next == kNone) {
    if (list.tail == i) {
      list.tail = e.prev;
    } else {
      s.header.needs_rebuild = 1;
    }
  } else if (e.next < kMaxWaiters) {
    s.entries[e.next].prev = e.prev;
  } else {
    s.header.needs_rebuild = 1;
  }
  if (list.head != kNone && list.head >= kMaxWaiters) {
    list.head = kNone;
    s.header.needs_rebuild = 1;
  }
  if (list.tail != kNone && list.tail >= kMaxWaiters) {
    list.tail = kNone;
    s.header.needs_rebuild = 1;
  }
  e.prev = e.next = kNone;
}

void wake_process(Segment& s, std::uint32_t p) noexcept {
  if (p >= kMaxProcesses) return;
  std::atomic<std::uint32_t>& word = s.processes[p].futex;
  word.fetch_add(1, std::memory_order_release);
  // Shared futex (no FUTEX_PRIVATE_FLAG): the waiter is another process.
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE, 1,
            nullptr, nullptr, 0);
}

SegmentLock::SegmentLock(Segment& s, std::chrono::nanoseconds wait) : s_(s) {
  // CLOCK_REALTIME, as pthread_mutex_timedlock wants: a clock step changes
  // the bound, nothing else.
  timespec deadline{};
  ::clock_gettime(CLOCK_REALTIME, &deadline);
  const auto ns = static_cast<std::int64_t>(deadline.tv_nsec) + wait.count();
  deadline.tv_sec += static_cast<time_t>(ns / 1'000'000'000);
  deadline.tv_nsec = static_cast<long>(ns % 1'000'000'000);
  // A mutex of another kind than the one made here is garbage: given to
  // glibc, some kinds abort the process (priority inheritance with a dead
  // owner), others fail with EINVAL.
  if (s.header.mutex.__data.__kind != mutex_kind()) {
    throw Unavailable("host resource '" + header_name(s.header) +
                          "': its shared lock is corrupt (unknown kind); remove it with "
                          "`python -m fastapi_concurrency_limiter reset --force " +
                          header_name(s.header) + "`",
                      true);
  }
  // The uncontended case without the clock's deadline; then a bounded wait.
  int rc = ::pthread_mutex_trylock(&s.header.mutex);
  if (rc == EBUSY) {
    rc = ::pthread_mutex_timedlock(&s.header.mutex, &deadline);
#if defined(__SANITIZE_THREAD__)
    // ThreadSanitizer counts an EOWNERDEAD return of trylock and lock as
    // locked, but not of timedlock: told here.
    if (rc == EOWNERDEAD) {
      __tsan_mutex_pre_lock(&s.header.mutex, 0);
      __tsan_mutex_post_lock(&s.header.mutex, 0, 0);
    }
#endif
  }
  if (rc == EOWNERDEAD) {
    // Its last holder died inside: the derived state may be half-updated.
    rebuild(s);
    ::pthread_mutex_consistent(&s.header.mutex);
    rc = 0;
  }
  if (rc == ETIMEDOUT) {
    throw Unavailable("host resource '" + header_name(s.header) +
                          "': its shared lock was not released within " +
                          std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(wait).count()) +
                          " ms (a process stopped or hung while holding it?)",
                      false);
  } else if (rc != 0) {
    throw Unavailable("host resource '" + header_name(s.header) +
                          "': its shared lock is unusable (" + std::strerror(rc) +
                          "): the segment is corrupt; remove it with `python -m "
                          "fastapi_concurrency_limiter reset --force " +
                          header_name(s.header) + "`",
                      true);
  }
  if (s.header.needs_rebuild) rebuild(s);
}

SegmentLock::~SegmentLock() {
  if (s_.header.needs_rebuild) rebuild(s_);
  ::pthread_mutex_unlock(&s_.header.mutex);
}

void rebuild(Segment& s) noexcept {
  Header& h = s.header;
  ++h.repairs;
  h.needs_rebuild = 0;
  const std::int64_t capacity =
      std::clamp<std::int64_t>(h.config.capacity, 1, Resource::kMaxCapacity);
  h.held_bound = std::clamp<std::int64_t>(h.held_bound, capacity, Resource::kMaxCapacity);
  const std::int64_t limit =
      std::clamp<std::int64_t>(h.limit.load(std::memory_order_relaxed), 1, capacity);
  h.limit.store(limit, std::memory_order_relaxed);
  h.algorithm_current &= 1;  // the state itself is brought into range at each use
  std::int64_t in_use = 0;
  const std::size_t critical = priority_index(Priority::kCritical);
  for (std::int64_t& n : h.class_in_use) n = 0;
  for (Process& p : s.processes) {
    if (p.pid <= 0) {
      p.pid = 0;
      p.held = 0;
    }
    p.held = std::clamp<std::int64_t>(p.held, 0, h.held_bound);
    p.decided = {kNone, kNone};
    p.waiting = 0;
    in_use += p.held;
    // Each class's count in range, together at most what the process holds
    // (kCritical's is the rest).
    const std::array<std::int64_t, kPriorityCount> classes = held_by_class(p, p.held);
    for (std::size_t c = 0; c < kPriorityCount; ++c) {
      p.class_held[c] = c == critical ? 0 : classes[c];
      if (c != critical) h.class_in_use[c] += classes[c];
    }
  }
  // On the stack, not the heap: this runs with the mutex held, where an
  // allocation failure would leave it locked for good.
  std::array<std::uint32_t, kMaxWaiters> queued, decided;
  std::size_t n_queued = 0, n_decided = 0;
  std::uint64_t max_ticket = 0;
  for (std::uint32_t i = 0; i < kMaxWaiters; ++i) {
    Entry& e = s.entries[i];
    e.prev = e.next = kNone;
    bool keep = e.state == static_cast<std::uint32_t>(EntryState::kQueued) ||
                e.state == static_cast<std::uint32_t>(EntryState::kGranted) ||
                e.state == static_cast<std::uint32_t>(EntryState::kRejected);
    keep = keep && e.process < kMaxProcesses && s.processes[e.process].pid != 0 &&
           s.processes[e.process].incarnation == e.incarnation;
    if (!keep) {
      e.state = static_cast<std::uint32_t>(EntryState::kFree);
      continue;
    }
    max_ticket = std::max(max_ticket, e.ticket);
    e.priority = static_cast<std::uint32_t>(class_of(e));
    if (e.state == static_cast<std::uint32_t>(EntryState::kQueued)) {
      queued[n_queued++] = i;
    } else {
      if (e.state == static_cast<std::uint32_t>(EntryState::kGranted)) {
        ++in_use;
        if (class_of(e) != critical) ++h.class_in_use[class_of(e)];
      }
      decided[n_decided++] = i;
    }
  }
  const auto by_ticket = [&](std::uint32_t a, std::uint32_t b) {
    return s.entries[a].ticket < s.entries[b].ticket;
  };
  std::sort(queued.begin(), queued.begin() + static_cast<std::ptrdiff_t>(n_queued), by_ticket);
  std::sort(decided.begin(), decided.begin() + static_cast<std::ptrdiff_t>(n_decided), by_ticket);
  for (List& q : h.queues) q = {kNone, kNone};
  for (std::size_t k = 0; k < n_queued; ++k) {
    push_back(s, queue_of(s, s.entries[queued[k]]), queued[k]);
    ++s.processes[s.entries[queued[k]].process].waiting;
  }
  for (std::size_t k = 0; k < n_decided; ++k) {
    push_back(s, s.processes[s.entries[decided[k]].process].decided, decided[k]);
  }
  h.free_head = kNone;
  for (std::uint32_t i = kMaxWaiters; i-- > 0;) {
    if (s.entries[i].state == static_cast<std::uint32_t>(EntryState::kFree)) {
      s.entries[i].next = h.free_head;
      h.free_head = i;
    }
  }
  h.waiting = static_cast<std::int64_t>(n_queued);
  h.in_use = in_use;
  h.next_ticket = std::max(h.next_ticket, max_ticket + 1);
  h.above_target_since_ns = -1;
  h.peak_in_use = std::clamp<std::int64_t>(h.peak_in_use, 0, h.held_bound);
  // A holder that died while handing a slot over leaves it free with
  // waiters queued: grant it now, highest class first.
  const bool lifo = h.config.queue == static_cast<std::uint32_t>(QueueDiscipline::kLifo);
  const std::int64_t now = now_ns();
  // Reserves: the highest class waiting only if it may take the slot.
  for (int top = highest_class_may_take(h, limit); h.in_use < limit && top >= 0;
       top = highest_class_may_take(h, limit)) {
    List& q = h.queues[static_cast<std::size_t>(top)];
    const std::uint32_t i = lifo ? q.tail : q.head;
    Entry& e = s.entries[i];
    unlink(s, q, i);
    --h.waiting;
    --s.processes[e.process].waiting;
    e.state = static_cast<std::uint32_t>(EntryState::kGranted);
    e.outcome = static_cast<std::uint32_t>(Outcome::kGranted);
    e.decided_ns = now;
    push_back(s, s.processes[e.process].decided, i);
    ++h.in_use;
    if (class_of(e) != critical) ++h.class_in_use[class_of(e)];
  }
  h.needs_rebuild = 0;
  // Every registered process looks at its decided list again.
  for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
    if (s.processes[p].pid != 0) wake_process(s, p);
  }
}

}  // namespace concurrency_limiter::detail::host
