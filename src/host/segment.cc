#include "internal/host_segment.h"

#include <fcntl.h>
#include <signal.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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
  h.queue = {kNone, kNone};
  for (Process& p : s.processes) p.decided = {kNone, kNone};
  for (std::uint32_t i = 0; i < kMaxWaiters; ++i) {
    s.entries[i].prev = kNone;
    s.entries[i].next = i + 1 < kMaxWaiters ? i + 1 : kNone;
  }
  h.free_head = 0;
}

// Throws unless the header describes this layout.
void validate_layout(const Segment& s, const std::string& name) {
  const Header& h = s.header;
  const auto bad = [&](const std::string& what) {
    return std::runtime_error("host resource '" + name + "': shared segment " +
                              segment_name(name) + " is corrupt or of another "
                              "version (" + what + "); remove it with "
                              "`python -m fastapi_concurrency_limiter reset " +
                              name + "` once no process uses it");
  };
  if (h.version != kVersion) throw bad("version " + std::to_string(h.version));
  if (h.header_size != sizeof(Header) || h.total_size != sizeof(Segment) ||
      h.max_processes != kMaxProcesses || h.max_waiters != kMaxWaiters ||
      h.process_size != sizeof(Process) || h.entry_size != sizeof(Entry) ||
      h.mutex_size != sizeof(pthread_mutex_t)) {
    throw bad("layout");
  }
  const Config& c = h.config;
  if (c.capacity < 1 || c.max_waiting < -1 || c.queue > 2 || c.target_ns <= 0 ||
      c.interval_ns <= 0) {
    throw bad("configuration out of range");
  }
  try {
    SharedAlgorithm check(c);
  } catch (const std::exception& e) {
    throw bad(std::string("limit algorithm out of range: ") + e.what());
  }
  if (std::strncmp(h.name, name.c_str(), sizeof h.name) != 0) throw bad("name");
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
  }
  return false;
}

}  // namespace

bool same_config(const Config& a, const Config& b) {
  return a.capacity == b.capacity && a.max_waiting == b.max_waiting &&
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
  } else if (const auto* a = dynamic_cast<const AimdLimit*>(algorithm)) {
    l.kind = static_cast<std::uint32_t>(LimitKind::kAimd);
    l.aimd = a->options();
  } else if (const auto* f = dynamic_cast<const FixedLimit*>(algorithm)) {
    l.kind = static_cast<std::uint32_t>(LimitKind::kFixed);
    l.fixed = f->value();
  } else {
    throw std::invalid_argument(
        "limit_algorithm of a resource of scope 'host' must be a GradientLimit, "
        "AimdLimit or FixedLimit: one algorithm serves every process, so its state "
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
    default:
      throw std::invalid_argument("unknown limit algorithm kind " +
                                  std::to_string(config.limit.kind));
  }
  // Checks the options against the capacity (throws if they do not fit).
  AlgorithmState unused{.aimd = {.window = SampleWindow({}, 1)},
                        .gradient = {.window = SampleWindow({}, 1)}};
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
  }
  h.algorithm_current = current ^ 1;
}

void check_name(const std::string& name) {
  const bool ok =
      !name.empty() && name.size() <= kMaxNameLength &&
      std::all_of(name.begin(), name.end(), [](char ch) {
        return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
               (ch >= '0' && ch <= '9') || ch == '_' || ch == '-' || ch == '.';
      });
  if (!ok) {
    throw std::invalid_argument(
        "name must be 1 to 64 letters, digits, '_', '-' or '.' for scope "
        "'host', got '" + name + "'");
  }
}

std::string segment_prefix() {
  return "fcl-host." + std::to_string(::getuid()) + ".";
}

std::string segment_name(const std::string& name) {
  // Appended piecewise: GCC 12 at -O3 warns (-Wrestrict) on "/" + string.
  std::string out = "/";
  out += segment_prefix();
  out += name;
  return out;
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
  return out;
}

bool is_linked(const std::string& name, ino_t inode) {
  struct stat st {};
  return ::stat(("/dev/shm" + segment_name(name)).c_str(), &st) == 0 && st.st_ino == inode;
}

Segment* open_segment(const std::string& name, const Config* config, ino_t* inode) {
  check_name(name);
  const std::string shm = segment_name(name);
  // The algorithm's starting point, for a segment created here (throws
  // std::invalid_argument before anything is created if it does not fit).
  AlgorithmState initial_state{.aimd = {.window = SampleWindow({}, 1)},
                               .gradient = {.window = SampleWindow({}, 1)}};
  const std::int64_t initial_limit = config ? SharedAlgorithm(*config).start(initial_state) : 0;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  for (;;) {
    if (config) {
      const int fd = ::shm_open(shm.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
      if (fd >= 0) {
        // Created here: size, initialise, then publish the magic.
        if (::fchmod(fd, 0600) != 0 || ::ftruncate(fd, sizeof(Segment)) != 0) {
          const int err = errno;
          ::close(fd);
          ::shm_unlink(shm.c_str());
          throw os_error("host resource '" + name + "': cannot size " + shm, err);
        }
        struct stat created {};
        ::fstat(fd, &created);
        if (inode) *inode = created.st_ino;
        void* p = ::mmap(nullptr, sizeof(Segment), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        const int err = errno;
        ::close(fd);
        if (p == MAP_FAILED) {
          ::shm_unlink(shm.c_str());
          throw os_error("host resource '" + name + "': cannot map " + shm, err);
        }
        auto* s = static_cast<Segment*>(p);
        init_segment(*s, name, *config, initial_limit, initial_state);
        s->header.magic.store(kMagic, std::memory_order_release);
        return s;
      }
      if (errno != EEXIST) {
        throw os_error("host resource '" + name + "': cannot create " + shm, errno);
      }
    }
    const int fd = ::shm_open(shm.c_str(), O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
      if (errno == ENOENT && config) continue;  // removed meanwhile: create it
      if (errno == ENOENT) {
        throw std::runtime_error("no host resource named '" + name + "'");
      }
      throw os_error("host resource '" + name + "': cannot open " + shm, errno);
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      throw os_error("host resource '" + name + "': cannot stat " + shm, err);
    }
    if (inode) *inode = st.st_ino;
    if (st.st_uid != ::getuid() || (st.st_mode & 077) != 0) {
      ::close(fd);
      throw std::runtime_error("host resource '" + name + "': " + shm +
                               " is not private to this user (owner or mode); "
                               "refusing to use it");
    }
    if (static_cast<std::uint64_t>(st.st_size) != sizeof(Segment)) {
      ::close(fd);
      // A creator sizes it right after creating it: wait a moment for it.
      if (st.st_size == 0 && std::chrono::steady_clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        continue;
      }
      throw std::runtime_error(
          "host resource '" + name + "': shared segment " + shm + " has " +
          std::to_string(st.st_size) + " bytes, expected " +
          std::to_string(sizeof(Segment)) +
          " (corrupt, or of another version); remove it with `python -m "
          "fastapi_concurrency_limiter reset " + name + "` once no process uses it");
    }
    void* p = ::mmap(nullptr, sizeof(Segment), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    const int err = errno;
    ::close(fd);
    if (p == MAP_FAILED) {
      throw os_error("host resource '" + name + "': cannot map " + shm, err);
    }
    auto* s = static_cast<Segment*>(p);
    const std::uint64_t magic = s->header.magic.load(std::memory_order_acquire);
    if (magic != kMagic) {
      ::munmap(p, sizeof(Segment));
      if (magic == 0 && std::chrono::steady_clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        continue;  // still being initialised by its creator
      }
      throw std::runtime_error(
          "host resource '" + name + "': " + shm + " is not a host resource "
          "segment (foreign or corrupt header); remove it with `python -m "
          "fastapi_concurrency_limiter reset " + name + "` once no process uses it");
    }
    try {
      validate_layout(*s, name);
    } catch (...) {
      ::munmap(p, sizeof(Segment));
      throw;
    }
    bool retired;
    {
      SegmentLock lock(*s);
      retired = s->header.retired != 0;
    }
    if (retired) {
      // Removed by an operator after we opened it; a new one will be made.
      // (Never unmapped: another thread may be about to lock it.)
      if (!config) throw std::runtime_error("no host resource named '" + name + "'");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      continue;
    }
    if (config && !same_config(s->header.config, *config)) {
      const std::string theirs = describe(s->header.config);
      ::munmap(p, sizeof(Segment));
      throw std::invalid_argument(
          "host resource '" + name + "' already exists on this host with " +
          theirs + "; this process asks for " + describe(*config) +
          ". Use the same configuration in every process, or another name");
    }
    return s;
  }
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
  if (e.prev == kNone) {
    list.head = e.next;
  } else if (e.prev < kMaxWaiters) {
    s.entries[e.prev].next = e.next;
  } else {
    s.header.needs_rebuild = 1;
  }
  if (e.next == kNone) {
    list.tail = e.prev;
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

SegmentLock::SegmentLock(Segment& s) : s_(s) {
  const int rc = ::pthread_mutex_lock(&s.header.mutex);
  if (rc == EOWNERDEAD) {
    // Its last holder died inside: the derived state may be half-updated.
    rebuild(s);
    ::pthread_mutex_consistent(&s.header.mutex);
  } else if (rc != 0) {
    std::fprintf(stderr, "concurrency_limiter: host resource '%.64s': cannot lock its "
                 "shared mutex: %s\n", s.header.name, std::strerror(rc));
    std::abort();
  }
  if (s.header.needs_rebuild) rebuild(s);
}

SegmentLock::~SegmentLock() {
  if (s_.header.needs_rebuild) rebuild(s_);
  ::pthread_mutex_unlock(&s_.header.mutex);
}

void rebuild(Segment& s) {
  Header& h = s.header;
  ++h.repairs;
  h.needs_rebuild = 0;
  const std::int64_t capacity = std::max<std::int64_t>(h.config.capacity, 1);
  const std::int64_t limit =
      std::clamp<std::int64_t>(h.limit.load(std::memory_order_relaxed), 1, capacity);
  h.limit.store(limit, std::memory_order_relaxed);
  h.algorithm_current &= 1;  // the state itself is brought into range at each use
  std::int64_t in_use = 0;
  for (Process& p : s.processes) {
    if (p.pid <= 0) {
      p.pid = 0;
      p.held = 0;
    }
    p.held = std::clamp<std::int64_t>(p.held, 0, capacity);
    p.decided = {kNone, kNone};
    p.waiting = 0;
    in_use += p.held;
  }
  std::vector<std::uint32_t> queued, decided;
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
    if (e.state == static_cast<std::uint32_t>(EntryState::kQueued)) {
      queued.push_back(i);
    } else {
      if (e.state == static_cast<std::uint32_t>(EntryState::kGranted)) ++in_use;
      decided.push_back(i);
    }
  }
  const auto by_ticket = [&](std::uint32_t a, std::uint32_t b) {
    return s.entries[a].ticket < s.entries[b].ticket;
  };
  std::sort(queued.begin(), queued.end(), by_ticket);
  std::sort(decided.begin(), decided.end(), by_ticket);
  h.queue = {kNone, kNone};
  for (std::uint32_t i : queued) {
    push_back(s, h.queue, i);
    ++s.processes[s.entries[i].process].waiting;
  }
  for (std::uint32_t i : decided) {
    push_back(s, s.processes[s.entries[i].process].decided, i);
  }
  h.free_head = kNone;
  for (std::uint32_t i = kMaxWaiters; i-- > 0;) {
    if (s.entries[i].state == static_cast<std::uint32_t>(EntryState::kFree)) {
      s.entries[i].next = h.free_head;
      h.free_head = i;
    }
  }
  h.waiting = static_cast<std::int64_t>(queued.size());
  h.in_use = in_use;
  h.next_ticket = std::max(h.next_ticket, max_ticket + 1);
  h.above_target_since_ns = -1;
  h.peak_in_use = std::clamp<std::int64_t>(h.peak_in_use, 0, capacity);
  // A holder that died while handing a slot over leaves it free with
  // waiters queued: grant it now.
  const bool lifo = h.config.queue == static_cast<std::uint32_t>(QueueDiscipline::kLifo);
  const std::int64_t now = now_ns();
  while (h.in_use < limit && h.queue.head != kNone) {
    const std::uint32_t i = lifo ? h.queue.tail : h.queue.head;
    Entry& e = s.entries[i];
    unlink(s, h.queue, i);
    --h.waiting;
    --s.processes[e.process].waiting;
    e.state = static_cast<std::uint32_t>(EntryState::kGranted);
    e.outcome = static_cast<std::uint32_t>(Outcome::kGranted);
    e.decided_ns = now;
    push_back(s, s.processes[e.process].decided, i);
    ++h.in_use;
  }
  h.needs_rebuild = 0;
  // Every registered process looks at its decided list again.
  for (std::uint32_t p = 0; p < kMaxProcesses; ++p) {
    if (s.processes[p].pid != 0) wake_process(s, p);
  }
}

std::uint64_t start_time_of(pid_t pid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[1024];
  const ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return 0;
  buf[n] = '\0';
  // The command name (field 2) may contain anything, ')' included: fields
  // are counted after the last ')'.
  const char* p = std::strrchr(buf, ')');
  if (!p) return 0;
  ++p;
  // Field 3 is the state, field 22 the start time.
  int field = 2;
  std::uint64_t start = 0;
  char state = '?';
  while (*p && field < 22) {
    while (*p == ' ') ++p;
    ++field;
    if (field == 3) state = *p;
    if (field == 22) start = std::strtoull(p, nullptr, 10);
    while (*p && *p != ' ') ++p;
  }
  if (state == 'Z' || state == 'X' || state == 'x') return 0;
  return start;
}

bool is_dead(pid_t pid, std::uint64_t start_time) {
  if (pid <= 0) return true;
  if (::kill(pid, 0) != 0 && errno == ESRCH) return true;
  const std::uint64_t now = start_time_of(pid);
  if (now == 0) {
    // No /proc entry, or a zombie: dead, unless /proc cannot be read at all.
    return ::access("/proc/self/stat", R_OK) == 0;
  }
  return now != start_time;
}

}  // namespace concurrency_limiter::detail::host
