#include "concurrency_limiter/resource.h"

#include <algorithm>
#include <cassert>
#include <cstdio>
#include <cstdlib>
#include <atomic>
#include <stdexcept>
#include <string>
#include <utility>

#include "concurrency_limiter/permit.h"
#include "concurrency_limiter/resource_set.h"
#include "internal/deadline.h"
#include "internal/host_pool.h"
#include "internal/test_hooks.h"

namespace concurrency_limiter {
namespace {

using State = detail::WaiterNode::State;

std::string generated_name() {
  static std::atomic<std::uint64_t> counter{0};
  return "resource-" +
         std::to_string(counter.fetch_add(1, std::memory_order_relaxed) + 1);
}

ResourceOptions validated(ResourceOptions o) {
  if (o.capacity < 1) {
    throw std::invalid_argument("capacity must be an integer >= 1, got " +
                                std::to_string(o.capacity));
  }
  if (o.capacity > Resource::kMaxCapacity) {
    throw std::invalid_argument("capacity must be an integer <= " +
                                std::to_string(Resource::kMaxCapacity) +
                                ", got " + std::to_string(o.capacity));
  }
  if (o.max_waiting && *o.max_waiting < 0) {
    throw std::invalid_argument(
        "max_waiting must be an integer >= 0, or None for an unbounded "
        "queue, got " +
        std::to_string(*o.max_waiting));
  }
  if (o.adaptive_target <= Clock::duration::zero()) {
    throw std::invalid_argument("adaptive_target must be > 0 seconds");
  }
  if (o.adaptive_interval <= Clock::duration::zero()) {
    throw std::invalid_argument("adaptive_interval must be > 0 seconds");
  }
  if (o.scope == Scope::kHost && o.name.empty()) {
    throw std::invalid_argument(
        "name is required for scope 'host': every process opening the same "
        "name shares its slots");
  }
  if (o.per_key < 0 || o.per_key > o.capacity) {
    throw std::invalid_argument(
        "per_key must be an integer in [1, capacity=" + std::to_string(o.capacity) +
        "], or 0 for no per-key share, got " + std::to_string(o.per_key));
  }
  if (o.scope == Scope::kHost && o.per_key != 0) {
    throw std::invalid_argument(
        "per_key is not supported with scope 'host': per-key shares are kept "
        "by one process");
  }
  if (o.early_reject && o.per_key != 0) {
    throw std::invalid_argument(
        "early_reject is not supported with per_key: a key at its share does "
        "not wait behind the whole queue, so its wait cannot be predicted "
        "from it");
  }
  std::int64_t reserved = 0;
  for (std::size_t p = 0; p < kPriorityCount; ++p) {
    const std::string entry =
        "reserve[" + std::string(to_string(static_cast<Priority>(p))) + "]";
    if (o.reserve[p] < 0 || o.reserve[p] > o.capacity) {
      throw std::invalid_argument(entry + " must be an integer in [0, capacity=" +
                                  std::to_string(o.capacity) + "], got " +
                                  std::to_string(o.reserve[p]));
    }
    if (p == priority_index(Priority::kSheddable) && o.reserve[p] != 0) {
      throw std::invalid_argument(
          entry + " must be 0: the lowest class has no class below it to keep "
                  "slots from (reserve slots for sheddable_plus, critical or "
                  "critical_plus), got " +
          std::to_string(o.reserve[p]));
    }
    reserved += o.reserve[p];
  }
  if (reserved > o.capacity) {
    throw std::invalid_argument(
        "reserve must sum to at most capacity=" + std::to_string(o.capacity) +
        " (each entry in [0, capacity], sheddable's 0), got a sum of " +
        std::to_string(reserved));
  }
  if (reserved != 0 && o.per_key != 0) {
    throw std::invalid_argument(
        "reserve is not supported with per_key yet: use all-zero reserves, or "
        "per_key=0");
  }
  if (o.name.empty()) o.name = generated_name();
  return o;
}

double seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

constexpr bool kStatistics = CL_STATISTICS != 0;

std::atomic<testing::ReserveGrantHook> reserve_grant_hook{nullptr};

}  // namespace

void testing::set_reserve_grant_hook(ReserveGrantHook hook) {
  reserve_grant_hook.store(hook, std::memory_order_release);
}

namespace detail {

void NoticeList::push(WaiterNode* node) noexcept {
  node->next_ = nullptr;
  if (tail_) {
    tail_->next_ = node;
  } else {
    head_ = node;
  }
  tail_ = node;
}

void NoticeList::defer(Callback callback, Outcome outcome) {
  if (!first_) {
    first_ = std::move(callback);
    first_outcome_ = outcome;
  } else {
    more_.emplace_back(std::move(callback), outcome);
  }
}

void NoticeList::fire() noexcept {
  while (head_) {
    WaiterNode* node = head_;
    head_ = node->next_;
    if (!head_) tail_ = nullptr;
    node->next_ = nullptr;
    // on_complete() clears completing_ as its last touch of the node: from
    // then on the owner may free it, so the node is not touched again here.
    node->on_complete(node->outcome_, *this);
  }
  // User code last: every node is settled, no owner waits on this thread.
  if (first_) {
    Callback callback = std::move(first_);
    first_ = nullptr;
    callback(first_outcome_);
  }
  for (auto& [callback, outcome] : more_) callback(outcome);
  more_.clear();
}

}  // namespace detail

Resource::Resource(ResourceOptions options)
    : Resource(validated(std::move(options)), 0) {}

Resource::Resource(std::string name, std::int64_t capacity)
    : Resource([&] {
        ResourceOptions o;
        o.name = std::move(name);
        o.capacity = capacity;
        return o;
      }()) {}

// Private tag constructor: `o` is already validated.
Resource::Resource(ResourceOptions o, int)
    : name_(std::move(o.name)),
      shared_name_(std::make_shared<const std::string>(name_)),
      unowned_uses_(std::make_shared<const char>('\0')),
      capacity_(o.capacity),
      max_waiting_(o.max_waiting ? *o.max_waiting : -1),
      discipline_(o.queue),
      target_(o.adaptive_target),
      interval_(o.adaptive_interval),
      algorithm_(std::move(o.limit_algorithm)),
      per_key_(o.per_key),
      early_reject_(o.early_reject),
      reserved_(std::any_of(o.reserve.begin(), o.reserve.end(),
                            [](std::int64_t n) { return n != 0; })),
      locked_(per_key_ != 0 || reserved_),
      limit_(algorithm_ ? std::clamp<std::int64_t>(algorithm_->start(capacity_), 1, capacity_)
                        : capacity_),
      reserve_(o.reserve) {
  detail::MutexLock lock(mu_);
  stats_.name = name_;
  stats_.capacity = capacity_;
  stats_.max_waiting = o.max_waiting;
  stats_.queue = discipline_;
  if (per_key_ != 0) make_spares_locked(keyless_);
  if (o.scope == Scope::kHost) {
    o.name = name_;  // moved from above
    host_ = detail::HostPool::get(o, algorithm_.get(), host_note_, host_note_warning_);
  }
}

Resource::~Resource() {
  if (host_) {
    // The host pool counts slots per process, not per Resource object: a
    // Permit or request still using this one holds a copy of self().
    const long uses = unowned_uses_.use_count() - 1;
    if (uses > 0) {
      std::fprintf(stderr,
                   "concurrency_limiter: host-scoped resource '%s' destroyed while "
                   "slots are held or requests wait through it (%ld use(s)); a "
                   "Resource must outlive its Permits and Acquisitions (create it "
                   "with Resource::create() so that they keep it alive)\n",
                   name_.c_str(), uses);
      std::abort();
    }
    return;
  }
  // Only a resource not owned by a shared_ptr can get here with slots held or
  // requests waiting (everything that uses one owns it): its holders and
  // waiters would touch freed memory. Refuse loudly rather than corrupt.
  const std::int64_t held = in_use_of(word_.load(std::memory_order_acquire));
  std::int64_t waiting = 0;
  {
    detail::MutexLock lock(mu_);
    waiting = waiting_;
  }
  if (held != 0 || waiting != 0) {
    std::fprintf(stderr,
                 "concurrency_limiter: resource '%s' destroyed while %lld slot(s) "
                 "held and %lld request(s) waiting; a Resource must outlive its "
                 "Permits and Acquisitions (create it with Resource::create() so "
                 "that they keep it alive)\n",
                 name_.c_str(), static_cast<long long>(held),
                 static_cast<long long>(waiting));
    std::abort();
  }
}

void Resource::close() {
  detail::NoticeList notices;  // fired after mu_ is unlocked
  if (host_) {
    closed_.store(true, std::memory_order_release);
    return;
  }
  detail::MutexLock lock(mu_);
  closed_.store(true, std::memory_order_release);
  while (head_ != nullptr) reject_locked(*head_, Outcome::kUnavailable, notices);
}

Outcome Resource::refuse_try(const std::string* key, Priority priority) {
  // The reason a request arriving now would have been refused at once, if
  // it would have been (a full queue that turns newcomers away); otherwise
  // the request would have queued, which a try never does: kTimeout (or
  // kKeyLimit when the resource had a slot, but not for this key).
  Outcome reason = Outcome::kTimeout;
  if (closed()) {
    reason = Outcome::kUnavailable;
  } else if (host_) {
    if (host_->queue_full_for(priority)) reason = Outcome::kQueueFull;
  } else {
    const auto now = Clock::now();
    detail::MutexLock lock(mu_);
    const bool newest_first =
        discipline_ == QueueDiscipline::kLifo ||
        (discipline_ == QueueDiscipline::kAdaptive && standing_locked(now));
    const bool room_for_key = key_has_room_locked(key);
    const ClassQueue& own = class_queues_[priority_index(priority)];
    // As enqueue() below: full, and no waiter to push out for this request
    // (none of a lower class or, newest first, of its own; no key at its
    // share in its way).
    if (max_waiting_ >= 0 && waiting_ >= max_waiting_ &&
        !(waiting_ > 0 && priority_index(priority) >
                              static_cast<std::size_t>(lowest_waiting_class_locked())) &&
        (!newest_first || (waiting_ > 0 && own.waiting == 0)) &&
        !(per_key_ != 0 && !blocked_by_count_.empty() && room_for_key)) {
      reason = Outcome::kQueueFull;
    } else if (!room_for_key && in_use_of(word_.load(std::memory_order_relaxed)) <
                                    limit_.load(std::memory_order_relaxed)) {
      reason = Outcome::kKeyLimit;
    }
    note_rejection_locked(reason, priority);
    return reason;
  }
  count_rejection(reason, priority);
  return reason;
}

std::optional<std::int64_t> Resource::max_waiting() const noexcept {
  const std::int64_t max_waiting = host_ ? host_->max_waiting() : max_waiting_;
  if (max_waiting < 0) return std::nullopt;
  return max_waiting;
}

void Resource::set_limit(std::int64_t limit) {
  if (limit < 1 || limit > capacity()) {
    throw std::invalid_argument("limit of resource '" + name_ +
                                "' must be an integer in [1, capacity=" +
                                std::to_string(capacity()) + "], got " +
                                std::to_string(limit));
  }
  if (host_) return host_->set_limit(limit);
  detail::NoticeList notices;  // fired after mu_ is unlocked
  const auto now = Clock::now();
  if (algorithm_) {
    // The algorithm moves on from `limit`: told under algorithm_mu_, so that
    // no update() in flight puts its older limit back afterwards.
    detail::MutexLock algorithm_lock(algorithm_mu_);
    algorithm_->on_set_limit(limit, now);
    detail::MutexLock lock(mu_);
    set_limit_locked(limit, now, notices);
    return;
  }
  detail::MutexLock lock(mu_);
  set_limit_locked(limit, now, notices);
}

void Resource::set_limit_locked(std::int64_t limit, Clock::time_point now,
                                detail::NoticeList& notices) {
  limit_.store(limit, std::memory_order_seq_cst);
  // Raised: the new slots go to waiters at once. (While anyone waits, every
  // slot in force is held, and grants go through mu_.)
  grant_while_room_locked(now, notices);
}

void Resource::grant_while_room_locked(Clock::time_point now, detail::NoticeList& notices) {
  while (head_ && in_use_of(word_.load(std::memory_order_relaxed)) <
                      limit_.load(std::memory_order_relaxed)) {
    // Null: the adaptive queue shed the last waiters, or (reserves) no
    // waiting class may take a slot now.
    detail::WaiterNode* next = pick_locked(now, notices);
    if (!next) break;
    const std::uint64_t w = word_.fetch_add(kInUseOne, std::memory_order_acq_rel) + kInUseOne;
    if constexpr (kStatistics) {
      if (in_use_of(w) > peak_in_use_.load(std::memory_order_relaxed)) raise_peak(in_use_of(w));
    }
    grant_locked(*next, now);
    notices.push(next);
  }
}

std::array<std::int64_t, kPriorityCount> Resource::class_held_locked() const {
  std::array<std::int64_t, kPriorityCount> held{};
  std::int64_t others = 0;
  for (std::size_t p = 0; p < kPriorityCount; ++p) {
    held[p] = class_held_[p].load(std::memory_order_relaxed);
    others += held[p];
  }
  held[priority_index(Priority::kCritical)] =
      in_use_of(word_.load(std::memory_order_relaxed)) - others;
  return held;
}

bool Resource::class_may_take_locked(Priority priority) const {
  const std::int64_t limit = limit_.load(std::memory_order_relaxed);
  if (in_use_of(word_.load(std::memory_order_relaxed)) >= limit) return false;
  if (!reserved_) return true;
  // For every class c >= priority: the classes <= c, one slot more, within
  // limit - (the reserves of the classes above c), those reserves scaled by
  // limit / capacity (rounded down) while the limit is below the capacity.
  const std::array<std::int64_t, kPriorityCount> held = class_held_locked();
  std::int64_t reserved_above = 0;
  for (const std::int64_t r : reserve_) reserved_above += r;
  std::int64_t held_up_to = 0;
  for (std::size_t c = 0; c < kPriorityCount; ++c) {
    held_up_to += held[c];
    reserved_above -= reserve_[c];
    if (c >= priority_index(priority) &&
        held_up_to + 1 > limit - scaled_reserve(reserved_above, limit)) {
      return false;
    }
  }
  return true;
}

void Resource::after_reserved_grant_locked() const {
  if (const auto hook = reserve_grant_hook.load(std::memory_order_acquire)) {
    hook(*this, class_held_locked(), limit_.load(std::memory_order_relaxed));
  }
}

int Resource::highest_waiting_class_locked() const {
  for (std::size_t c = kPriorityCount; c-- > 0;) {
    if (class_queues_[c].waiting > 0) return static_cast<int>(c);
  }
  return -1;
}

int Resource::lowest_waiting_class_locked() const {
  for (std::size_t c = 0; c < kPriorityCount; ++c) {
    if (class_queues_[c].waiting > 0) return static_cast<int>(c);
  }
  return -1;
}

void Resource::learn(const LimitSample& sample, detail::NoticeList& notices) {
  detail::MutexLock algorithm_lock(algorithm_mu_);
  const std::int64_t limit =
      std::clamp<std::int64_t>(algorithm_->update(sample), 1, capacity_);
  detail::MutexLock lock(mu_);
  if (limit != limit_.load(std::memory_order_relaxed)) {
    set_limit_locked(limit, sample.end, notices);
  }
}

void Resource::undo_grant() noexcept {
  detail::NoticeList notices;  // a waiter may get the slot instead
  revert_grant(notices);
}

std::int64_t Resource::in_use() const noexcept {
  if (host_) return host_->in_use();
  return in_use_of(word_.load(std::memory_order_relaxed));
}

std::int64_t Resource::waiting() const {
  if (host_) return host_->waiting();
  detail::MutexLock lock(mu_);
  return waiting_;
}

ResourceStatistics Resource::statistics() const {
  if (host_) {
    return host_->statistics();
  }
  detail::MutexLock lock(mu_);
  // The other classes' counts, read before and after the word and taken at
  // their larger: a class is counted before its slot is taken (seen after
  // a word that holds it) and counted out after its slot is given back
  // (seen before a word that still holds it, through the release order of
  // note_class_release()), so no share of another class is ever left to
  // the default class.
  std::array<std::int64_t, kPriorityCount> held_before{};
  std::array<std::uint64_t, kPriorityCount> acquired_before{};
  for (std::size_t p = 0; p < kPriorityCount; ++p) {
    held_before[p] = class_held_[p].load(std::memory_order_acquire);
    acquired_before[p] = class_acquired_[p].load(std::memory_order_acquire);
  }
  // One load of the word: with mu_ held, everything else below is still.
  const std::uint64_t w = word_.load(std::memory_order_acquire);
  ResourceStatistics s;
  s.in_use = in_use_of(w);
  if constexpr (kStatistics) {
    const std::uint64_t releases = releases_folded_ + (w >> kReleaseShift);
    attribute_unmeasured_locked(releases);
    s = stats_;
    s.in_use = in_use_of(w);
    s.acquired_total = releases + static_cast<std::uint64_t>(s.in_use);
    s.peak_in_use = std::max(peak_in_use_.load(std::memory_order_relaxed), s.in_use);
    // Grants that did not wait: counted here, with their 0 s wait.
    const std::uint64_t at_once = s.acquired_total - stats_.wait_seconds.count;
    s.wait_seconds.counts[0] += at_once;
    s.wait_seconds.count += at_once;
  } else {
    s.name = stats_.name;
    s.capacity = stats_.capacity;
    s.max_waiting = stats_.max_waiting;
    s.queue = stats_.queue;
  }
  s.waiting = waiting_;
  s.limit = limit_.load(std::memory_order_relaxed);
  s.active_keys = static_cast<std::int64_t>(keys_.size());
  s.service_seconds = service_.seconds();
  // Per class: the default's share is what the others do not hold. Without
  // reserves the others' counts move without mu_, a moment after or before
  // the slot: clamped, so that no share is negative.
  std::int64_t others_held = 0;
  std::uint64_t others_acquired = 0;
  for (std::size_t p = 0; p < kPriorityCount; ++p) {
    ClassStatistics& c = s.classes[p];
    c.waiting = class_queues_[p].waiting;
    if (p == priority_index(Priority::kCritical)) continue;
    c.in_use = std::clamp<std::int64_t>(
        std::max(held_before[p], class_held_[p].load(std::memory_order_relaxed)), 0,
        s.in_use - others_held);
    others_held += c.in_use;
    if constexpr (kStatistics) {
      c.acquired_total = std::min(
          std::max(acquired_before[p], class_acquired_[p].load(std::memory_order_relaxed)),
          s.acquired_total - others_acquired);
      others_acquired += c.acquired_total;
    }
  }
  ClassStatistics& critical = s.classes[priority_index(Priority::kCritical)];
  critical.in_use = s.in_use - others_held;
  critical.acquired_total = s.acquired_total - others_acquired;
  if constexpr (kStatistics) {
    // Counters: never below what was reported (see class_acquired_reported_).
    for (std::size_t p = 0; p < kPriorityCount; ++p) {
      std::uint64_t& reported = class_acquired_reported_[p];
      reported = std::max(reported, s.classes[p].acquired_total);
      s.classes[p].acquired_total = reported;
    }
  }
  return s;
}

void Resource::attribute_unmeasured_locked(std::uint64_t releases) const {
  Histogram& h = stats_.hold_seconds;
  // No measured hold yet means no unmeasured one either (see note_grant()).
  if (releases <= h.count || !hold_measured_.load(std::memory_order_relaxed)) {
    return;
  }
  const std::uint64_t n = releases - h.count;
  h.counts[last_hold_bucket_] += n;
  h.count += n;
  h.sum += static_cast<double>(n) * last_hold_seconds_;
}

bool Resource::host_try_grant(bool& measure, Priority priority) noexcept {
  return host_->try_grant(measure, priority);
}

std::int64_t Resource::host_limit() const noexcept { return host_->limit(); }
std::int64_t Resource::host_capacity() const noexcept { return host_->capacity(); }
QueueDiscipline Resource::host_queue() const noexcept { return host_->queue(); }

void Resource::raise_peak(std::int64_t n) noexcept {
  std::int64_t peak = peak_in_use_.load(std::memory_order_relaxed);
  while (n > peak && !peak_in_use_.compare_exchange_weak(
                         peak, n, std::memory_order_relaxed)) {
  }
}

void Resource::fold_releases() noexcept {
  detail::MutexLock lock(mu_);
  fold_releases_locked();
}

void Resource::fold_releases_locked() noexcept {
  // Under mu_, so that statistics() sees the word and releases_folded_
  // change together. Releases keep counting meanwhile: 2^31 more fit.
  if ((word_.load(std::memory_order_relaxed) & kFoldBit) != 0) {
    word_.fetch_sub(kFoldBit, std::memory_order_relaxed);
    releases_folded_ += kFoldBit >> kReleaseShift;
  }
}

void Resource::note_rejection_locked(Outcome reason, Priority priority) {
  if constexpr (kStatistics) {
    ++stats_.rejected_total[rejection_index(reason)];
    ++stats_.classes[priority_index(priority)].rejected_total[rejection_index(reason)];
  }
}

bool Resource::locked_try_grant(bool& measure, const std::string* key,
                                Priority priority) noexcept {
  detail::MutexLock lock(mu_);
  // While a slot is free, no queued waiter could take it (every change that
  // could let one take it hands the slot over at once): no one is passed
  // but waiters of lower classes (reserves) or of keys at their share.
  if (!class_may_take_locked(priority) || !key_has_room_locked(key)) return false;
  try {
    key_acquired_locked(key);
  } catch (...) {
    return false;  // out of memory for the key's entry: as if no slot
  }
  note_class_grant(priority);
  measure = note_grant(word_.fetch_add(kInUseOne, std::memory_order_acquire) + kInUseOne);
  if (reserved_) after_reserved_grant_locked();
  return true;
}

bool Resource::key_has_room_locked(const std::string* key) const {
  if (key == nullptr) return true;  // no key: exempt from the share
  const auto it = keys_.find(*key);
  return it == keys_.end() || it->second.held < per_key_;
}

void Resource::key_acquired_locked(const std::string* key) {
  if (key != nullptr) change_held_locked(keys_[*key], +1);
}

void Resource::change_held_locked(detail::KeyCount& count, std::int64_t delta) {
  const bool had_room = count.held < per_key_;
  count.held += delta;
  // The key's waiters stop or start being ones a free slot may go to.
  if (had_room != (count.held < per_key_) && count.head != nullptr) refile_locked(count);
}

void Resource::make_spares_locked(detail::KeyCount& count) {
  if (count.filed != detail::KeyCount::Filed::kNone) return;  // in use
  if (!count.first_spare) {
    count.first_spare = spares_.extract(spares_.insert({0, &count}).first);
  }
  if (!count.second_spare) {
    count.second_spare = spares_.extract(spares_.insert({0, &count}).first);
  }
}

void Resource::refile_locked(detail::KeyCount& count) noexcept {
  using Filed = detail::KeyCount::Filed;
  // Out of the orders it is in (back into its spares), then into the ones
  // that fit now: moving entries between orders never allocates.
  if (count.filed == Filed::kEligible) {
    count.first_spare = eligible_by_oldest_.extract(count.first_entry);
    count.second_spare = eligible_by_newest_.extract(count.second_entry);
  } else if (count.filed == Filed::kBlocked) {
    count.second_spare = blocked_by_count_.extract(count.second_entry);
  }
  count.filed = Filed::kNone;
  if (count.head == nullptr) return;
  if (count.held < per_key_) {
    count.first_spare.value() = {count.head->seq_, &count};
    count.second_spare.value() = {count.tail->seq_, &count};
    count.first_entry = eligible_by_oldest_.insert(std::move(count.first_spare)).position;
    count.second_entry = eligible_by_newest_.insert(std::move(count.second_spare)).position;
    count.filed = Filed::kEligible;
  } else {
    count.second_spare.value() = {static_cast<std::uint64_t>(count.waiting), &count};
    count.second_entry = blocked_by_count_.insert(std::move(count.second_spare)).position;
    count.filed = Filed::kBlocked;
  }
}

bool Resource::held_back_locked(const detail::WaiterNode& node) const {
  return node.held_back_ || node.passed_over_seen_ != passed_over_ ||
         node.seq_ < fifo_passed_below_ ||
         (lifo_passed_from_ < node.seq_ && node.seq_ < lifo_passed_to_);
}

void Resource::key_released_locked(const std::string* key) {
  if (key == nullptr) return;
  const auto it = keys_.find(*key);
  if (it == keys_.end()) return;  // not reached: every held slot has an entry
  change_held_locked(it->second, -1);
  erase_key_if_idle_locked(it);
}

void Resource::erase_key_if_idle_locked(KeyMap::iterator it) {
  if (it->second.held > 0 || it->second.waiting > 0) return;
  keys_.erase(it);
  // The bucket array does not shrink by itself: after a burst of many keys,
  // give it back once the map is mostly empty, so memory follows the keys
  // active now.
  if (keys_.bucket_count() > 1024 && keys_.size() * 16 < keys_.bucket_count()) {
    try {
      keys_.rehash(keys_.size() * 2);
    } catch (...) {
      // Out of memory for the smaller array: the map is unchanged, keep it.
    }
  }
}

detail::WaiterNode* Resource::first_eligible_locked(bool from_head) {
  assert(eligible_by_oldest_.size() == eligible_by_newest_.size());
  if (eligible_by_oldest_.empty()) {
    // Every waiter is held back by its key's share: all of them are passed
    // over at once.
    if (head_ != nullptr) ++passed_over_;
    return nullptr;
  }
  if (from_head) {
    // The oldest waiter that may have the slot: every older one is held
    // back by its share.
    detail::WaiterNode* n = eligible_by_oldest_.begin()->second->head;
    fifo_passed_below_ = std::max(fifo_passed_below_, n->seq_);
    return n;
  }
  // The newest that may have it: every newer one is held back.
  detail::WaiterNode* n = std::prev(eligible_by_newest_.end())->second->tail;
  if (n->seq_ < next_seq_) {
    if (lifo_passed_from_ < lifo_passed_to_ && n->seq_ < lifo_passed_to_) {
      lifo_passed_from_ = std::min(lifo_passed_from_, n->seq_);  // overlaps
    } else {
      lifo_passed_from_ = n->seq_;
    }
    lifo_passed_to_ = next_seq_ + 1;
  }
  return n;
}

bool Resource::grant_at_once_locked(detail::WaiterNode& node) {
  if (locked_) {
    // Every grant of a keyed resource, or one with reserves, is made under
    // mu_, and while a slot is free no queued waiter that may take it is
    // left: the newcomer passes nobody it should not (a waiter of a lower
    // class, or of a key at its share, may be passed).
    if (!class_may_take_locked(node.priority_) || !key_has_room_locked(node.key_)) {
      return false;
    }
    key_acquired_locked(node.key_);
    note_class_grant(node.priority_);
    node.measure_ = note_grant(word_.fetch_add(kInUseOne, std::memory_order_acquire) + kInUseOne);
    if (reserved_) after_reserved_grant_locked();
    node.granted_at_ = {};
    node.state_ = State::kGranted;
    node.outcome_ = Outcome::kGranted;
    return true;
  }
  note_class_grant(node.priority_);  // before the slot: see note_class_grant()
  const std::uint64_t granted = take_free_slot();
  if (granted == 0) {
    note_class_revert(node.priority_);
    return false;
  }
  node.measure_ = note_grant(granted);
  node.granted_at_ = {};
  node.state_ = State::kGranted;
  node.outcome_ = Outcome::kGranted;
  return true;
}

Outcome Resource::enqueue(detail::WaiterNode& node,
                          detail::NoticeList& notices) {
  if (closed()) {
    count_rejection(Outcome::kUnavailable, node.priority_);
    node.state_ = State::kRejected;
    node.outcome_ = Outcome::kUnavailable;
    return Outcome::kUnavailable;
  }
  if (host_) return host_->enqueue(node, notices, early_reject_);
  const auto now = Clock::now();
  detail::MutexLock lock(mu_);
  if (closed_.load(std::memory_order_relaxed)) {  // closed meanwhile
    note_rejection_locked(Outcome::kUnavailable, node.priority_);
    node.state_ = State::kRejected;
    node.outcome_ = Outcome::kUnavailable;
    return Outcome::kUnavailable;
  }
  if (grant_at_once_locked(node)) return Outcome::kGranted;
  shed_locked(now, notices, priority_index(node.priority_));
  const std::size_t own = priority_index(node.priority_);
  if (early_reject_ && node.deadline_ != Clock::time_point::max()) {
    // Waiters ahead in the grant order: every waiter of the classes above,
    // and of its own class all of them in FIFO order, none in newest-first
    // order (LIFO, a standing adaptive queue).
    const bool newest_first =
        discipline_ == QueueDiscipline::kLifo ||
        (discipline_ == QueueDiscipline::kAdaptive && standing_locked(now));
    // The higher classes' waiters are served by every slot; those of its
    // own class by the slots the class may use: the limit less the
    // reserves above it (as class_may_take_locked() scales them).
    const std::int64_t own_ahead = newest_first ? 0 : class_queues_[own].waiting;
    std::int64_t above = 0;
    std::int64_t reserved_above = 0;
    for (std::size_t c = own + 1; c < kPriorityCount; ++c) {
      above += class_queues_[c].waiting;
      reserved_above += reserve_[c];
    }
    const std::int64_t limit = limit_.load(std::memory_order_relaxed);
    const std::int64_t slots = std::max<std::int64_t>(
        1, limit - (reserved_ ? scaled_reserve(reserved_above, limit) : 0));
    const std::optional<double> service = service_.seconds();
    const double turns = static_cast<double>(above) / static_cast<double>(limit) +
                         static_cast<double>(own_ahead) / static_cast<double>(slots);
    if (service && above + own_ahead > 0 &&
        turns * *service > (node.deadline_ <= now ? 0.0 : seconds(node.deadline_ - now))) {
      node.predicted_wait_ = turns * *service;
      note_rejection_locked(Outcome::kPredictedTimeout, node.priority_);
      node.state_ = State::kRejected;
      node.outcome_ = Outcome::kPredictedTimeout;
      return Outcome::kPredictedTimeout;
    }
  }
  if (max_waiting_ >= 0 && waiting_ >= max_waiting_ && per_key_ != 0 &&
      !blocked_by_count_.empty() && key_has_room_locked(node.key_)) {
    // One key must not fill the queue: a newcomer below its share takes the
    // place of the newest waiter of the key at its share with the most
    // waiters (it waits for its own key's slots, not the resource's).
    reject_locked(*std::prev(blocked_by_count_.end())->second->tail, Outcome::kKeyLimit,
                  notices);
  } else if (max_waiting_ >= 0 && waiting_ >= max_waiting_ && waiting_ > 0 &&
             own > static_cast<std::size_t>(lowest_waiting_class_locked())) {
    // A class is shed only once every lower one is: the newest waiter of
    // the lowest class makes room for a higher one.
    reject_locked(*class_queues_[static_cast<std::size_t>(lowest_waiting_class_locked())].tail,
                  Outcome::kLowerPriority, notices);
  } else if (max_waiting_ >= 0 && waiting_ >= max_waiting_) {
    // FIFO order (also the adaptive queue's, until a queue stands) turns the
    // newcomer away; newest-first order pushes the oldest waiter of its
    // class out.
    const bool newest_first =
        discipline_ == QueueDiscipline::kLifo ||
        (discipline_ == QueueDiscipline::kAdaptive && standing_locked(now));
    if (!newest_first || class_queues_[own].waiting == 0) {
      note_rejection_locked(Outcome::kQueueFull, node.priority_);
      node.state_ = State::kRejected;
      node.outcome_ = Outcome::kQueueFull;
      return Outcome::kQueueFull;
    }
    // LIFO-like queues keep the newest: the oldest waiter makes room.
    reject_locked(*class_queues_[own].head, Outcome::kQueueFull, notices);
  }
  if (locked_) {
    // Keyed or reserves: every grant and release takes mu_, so the bit only
    // has to be set (it may be set while slots are free: waiters held back
    // by their key's share or by the reserves of the classes above).
    if (waiting_ == 0) word_.fetch_or(kWaitersBit, std::memory_order_acq_rel);
  } else if (waiting_ == 0) {
    // Announce the waiter before linking it: the CAS succeeds only while
    // every slot is held; once it has, every release takes mu_ and finds the
    // node. If a slot was freed meanwhile, take it instead of waiting.
    std::uint64_t w = word_.load(std::memory_order_relaxed);
    for (;;) {
      if (in_use_of(w) < limit_.load(std::memory_order_relaxed)) {
        if (grant_at_once_locked(node)) return Outcome::kGranted;
        w = word_.load(std::memory_order_relaxed);
      } else if (word_.compare_exchange_weak(w, w | kWaitersBit,
                                             std::memory_order_acq_rel,
                                             std::memory_order_relaxed)) {
        break;
      }
    }
  }
  link_tail(node, now);
  return Outcome::kPending;
}

State Resource::abandon(detail::WaiterNode& node, Outcome reason) {
  if (host_) return host_->abandon(node, reason);
  detail::MutexLock lock(mu_);
  const State state = node.state_;
  if (state == State::kQueued) {
    // Its key's share kept it from a slot the resource had, and still
    // holds it back: that, not the resource, is why it waited in vain.
    if (reason == Outcome::kTimeout && node.key_ != nullptr && node.key_count_ != nullptr &&
        node.key_count_->held >= per_key_ && held_back_locked(node)) {
      reason = Outcome::kKeyLimit;
    }
    unlink(node);
    node.state_ = State::kRejected;
    node.outcome_ = reason;
    note_rejection_locked(reason, node.priority_);
  }
  return state;
}

void Resource::revert_grant(detail::NoticeList& notices, const std::string* key,
                            Priority priority) {
  if (host_) return host_->revert_grant(notices, priority);
  if (locked_) {
    const auto now = Clock::now();
    detail::MutexLock lock(mu_);
    note_class_revert(priority);
    key_released_locked(key);
    hand_over_locked(now, /*count_release=*/false, notices);
    return;
  }
  // Without the lock while nobody waits: in_use - 1, no release counted.
  // The class is counted out after the slot (see note_class_grant()).
  std::uint64_t w = word_.load(std::memory_order_relaxed);
  while ((w & kWaitersBit) == 0) {
    if (word_.compare_exchange_weak(w, w - kInUseOne, std::memory_order_release,
                                    std::memory_order_relaxed)) {
      note_class_revert(priority);
      return;
    }
  }
  const auto now = Clock::now();
  {
    detail::MutexLock lock(mu_);
    hand_over_locked(now, /*count_release=*/false, notices);
  }
  note_class_revert(priority);
}

void Resource::count_rejection(Outcome reason, Priority priority) {
  if (host_) return host_->count_rejection(reason, priority);
  detail::MutexLock lock(mu_);
  note_rejection_locked(reason, priority);
}

void Resource::release(bool measured, Clock::time_point granted_at,
                       Clock::time_point now, Completion completion,
                       detail::NoticeList& notices, const std::string* key,
                       Priority priority) {
  if (host_) return host_->release(measured, granted_at, now, completion, notices, priority);
  // Without reserves the class is counted out after the slot is given back
  // (see note_class_grant()); with reserves, under mu_ with the slot. Read
  // before: the default class touches nothing of the resource after it.
  const bool count_out_after = !reserved_ && priority != Priority::kCritical;
  if (!measured && try_give_back()) {
    if (count_out_after) note_class_release(priority);
    return;
  }
  // A handoff needs the time (wait statistics, the adaptive queue).
  if (!measured) now = Clock::now();
  std::int64_t in_flight = 0;
  {
    detail::MutexLock lock(mu_);
    in_flight = in_use_of(word_.load(std::memory_order_relaxed));
    if constexpr (kStatistics) {
      if (measured) {
        // Holds given back before this one and not timed go to the previous
        // measured hold's bucket, so the new one does not take them.
        attribute_unmeasured_locked(
            releases_folded_ + (word_.load(std::memory_order_relaxed) >> kReleaseShift));
        const double held = seconds(now - granted_at);
        last_hold_bucket_ = Histogram::bucket_of(held);
        last_hold_seconds_ = held;
        stats_.hold_seconds.observe(held);
        // It is counted before its release is: statistics() must not attribute
        // a release to it twice, so the release is counted under mu_ as well.
        hold_measured_.store(true, std::memory_order_release);
      }
    }
    // A hold given back unused (a wait cancelled after its grant, a
    // cluster stage's refusal) says nothing of the service time.
    if (measured && completion != Completion::kIgnored) service_.add(seconds(now - granted_at));
    if (reserved_) note_class_release(priority);
    key_released_locked(key);
    hand_over_locked(now, /*count_release=*/true, notices);
  }
  if (count_out_after) note_class_release(priority);
  if (algorithm_ && measured && completion != Completion::kIgnored) {
    learn(LimitSample{.end = now,
                      .service_time = now - granted_at,
                      .in_flight = in_flight,
                      .dropped = completion == Completion::kDropped},
          notices);
  }
}

void Resource::hand_over_locked(Clock::time_point now, bool count_release,
                                detail::NoticeList& notices) {
  std::uint64_t w;
  if (reserved_) {
    // The slot may not suit the waiters' classes, nor one slot only: freed
    // first, then granted to every waiter the reserves let take one.
    const std::uint64_t delta = count_release ? kReleaseOne - kInUseOne : -kInUseOne;
    w = word_.fetch_add(delta, std::memory_order_release) + delta;
    if ((w & kFoldBit) != 0) fold_releases_locked();
    grant_while_room_locked(now, notices);
    return;
  }
  if (in_use_of(word_.load(std::memory_order_relaxed)) >
      limit_.load(std::memory_order_relaxed)) {
    // The limit was lowered: retire the slot instead of handing it over.
    const std::uint64_t delta = count_release ? kReleaseOne - kInUseOne : -kInUseOne;
    w = word_.fetch_add(delta, std::memory_order_release) + delta;
  } else if (detail::WaiterNode* next = pick_locked(now, notices)) {
    grant_locked(*next, now);  // in_use stays the same
    notices.push(next);
    w = count_release ? word_.fetch_add(kReleaseOne, std::memory_order_acq_rel) + kReleaseOne
                      : word_.load(std::memory_order_relaxed);
  } else {
    // Nobody left to hand it to (pick_locked() may have shed the last).
    const std::uint64_t delta = count_release ? kReleaseOne - kInUseOne : -kInUseOne;
    w = word_.fetch_add(delta, std::memory_order_release) + delta;
  }
  if ((w & kFoldBit) != 0) fold_releases_locked();
}

void Resource::link_tail(detail::WaiterNode& node, Clock::time_point now) {
  detail::KeyCount* count = nullptr;
  if (per_key_ != 0) {
    count = &keyless_;
    if (node.key_ != nullptr) {
      // First, as it may allocate (and throw): nothing is changed yet.
      const auto it = keys_.try_emplace(*node.key_).first;
      try {
        make_spares_locked(it->second);
      } catch (...) {
        erase_key_if_idle_locked(it);
        throw;
      }
      count = &it->second;
    }
  }
  node.enqueued_at_ = now;
  // Queued with a slot free: only its key's share can be the reason.
  node.held_back_ = per_key_ != 0 && in_use_of(word_.load(std::memory_order_relaxed)) <
                                         limit_.load(std::memory_order_relaxed);
  node.passed_over_seen_ = passed_over_;
  node.state_ = State::kQueued;
  node.outcome_ = Outcome::kPending;
  node.next_ = nullptr;
  node.prev_ = tail_;
  if (tail_) {
    tail_->next_ = &node;
  } else {
    head_ = &node;
  }
  tail_ = &node;
  ++waiting_;
  ClassQueue& cls = class_queues_[priority_index(node.priority_)];
  node.class_next_ = nullptr;
  node.class_prev_ = cls.tail;
  if (cls.tail) {
    cls.tail->class_next_ = &node;
  } else {
    cls.head = &node;
  }
  cls.tail = &node;
  ++cls.waiting;
  if (count != nullptr) {
    // At the tail of its key's list too, and the key refiled (its newest
    // waiter, or its count, changed).
    node.seq_ = ++next_seq_;
    node.key_count_ = count;
    ++count->waiting;
    node.key_prev_ = count->tail;
    node.key_next_ = nullptr;
    if (count->tail != nullptr) {
      count->tail->key_next_ = &node;
    } else {
      count->head = &node;
    }
    count->tail = &node;
    refile_locked(*count);
  }
}

void Resource::unlink(detail::WaiterNode& node) {
  if (node.prev_) {
    node.prev_->next_ = node.next_;
  } else {
    head_ = node.next_;
  }
  if (node.next_) {
    node.next_->prev_ = node.prev_;
  } else {
    tail_ = node.prev_;
  }
  node.prev_ = node.next_ = nullptr;
  ClassQueue& cls = class_queues_[priority_index(node.priority_)];
  if (node.class_prev_) {
    node.class_prev_->class_next_ = node.class_next_;
  } else {
    cls.head = node.class_next_;
  }
  if (node.class_next_) {
    node.class_next_->class_prev_ = node.class_prev_;
  } else {
    cls.tail = node.class_prev_;
  }
  node.class_prev_ = node.class_next_ = nullptr;
  --cls.waiting;
  if (detail::KeyCount* count = node.key_count_) {
    // Refiled if its oldest or newest waiter, or its count of waiters in the
    // blocked order, changes.
    const bool refile = node.key_prev_ == nullptr || node.key_next_ == nullptr ||
                        count->filed == detail::KeyCount::Filed::kBlocked;
    if (node.key_prev_ != nullptr) {
      node.key_prev_->key_next_ = node.key_next_;
    } else {
      count->head = node.key_next_;
    }
    if (node.key_next_ != nullptr) {
      node.key_next_->key_prev_ = node.key_prev_;
    } else {
      count->tail = node.key_prev_;
    }
    node.key_prev_ = node.key_next_ = nullptr;
    --count->waiting;
    node.key_count_ = nullptr;
    if (refile) refile_locked(*count);
    if (node.key_ != nullptr) erase_key_if_idle_locked(keys_.find(*node.key_));
  }
  if (--waiting_ == 0) {
    // The queue is empty: releases may go without the lock again.
    word_.fetch_and(~kWaitersBit, std::memory_order_release);
  }
}

void Resource::reject_locked(detail::WaiterNode& node, Outcome reason,
                             detail::NoticeList& notices) {
  unlink(node);
  node.state_ = State::kRejected;
  node.outcome_ = reason;
  node.completing_.store(true, std::memory_order_relaxed);  // published by mu_
  note_rejection_locked(reason, node.priority_);
  notices.push(&node);
}

bool Resource::standing_locked(Clock::time_point now) {
  // CoDel's rule: the queue stands once its oldest waiter has been older than
  // the target without a break for a whole interval. The break is observed
  // lazily, at the events that call this. A queue no longer than the number
  // of slots drains within about one service time: it never stands (this
  // also ends the newest-first order once an overload is over, when the
  // waiters it had pushed back would otherwise keep the head old).
  if (!head_ || waiting_ <= limit_.load(std::memory_order_relaxed) ||
      now - head_->enqueued_at_ <= target_) {
    above_target_since_.reset();
    return false;
  }
  if (!above_target_since_) above_target_since_ = head_->enqueued_at_ + target_;
  return now - *above_target_since_ >= interval_;
}

void Resource::shed_locked(Clock::time_point now, detail::NoticeList& notices,
                           std::size_t below) {
  if (discipline_ != QueueDiscipline::kAdaptive || !standing_locked(now)) {
    return;
  }
  // Served newest first, the oldest waiters would be served last: tell them
  // now instead of at their timeout. A class is shed only once every lower
  // one is: the oldest waiter of the lowest class waiting, none of a class
  // above a newcomer's (served before it).
  while (waiting_ > 0) {
    const int lowest = lowest_waiting_class_locked();
    if (lowest < 0 || static_cast<std::size_t>(lowest) > below) return;
    detail::WaiterNode* oldest = class_queues_[static_cast<std::size_t>(lowest)].head;
    if (oldest == nullptr || now - oldest->enqueued_at_ <= target_ + interval_) return;
    reject_locked(*oldest, Outcome::kShed, notices);
  }
}

detail::WaiterNode* Resource::pick_locked(Clock::time_point now,
                                          detail::NoticeList& notices) {
  bool from_head = true;
  switch (discipline_) {
    case QueueDiscipline::kFifo:
      break;
    case QueueDiscipline::kLifo:
      from_head = false;
      break;
    case QueueDiscipline::kAdaptive:
      shed_locked(now, notices);
      from_head = !standing_locked(now);
      break;
  }
  if (per_key_ != 0) return first_eligible_locked(from_head);  // one class
  // The highest class with waiters, if it may take the slot (reserves; a
  // lower class may not when a higher one may not), then the discipline's
  // end of its list.
  const int top = highest_waiting_class_locked();
  if (top < 0) return nullptr;
  if (reserved_ && !class_may_take_locked(static_cast<Priority>(top))) return nullptr;
  const ClassQueue& cls = class_queues_[static_cast<std::size_t>(top)];
  return from_head ? cls.head : cls.tail;
}

void Resource::grant_locked(detail::WaiterNode& node, Clock::time_point now) {
  // Held before the waiter leaves, so the key's entry is not erased between
  // (and no lookup or allocation is needed).
  if (node.key_ != nullptr && node.key_count_ != nullptr) {
    change_held_locked(*node.key_count_, +1);
  }
  unlink(node);
  note_class_grant(node.priority_);
  if (reserved_) after_reserved_grant_locked();
  node.state_ = State::kGranted;
  node.outcome_ = Outcome::kGranted;
  node.granted_at_ = now;
  // It read the clock anyway.
  node.measure_ = kStatistics || algorithm_ || early_reject_;
  node.completing_.store(true, std::memory_order_relaxed);  // published by mu_
  if constexpr (kStatistics) {
    stats_.wait_seconds.observe(seconds(now - node.enqueued_at_));
  }
}

std::shared_ptr<Resource> Resource::self() {
  std::shared_ptr<Resource> owned = weak_from_this().lock();
  if (owned) return owned;
  // Not owned by a shared_ptr: a pointer that owns nothing (see "Lifetime"),
  // counted in unowned_uses_ for the destructor's check.
  return std::shared_ptr<Resource>(unowned_uses_, this);
}

Permit Resource::try_acquire() {
  Permit p;
  p.take(self());
  return p;
}

Permit Resource::acquire_until(Clock::time_point deadline,
                               std::stop_token stop) {
  Permit p;
  std::shared_ptr<Resource> owner = self();
  if (!p.take(owner)) {
    p = acquire_blocking(
        std::make_shared<const ResourceSet>(
            std::vector<std::shared_ptr<Resource>>{std::move(owner)}),
        deadline, std::move(stop));
  }
  return p;
}

Permit Resource::acquire_for(Clock::duration timeout, std::stop_token stop) {
  Permit p;
  std::shared_ptr<Resource> owner = self();
  if (!p.take(owner)) {
    p = acquire_blocking(
        std::make_shared<const ResourceSet>(
            std::vector<std::shared_ptr<Resource>>{std::move(owner)}),
        detail::deadline_after(timeout), std::move(stop));
  }
  return p;
}

}  // namespace concurrency_limiter
