// Resource: a named pool of `capacity` slots with a queue of waiters.
//
// A resource stands for one thing that must not be overloaded: a database, a
// filesystem, a downstream API. Each request that uses it holds one slot while
// it runs. When every slot is taken, requests wait in the resource's queue;
// when a slot is released it is handed straight to the waiter chosen by the
// queue discipline (no thundering herd, and nobody barges past the queue: a
// newcomer gets a free slot only when nobody is waiting).
//
//   auto db = Resource::create("db", 5);
//   if (Permit p = db->acquire_for(std::chrono::seconds(2))) {
//     run_query();        // the slot is held until `p` is destroyed
//   } else {
//     reply_503(p.outcome());   // kTimeout, kQueueFull, kShed or kCancelled
//   }
//
// Requests may carry a priority class (see "Priority classes" below).
//
// Limit: `capacity` is fixed; `limit` (1..capacity, capacity unless changed)
// is the number of slots in force now. set_limit() moves it by hand; a
// ResourceOptions::limit_algorithm (limit.h) moves it by itself from the
// service times and outcomes of released slots. Raising the limit grants to
// waiters at once; lowering it never revokes a held slot: released slots are
// retired instead of handed over until in_use <= limit.
//
// Queue disciplines (ResourceOptions::queue):
//   kFifo      oldest waiter first. When the queue is at max_waiting, the new
//              request is rejected with kQueueFull at once.
//   kLifo      newest waiter first. When the queue is full, the *oldest*
//              waiter is rejected with kQueueFull to make room: under overload
//              the newest requests, whose clients are still waiting, are the
//              ones worth serving.
//   kAdaptive  FIFO while the queue drains. Once more requests wait than the
//              resource has slots and the oldest waiter has been older than
//              `adaptive_target` without a break for a whole
//              `adaptive_interval` (a standing queue, in CoDel's terms), it
//              serves the newest waiter first, so the requests that do get
//              served have not waited, and sheds (kShed) waiters older than
//              `adaptive_target + adaptive_interval`: served last, they would
//              only wait for their timeout. Back to FIFO as soon as the oldest
//              waiter is younger than the target or the queue is no longer
//              than the number of slots. Full queue: as kLifo while standing,
//              as kFifo otherwise.
//
// Per-key shares (ResourceOptions::per_key = N): each request may carry a key
// (a client, an API key, a tenant; see Acquisition). No key holds more than N
// of the resource's slots, and all keys together still hold at most `limit`.
// A request whose key already holds N slots waits in the queue like any
// other, but it does not hold up the requests behind it: a freed slot goes,
// in the discipline's order, to the first waiter whose key is below its share
// (or that has no key), and a newcomer takes a free slot at once if its key
// has room and no waiter that could use the slot is queued. A waiter whose
// deadline passes while its key holds its whole share, after that share kept
// it from a slot the resource had (free, or handed to another key past it),
// is rejected with kKeyLimit instead of kTimeout; one that only ever waited
// for a full resource gets kTimeout. (Under LIFO order, a waiter passed over
// by a handoff that is followed, before its deadline, by handoffs that pass
// only waiters newer than itself may get kTimeout instead.) A request
// without a key (std::nullopt) is exempt from the share but counts toward
// the total, which is what protects the resource. The per-key state (a count
// of held slots and of waiters) exists only while the key holds or waits for
// a slot: it is erased when the key's last slot is released or its last
// waiter leaves the queue (granted, timed out, cancelled, shed), so memory
// follows the keys active now, not the keys ever seen; statistics report
// them as active_keys. A resource with a per-key share takes and gives back
// every slot under its mutex (the lock-free path below is for resources
// without one). Each key's waiters wait in their own FIFO list, and only the
// keys below their share (and the waiters without a key) are in the order a
// free slot is handed out by: a grant, release, timeout or cancel costs
// O(log k) for k keys with waiters, however many waiters a key at its share
// has queued. The order is the discipline's: the oldest eligible waiter for
// FIFO, the newest for LIFO, each as in the whole queue; the adaptive
// queue's standing test, its shedding of stale waiters and max_waiting look
// at the whole queue, every key's waiters included.
//   Full queue: a newcomer whose key is below its share (or that has no
// key) is not turned away while a key at its share has waiters: the newest
// waiter of the key at its share with the most waiters is rejected with
// kKeyLimit to make room, so one key cannot fill the queue and lock the
// others out. Otherwise the discipline's full-queue rule above applies.
// Host scope does not support a per-key share: the constructor refuses the
// combination.
//
// Priority classes (priority.h): each request belongs to a class,
// kSheddable < kSheddablePlus < kCritical < kCriticalPlus, kCritical unless
// its Acquisition (or the Limiter call) says otherwise. A resource whose
// requests are all of one class behaves as described above.
//   Grant order: a freed slot goes to the highest class with waiters;
// within the class, the discipline picks (the oldest for FIFO, the newest
// for LIFO and a standing adaptive queue). A newcomer still takes a free
// slot only when nobody waits (or, with reserves, nobody who may take it).
// Raising the limit grants in the same order. The adaptive queue's standing
// test looks at the whole queue, every class included; its shedding of
// stale waiters (kShed) takes the oldest waiter of the lowest class
// waiting, so a class is shed only once every lower one is (a stale waiter
// of a higher class is served before the lower ones), and none of a class
// above a newcomer's.
//   Full queue (max_waiting): a newcomer of a class above the lowest class
// that has waiters pushes out the newest waiter of that lowest class, which
// is rejected with kLowerPriority: a class is shed only once every lower one
// is. Otherwise the discipline's rule applies within the newcomer's class:
// FIFO (and an adaptive queue that does not stand) turns the newcomer away
// with kQueueFull; LIFO (and a standing adaptive queue) pushes out the
// oldest waiter of the newcomer's own class with kQueueFull, or turns the
// newcomer away if its class has none.
//   Reserved shares (ResourceOptions::reserve): reserve[p] = n keeps n slots
// that only class p or a higher one may take. For every class c, the
// classes <= c together hold at most limit - (the reserves of the classes
// above c): a lower class borrows nothing from a higher class's reserve,
// and a class may use every slot not reserved for the classes above it
// (what lower classes hold counts against it). Reserves are shares of the
// capacity: while the limit in force is lower (set_limit(), an adaptive
// limit), the reserves above a class count as their sum x limit /
// capacity, rounded up, but at most limit - 1, so the classes below keep
// at least one slot (unless the reserves add up to the whole capacity).
// Example:
//
//   auto api = Resource::create(ResourceOptions{
//       .name = "api", .capacity = 20,
//       .reserve = {0, 0, 0, 4}});     // indexed by priority_index()
//   // critical and below: at most 16 slots together; critical_plus: all 20
//   // (4 of them whatever the others hold).
//
// A freed slot that only the classes it is reserved against wait for stays
// free (for the class it is kept for). Early rejection (early_reject)
// counts as ahead of a newcomer of class c every waiter of the classes
// above c and, in FIFO order, every waiter of class c, served by the slots
// class c may use (the limit less the reserves above it). Statistics split
// in_use, waiting, acquired_total and rejected_total by class
// (ResourceStatistics::classes).
//   Cost: one more intrusive list per class: a grant, release, timeout or
// cancel of a waiter stays O(1) (a scan of the 4 classes). A resource
// without reserves keeps the lock-free path below for every class; a class
// other than kCritical pays one more relaxed atomic add on grant and on
// release (its per-class count), the default class nothing. A resource with
// reserves takes and gives back every slot under its mutex, as a per-key
// share does. Host scope keeps the grant order, the full-queue rule, the
// reserves and the per-class statistics above across processes
// (host_resource.h, "Priority classes"; every process must pass the same
// reserves). A
// per-key share supports neither reserves nor a class other than kCritical
// yet: the constructor refuses reserves there, and Acquisition a class
// other than kCritical (std::invalid_argument).
//
// Thread safety: every member function may be called from any thread. While
// nobody waits, a slot is taken and given back with one atomic
// compare-and-swap each, without a lock (not with a per-key share or
// reserves, see above); a request that has to wait, and
// every release while someone waits, go through the resource's mutex, which
// is held for a few instructions (plus one step per waiter shed by the
// adaptive queue) and never while user code (a completion callback) runs.
// The protocol between the two paths is described at `word_` below.
//
// Lifetime: create resources with Resource::create() (or std::make_shared,
// which is the same). Every Permit, Acquisition, ResourceSet and Limiter
// that uses a resource owns it through a shared_ptr, so a resource owned
// that way lives as long as anything holds or waits for one of its slots:
// dropping the last Limiter while requests wait or hold slots is safe, and
// those requests end as they would have. To end them sooner, close() the
// resource (or Limiter::close()): every waiter fails with kUnavailable at
// once and new requests are refused; held slots stay held until released.
// (Host scope: close() only refuses new requests; see close() below.)
//   A Resource not owned by a shared_ptr (a local or a member variable)
// works too, but nothing can keep it alive: it must outlive every Permit and
// Acquisition that uses it, and its destructor aborts the program, naming
// the resource, if slots are still held or requests still wait then.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <stop_token>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "concurrency_limiter/internal/mutex.h"
#include "concurrency_limiter/internal/thread_annotations.h"
#include "concurrency_limiter/limit.h"
#include "concurrency_limiter/outcome.h"
#include "concurrency_limiter/priority.h"
#include "concurrency_limiter/service_estimate.h"
#include "concurrency_limiter/statistics.h"

// CL_STATISTICS=0 (a public compile definition of the library built with
// -DCL_STATISTICS=OFF) compiles the statistics out, only to measure what they
// cost (bench/engine_bench.cc); statistics() then reports zero counts.
#ifndef CL_STATISTICS
#define CL_STATISTICS 1
#endif

namespace concurrency_limiter {

class Acquisition;
class Permit;
class Resource;
class ResourceSet;

// Which processes share a resource's slots (see host_resource.h).
enum class Scope : std::uint8_t {
  kProcess,  // this process only (the default)
  kHost,     // every process of this user on this machine that opens the name
};

struct ResourceOptions {
  // Appears in errors, statistics and metrics. Empty: a unique name
  // "resource-N" is generated.
  std::string name;
  // Number of slots; must be >= 1 and <= kMaxCapacity.
  std::int64_t capacity = 1;
  // Longest queue allowed; nullopt means unbounded. 0 means "never wait":
  // a request either gets a free slot at once or is rejected with kQueueFull.
  std::optional<std::int64_t> max_waiting;
  QueueDiscipline queue = QueueDiscipline::kFifo;
  // kAdaptive only: the queueing delay considered normal. Must be > 0. Set
  // it above the waits of normal operation (about a service time when the
  // steady load keeps a short queue), so only an overload changes the order.
  Clock::duration adaptive_target = std::chrono::milliseconds(500);
  // kAdaptive only: how long the oldest waiter must stay above the target
  // before the queue counts as standing. Must be > 0.
  Clock::duration adaptive_interval = std::chrono::milliseconds(1500);
  // Moves the limit by itself (e.g. Gradient2Limit); null: the limit stays at
  // capacity unless set_limit() changes it. Its start(capacity) is called by
  // the constructor and may throw std::invalid_argument. Owned by this
  // resource alone. Every hold of an adaptive resource is timed. Scope::kHost
  // accepts only the built-in algorithms of limit.h (see
  // host_resource.h): one algorithm of their kind and options then serves the
  // whole host; std::invalid_argument otherwise.
  std::shared_ptr<LimitAlgorithm> limit_algorithm;
  // kHost: one pool of `capacity` slots and one queue for every process of
  // this user on this machine that opens a resource of the same `name`
  // (required: letters, digits, '_', '-', '.', at most 64). See
  // host_resource.h.
  Scope scope = Scope::kProcess;
  // Most slots one key may hold (see "Per-key shares" above): 0 (the
  // default) means no per-key share, otherwise 1..capacity. A limit below
  // per_key makes the share moot, it does not lower the total. Not supported
  // with scope kHost (std::invalid_argument).
  std::int64_t per_key = 0;
  // Early rejection: a request that would have to wait is refused at once,
  // with kPredictedTimeout, when the wait predicted for it exceeds its
  // timeout: the waiters ahead of it in the grant order / limit x the
  // resource's service-time estimate (service_estimate.h, which also says
  // what it costs in grants). Ahead: FIFO, every waiter; LIFO, none (the
  // newest is served first: never refused early); adaptive, every waiter
  // while the queue drains in FIFO order, none while it stands. Only a
  // request whose timeout the resource is told (Acquisition::start() with a
  // timeout, acquire_for()/acquire_until(), async_acquire, the Python
  // package) can be refused early; none is until the first timed hold was
  // released (no estimate yet). Every hold of such a resource is timed (two
  // clock reads, and its release takes the mutex), so that the estimate
  // follows the downstream at any load; the prediction costs a
  // multiplication under the mutex a waiting request takes anyway. It counts
  // every waiter ahead as one that will be served: waiters with shorter
  // timeouts (or client deadlines) than the newcomer's, which will give up
  // before their turn, make it pessimistic. Off by default. With scope
  // kHost, the waiters ahead are those of every process and the estimate
  // is this process's own (host_resource.h). Not supported with a per-key
  // share (std::invalid_argument).
  bool early_reject = false;
  // Reserved shares (see "Priority classes" above): reserve[p] slots, p
  // indexed by priority_index(Priority), that only class p or a higher one
  // may take; every grant and release then takes the mutex. Each entry >= 0, reserve[kSheddable] 0 (the lowest class has
  // nobody below it to keep slots from), the sum <= capacity; all 0 (the
  // default): no reserve. With scope kHost, every process must pass the
  // same (std::invalid_argument otherwise, see host_resource.h). Not
  // supported with a per-key share (std::invalid_argument).
  std::array<std::int64_t, kPriorityCount> reserve{};
};

namespace detail {

class NoticeList;
class HostPool;

class WaiterNode;
struct KeyCount;

// Keys with queued waiters, ordered by a number of one of their waiters
// (an arrival number, or a count of waiters), ties broken by address.
using KeyOrder = std::set<std::pair<std::uint64_t, KeyCount*>>;

// Per-key state of a resource with a per-key share; lives in the resource's
// key map, guarded by its mutex, only while held + waiting > 0 (the waiters
// without a key have one more, kept by the resource for its life).
struct KeyCount {
  std::int64_t held = 0;     // slots the key holds
  std::int64_t waiting = 0;  // waiters of the key in the queue
  // The key's waiters, oldest first (linked through key_prev_/key_next_).
  WaiterNode* head = nullptr;
  WaiterNode* tail = nullptr;
  // While the key has waiters it is filed in the resource's key orders:
  // kEligible (below its share: its oldest and newest waiters are the ones
  // a free slot may go to) or kBlocked (at its share).
  enum class Filed : std::uint8_t { kNone, kEligible, kBlocked };
  Filed filed = Filed::kNone;
  KeyOrder::iterator first_entry{};   // kEligible: by oldest waiter
  KeyOrder::iterator second_entry{};  // kEligible: by newest; kBlocked: by count
  // The two entries while the key is not filed: allocated once when the key
  // first queues a waiter, so filing and refiling it never allocates.
  KeyOrder::node_type first_spare;
  KeyOrder::node_type second_spare;
};

// A queued request for one slot of one resource: an intrusive list node, so
// that queueing never allocates. The resource links and unlinks it and
// decides its fate under the resource's mutex; it then calls on_complete()
// after the mutex is released. Implemented by Acquisition.
class WaiterNode {
 public:
  enum class State : std::uint8_t { kIdle, kQueued, kGranted, kRejected };

  WaiterNode() = default;
  WaiterNode(const WaiterNode&) = delete;
  WaiterNode& operator=(const WaiterNode&) = delete;

 protected:
  // Never deleted through a WaiterNode*; virtual only because the friends
  // below make a protected destructor accessible (-Wnon-virtual-dtor).
  virtual ~WaiterNode() = default;

 private:
  friend class concurrency_limiter::Resource;
  friend class NoticeList;
  friend class concurrency_limiter::Acquisition;
  friend class HostPool;

  // Called once, without any lock held, when the resource granted the node a
  // slot (kGranted) or dropped it from the queue (kShed, kQueueFull), unless
  // the owner took it out first with Resource::abandon(). It must clear
  // completing_ (release store) as its last access to the node, must not
  // run user code itself (hand it to `notices.defer()`), and may push further
  // nodes onto `notices`. So an owner waiting to free a node only ever waits
  // for a few instructions under locks, never for a callback.
  virtual void on_complete(Outcome outcome, NoticeList& notices) noexcept = 0;

  WaiterNode* prev_ = nullptr;  // queue links; guarded by the resource's mu_
  WaiterNode* next_ = nullptr;  // also links a NoticeList once dequeued
  // Links in the resource's list of the waiters of the node's class;
  // guarded by the resource's mu_.
  WaiterNode* class_prev_ = nullptr;
  WaiterNode* class_next_ = nullptr;
  Clock::time_point enqueued_at_{};
  // When a queued node was handed its slot; unset for a slot granted at once.
  Clock::time_point granted_at_{};
  // When the request's owner gives up waiting (its timeout), or max() if it
  // did not say: what early rejection compares the predicted wait with.
  Clock::time_point deadline_ = Clock::time_point::max();
  // The wait in seconds that early rejection predicted when it refused the
  // node (kPredictedTimeout); 0 otherwise. Written under the resource's lock
  // before enqueue() returns, read by the owner after it.
  double predicted_wait_ = 0.0;
  // Whether the statistics measure this hold (see Resource::try_grant).
  bool measure_ = false;
  State state_ = State::kIdle;      // guarded by the resource's mu_
  Outcome outcome_ = Outcome::kPending;  // set together with state_
  // True from the moment the resource decides the node's fate until its
  // on_complete() has finished with the node. The owner waits for false
  // before the node's memory may go away (release store in on_complete,
  // acquire load by the owner).
  std::atomic<bool> completing_{false};
  // Host scope: index of the node's entry in the shared waiter table while
  // it is queued; guarded by the host pool's local mutex.
  std::uint32_t host_entry_ = 0;
  // The request's key (owned by the Acquisition, constant), null for none.
  const std::string* key_ = nullptr;
  // The request's priority class (set by the Acquisition, constant).
  Priority priority_ = Priority::kCritical;
  // While queued on a resource with a per-key share and key_ is set: the
  // key's entry in that resource's key map; guarded by the resource's mu_.
  KeyCount* key_count_ = nullptr;
  // Per-key shares: whether the node's share has kept it from a slot the
  // resource had (see kKeyLimit); guarded by the resource's mu_.
  bool held_back_ = false;
  // The resource's passed_over_ when the node was queued; guarded by its mu_.
  std::uint64_t passed_over_seen_ = 0;
  // Per-key shares: the node's arrival number in its resource's queue, and
  // its links in its key's list of waiters; guarded by the resource's mu_.
  std::uint64_t seq_ = 0;
  WaiterNode* key_prev_ = nullptr;
  WaiterNode* key_next_ = nullptr;
};

// Nodes whose fate was decided under a resource's mutex and whose owners must
// be told once every lock is released, and the completion callbacks that
// their owners then want called. Intrusive: reuses the queue links.
class NoticeList {
 public:
  using Callback = std::function<void(Outcome)>;

  NoticeList() = default;
  NoticeList(const NoticeList&) = delete;
  NoticeList& operator=(const NoticeList&) = delete;
  ~NoticeList() { fire(); }

  void push(WaiterNode* node) noexcept;
  // Queues `callback(outcome)` to run after every node has been told.
  void defer(Callback callback, Outcome outcome);
  // Calls on_complete() of every node in order (including nodes pushed
  // meanwhile), then the deferred callbacks. Call with no lock held.
  void fire() noexcept;

 private:
  WaiterNode* head_ = nullptr;
  WaiterNode* tail_ = nullptr;
  // One deferred call inline (the common case: a single handoff), the rest
  // in a vector.
  Callback first_;
  Outcome first_outcome_ = Outcome::kPending;
  std::vector<std::pair<Callback, Outcome>> more_;
};

}  // namespace detail

class Resource : public std::enable_shared_from_this<Resource> {
 public:
  // Largest capacity: the slot count shares one atomic word with other state.
  static constexpr std::int64_t kMaxCapacity = (std::int64_t{1} << 31) - 1;

  // Throws std::invalid_argument naming the parameter and the allowed values
  // when an option is out of range. Prefer create() (see "Lifetime" above).
  explicit Resource(ResourceOptions options);
  Resource(std::string name, std::int64_t capacity);

  // The resource, owned by a shared_ptr as "Lifetime" above recommends.
  static std::shared_ptr<Resource> create(ResourceOptions options) {
    return std::make_shared<Resource>(std::move(options));
  }
  static std::shared_ptr<Resource> create(std::string name, std::int64_t capacity) {
    return std::make_shared<Resource>(std::move(name), capacity);
  }

  Resource(const Resource&) = delete;
  Resource& operator=(const Resource&) = delete;
  // A resource owned by a shared_ptr is only destroyed once nothing holds or
  // waits for a slot. One that is not (see "Lifetime" above) aborts the
  // program with a message naming it if a slot is held or a request waits
  // (host scope: a slot held or a request waiting through this object).
  ~Resource();

  // Fails every request waiting for this resource with kUnavailable (their
  // callbacks and blocked threads are told at once, as for a timeout; a
  // request waiting for several resources releases what it held) and turns
  // every later request away with kUnavailable, at once. Slots already held
  // stay held until their Permit or Acquisition releases them. For a server
  // shutting down or a configuration being replaced (Seastar's
  // semaphore::broken()). Idempotent; cannot be undone.
  //   A request for several resources that already holds this one's slot and
  // waits for another is not failed by this close alone: it keeps the slot
  // and keeps waiting (and may be granted) unless a resource it still waits
  // for is closed too. Limiter::close() closes every resource of the Limiter.
  //   Host scope (host_resource.h): only the new requests made through this
  // Resource object are refused. Requests already waiting, this process's
  // included, are not failed: they keep waiting until granted (a slot of the
  // closed resource may still be granted to them), timed out or cancelled.
  void close() CL_EXCLUDES(mu_);
  bool closed() const noexcept { return closed_.load(std::memory_order_acquire); }

  const std::string& name() const noexcept { return name_; }
  // The number of slots. Host scope: the capacity in force host-wide, which
  // a newer process opening the name with another configuration changes
  // (see host_resource.h).
  std::int64_t capacity() const noexcept { return host_ ? host_capacity() : capacity_; }
  // The slots in force now, 1..capacity. A snapshot, as in_use(). Host
  // scope: the limit in force host-wide.
  std::int64_t limit() const noexcept {
    if (host_) return host_limit();
    return limit_.load(std::memory_order_relaxed);
  }
  // Puts `limit` slots in force. Throws std::invalid_argument unless
  // 1 <= limit <= capacity. Raising it grants waiters at once (in the queue
  // discipline's order; their callbacks run on this thread, after the lock is
  // released). Lowering it revokes nothing: each slot released while
  // in_use > limit is retired instead of handed over, and no slot is granted
  // until in_use < limit. On a resource with a limit algorithm, the
  // algorithm is told (LimitAlgorithm::on_set_limit) and moves on from
  // `limit` at its next decision (the built-in ones keep it within their
  // min_limit; a custom algorithm that ignores the hook puts its own limit
  // back at its next update). Host scope: the
  // limit of every process (waiters of other processes are granted by their
  // own background threads, woken at once).
  void set_limit(std::int64_t limit) CL_EXCLUDES(mu_, algorithm_mu_);
  bool adaptive() const noexcept { return algorithm_ != nullptr; }
  std::optional<std::int64_t> max_waiting() const noexcept;
  QueueDiscipline queue() const noexcept { return host_ ? host_queue() : discipline_; }
  Scope scope() const noexcept { return host_ ? Scope::kHost : Scope::kProcess; }
  // Host scope: what opening the name changed, for the log (empty if
  // nothing): a configuration replaced by this one (newest wins), or a
  // corrupt segment that no live process used replaced by a new one.
  // host_note_is_warning(): processes using the old configuration were alive.
  const std::string& host_note() const noexcept { return host_note_; }
  bool host_note_is_warning() const noexcept { return host_note_warning_; }
  // Most slots one key may hold; 0: no per-key share.
  std::int64_t per_key() const noexcept { return per_key_; }
  // Whether requests predicted to time out are refused at once
  // (ResourceOptions::early_reject).
  bool early_reject() const noexcept { return early_reject_; }
  // Slots reserved per priority class (ResourceOptions::reserve), indexed by
  // priority_index(Priority); all 0 for none.
  const std::array<std::int64_t, kPriorityCount>& reserve() const noexcept {
    return reserve_;
  }
  // Whether any class has a reserve.
  bool has_reserve() const noexcept { return reserved_; }
  // The slots that `reserve` slots of the capacity keep under `limit`
  // (priority.h, concurrency_limiter::scaled_reserve).
  std::int64_t scaled_reserve(std::int64_t reserve, std::int64_t limit) const noexcept {
    return concurrency_limiter::scaled_reserve(reserve, limit, capacity_);
  }

  // Slots held right now, and requests waiting right now. A snapshot: it may
  // be stale by the time the caller looks at it.
  std::int64_t in_use() const noexcept;
  std::int64_t waiting() const;
  ResourceStatistics statistics() const;

  // Blocking acquisition of one slot from a calling thread. These are
  // shorthands for a one-resource Acquisition; see Permit for the result.
  // A free slot with nobody waiting is taken without a lock, a heap
  // allocation or a clock read (with reserves: under the mutex).
  //
  // These take a slot without a key (exempt from a per-key share), of
  // class Priority::kCritical; use an Acquisition or Limiter::acquire() to
  // pass a key or a class.
  //
  // try_acquire(): never blocks. Succeeds only if a slot is free and nobody is
  //   waiting (with a per-key share: nobody who could use it); otherwise the
  //   returned Permit is empty with kTimeout (it is a zero timeout; kUnavailable
  //   once closed), without counting a rejection.
  // acquire_until(deadline): blocks the calling thread until a slot is handed
  //   to it (kGranted), the deadline passes (kTimeout), the queue rejects it
  //   (kQueueFull, kShed; kLowerPriority: pushed out for a request of a
  //   higher class), the resource is closed (kUnavailable) or `stop` is
  //   requested (kCancelled). A deadline not in the future means "try once":
  //   a free slot with nobody waiting is granted, otherwise the request is
  //   refused (kTimeout; kQueueFull if a full queue would have turned it away
  //   on arrival; counted as a rejection) without ever joining the queue, so
  //   it cannot push a waiter out of a full queue.
  // acquire_for(timeout): acquire_until(now + timeout); a timeout <= 0 tries
  //   once as above; a timeout too large to add to now
  //   (Clock::duration::max()) means "no deadline".
  Permit try_acquire();
  Permit acquire_until(Clock::time_point deadline, std::stop_token stop = {});
  Permit acquire_for(Clock::duration timeout, std::stop_token stop = {});

 private:
  friend class Acquisition;
  friend class Permit;

  Resource(ResourceOptions validated_options, int);
  // shared_from_this(), or for a resource not owned by a shared_ptr a
  // pointer that owns nothing (it shares unowned_uses_'s count only).
  std::shared_ptr<Resource> self();

  // ---- Slot accounting: the lock-free path and how it meets the queue ----
  //
  // word_ packs what both paths need into one atomic:
  //   bit  0      kWaitersBit: the queue is not empty. Changed under mu_ only.
  //   bits 1-31   slots held (in_use).
  //   bits 32-63  releases so far, modulo 2^32; folded into releases_folded_
  //               (under mu_) when bit 63 is set, long before they wrap.
  //
  // The protocol:
  //  - try_grant() takes a slot without the lock with a CAS that adds one to
  //    in_use, and only while kWaitersBit is clear and in_use < limit: so
  //    nobody passes a queued waiter. The limit is read again after the CAS
  //    (both sequentially consistent, as is set_limit()'s store): a grant
  //    that raced with a lower limit is undone, so no grant exceeds the limit
  //    in force when it completes.
  //  - try_give_back() returns a slot without the lock with a CAS that takes
  //    one from in_use and adds one release, and only while kWaitersBit is
  //    clear; otherwise the release goes through mu_ (release()) and hands
  //    the slot to the waiter the discipline picks.
  //  - A request that has to wait (enqueue(), under mu_) sets kWaitersBit
  //    with a CAS that succeeds only while every slot in force is held; if a
  //    slot was freed meanwhile the CAS fails and it takes that slot instead.
  //    It links itself into the queue only after the bit is set. From then on
  //    every release sees the bit and takes mu_, so a queued waiter is always
  //    found by the next release: none is ever stranded. The bit is cleared,
  //    under mu_, when the last waiter leaves the queue.
  //  - So while anyone waits, in_use >= limit and every change of a
  //    waiter's fate (grant, timeout, cancel, shed) happens under mu_: the
  //    grant-vs-timeout and grant-vs-cancel races are still decided in one
  //    place, abandon() against hand_over_locked().
  //
  // Memory order: a CAS that grants a slot is `acquire` and one that frees a
  // slot is `release`, so whatever a holder did before releasing happens
  // before the next holder's grant (as with a semaphore). Handoffs are
  // ordered by mu_, and on to the waiter's thread by its Acquisition's mutex.
  //
  // The statistics are kept exact without extra atomics on this path:
  // acquired_total = releases + in_use; grants that waited are counted under
  // mu_ (wait_seconds), so the ones granted at once (waiting 0 s) are the
  // difference; peak_in_use_ is raised by the rare grant that exceeds it.
  static constexpr std::uint64_t kWaitersBit = 1;
  static constexpr std::uint64_t kInUseOne = 2;
  static constexpr std::uint64_t kInUseMask = std::uint64_t{0x7fffffff} << 1;
  static constexpr int kReleaseShift = 32;
  static constexpr std::uint64_t kReleaseOne = std::uint64_t{1} << kReleaseShift;
  static constexpr std::uint64_t kFoldBit = std::uint64_t{1} << 63;
  // One hold in kMeasureEvery among those granted at once is timed for the
  // hold-time histogram (see statistics.h); every hold that waited is timed.
  static constexpr std::uint64_t kMeasureEvery = 64;

  static std::int64_t in_use_of(std::uint64_t word) noexcept {
    return static_cast<std::int64_t>((word & kInUseMask) >> 1);
  }

  // Takes a free slot without the lock if nobody waits. `measure` is set to
  // whether the statistics want this hold timed (then the caller reads the
  // clock for its start and passes measured=true to release()).
  // `key`: the request's key, null for none (per-key shares only).
  // `priority`: the request's class (counted per class; reserves).
  bool try_grant(bool& measure, const std::string* key = nullptr,
                 Priority priority = Priority::kCritical) noexcept CL_EXCLUDES(mu_) {
    if (closed_.load(std::memory_order_relaxed)) return false;
    if (host_) return host_try_grant(measure, priority);
    if (locked_) return locked_try_grant(measure, key, priority);
    // Counted before the slot is taken, so that the default class's share
    // (the rest) never shows a hold that is another class's.
    note_class_grant(priority);
    const std::uint64_t granted = take_free_slot();
    if (granted == 0) {
      note_class_revert(priority);
      return false;
    }
    if (in_use_of(granted) > limit_.load(std::memory_order_seq_cst)) {
      undo_grant();  // set_limit() lowered the limit meanwhile
      note_class_revert(priority);
      return false;
    }
    measure = note_grant(granted);
    return true;
  }
  // The one CAS loop of both grant paths (try_grant() without the lock,
  // grant_at_once_locked() under mu_): adds one to in_use while kWaitersBit
  // is clear and in_use < limit. Returns the word it produced (in_use >= 1),
  // or 0 if no slot was free. Does not re-check the limit: under mu_ it
  // cannot change (set_limit_locked()), without it try_grant() does.
  std::uint64_t take_free_slot() noexcept {
    std::uint64_t w = word_.load(std::memory_order_relaxed);
    do {
      if ((w & kWaitersBit) != 0 ||
          in_use_of(w) >= limit_.load(std::memory_order_relaxed)) {
        return 0;
      }
    } while (!word_.compare_exchange_weak(w, w + kInUseOne,
                                          std::memory_order_seq_cst,
                                          std::memory_order_relaxed));
    return w + kInUseOne;
  }
  void undo_grant() noexcept CL_EXCLUDES(mu_);

  // Gives back an unmeasured slot of the default class without the lock if
  // nobody waits. False: someone waits, use release(). (release() gives back
  // a slot of any class: it counts the class, then comes here.)
  bool try_give_back() noexcept CL_EXCLUDES(mu_) {
    if (host_ || locked_) return false;  // release() does it all
    std::uint64_t w = word_.load(std::memory_order_relaxed);
    do {
      if ((w & kWaitersBit) != 0) return false;
    } while (!word_.compare_exchange_weak(w, w - kInUseOne + kReleaseOne,
                                          std::memory_order_release,
                                          std::memory_order_relaxed));
    if (((w - kInUseOne + kReleaseOne) & kFoldBit) != 0) fold_releases();
    return true;
  }

  // After a grant that produced `word`: raises the peak, and decides whether
  // the hold is measured (every kMeasureEvery-th grant, counted by
  // releases + in_use, which a grant raises by exactly one; and every grant
  // until the first measured hold is recorded).
  bool note_grant(std::uint64_t word) noexcept {
    if constexpr (!kStatisticsEnabled) {
      return algorithm_ != nullptr || early_reject_;
    } else {
      const std::int64_t n = in_use_of(word);
      if (n > peak_in_use_.load(std::memory_order_relaxed)) raise_peak(n);
      const std::uint64_t grants = (word >> kReleaseShift) + static_cast<std::uint64_t>(n);
      return grants % kMeasureEvery == 0 || algorithm_ != nullptr || early_reject_ ||
             !hold_measured_.load(std::memory_order_acquire);
    }
  }
  void raise_peak(std::int64_t n) noexcept;
  // Per-class counts of the classes other than the default, whose share is
  // the rest (see class_held_). Without reserves, a grant counts its class
  // before the slot is taken (and takes it back if no slot was free), a
  // release after the slot is given back: so the default class's share may
  // read low for a moment, never high. With reserves, under mu_ together
  // with the slot.
  void note_class_grant(Priority priority) noexcept {
    if (priority == Priority::kCritical) return;
    class_held_[priority_index(priority)].fetch_add(1, std::memory_order_relaxed);
    if constexpr (kStatisticsEnabled) {
      class_acquired_[priority_index(priority)].fetch_add(1, std::memory_order_relaxed);
    }
  }
  // Release order: a snapshot that sees the class counted out also sees
  // the slot given back before it (see statistics()).
  void note_class_release(Priority priority) noexcept {
    if (priority == Priority::kCritical) return;
    class_held_[priority_index(priority)].fetch_sub(1, std::memory_order_release);
  }
  // A grant undone as if it had never been made (revert_grant()).
  void note_class_revert(Priority priority) noexcept {
    note_class_release(priority);
    if constexpr (kStatisticsEnabled) {
      if (priority != Priority::kCritical) {
        class_acquired_[priority_index(priority)].fetch_sub(1, std::memory_order_release);
      }
    }
  }
  // try_grant() and limit() of a host-scoped resource (src/host/).
  bool host_try_grant(bool& measure, Priority priority) noexcept;
  std::int64_t host_limit() const noexcept;
  std::int64_t host_capacity() const noexcept;
  QueueDiscipline host_queue() const noexcept;
  // try_grant() of a resource with a per-key share or reserves: under mu_.
  bool locked_try_grant(bool& measure, const std::string* key, Priority priority) noexcept
      CL_EXCLUDES(mu_);
  void fold_releases() noexcept CL_EXCLUDES(mu_);
  void fold_releases_locked() noexcept CL_REQUIRES(mu_);

  // ---- Entry points of the queueing path; each takes mu_ itself ----
  // Nodes whose fate they decide (grants, sheds) are appended to `notices`,
  // to be fired with no lock held.

  // Grants at once, or queues the node, or rejects it (kQueueFull). Returns
  // kGranted, kPending (queued) or kQueueFull.
  Outcome enqueue(detail::WaiterNode& node, detail::NoticeList& notices)
      CL_EXCLUDES(mu_);
  // Takes a queued node out of the queue with `reason`, counted as a
  // rejection. Returns the node's state: kQueued if it was still queued (it is
  // now rejected and will not be notified), else kGranted or kRejected when
  // the resource had already decided (its notice may still be in flight).
  detail::WaiterNode::State abandon(detail::WaiterNode& node, Outcome reason)
      CL_EXCLUDES(mu_);
  // Gives back a slot taken by try_grant() a moment ago, as if it had never
  // been granted: no acquisition, wait or hold is counted.
  // `key`: the key the slot was taken for, null for none; `priority`: the
  // class it was taken for.
  void revert_grant(detail::NoticeList& notices, const std::string* key = nullptr,
                    Priority priority = Priority::kCritical) CL_EXCLUDES(mu_);
  // Counts a rejection (of a request of class `priority`) that the resource
  // itself did not decide.
  void count_rejection(Outcome reason, Priority priority = Priority::kCritical)
      CL_EXCLUDES(mu_);
  // Why a request of `key` and `priority` that tried once, without
  // queueing, found no slot (see Acquisition::try_once()); counts it as a
  // rejection.
  Outcome refuse_try(const std::string* key, Priority priority = Priority::kCritical)
      CL_EXCLUDES(mu_);
  // Gives back one slot: hands it to the next waiter, frees it, or retires it
  // (in_use above the limit). A measured hold (held since `granted_at`, the
  // grant of the request's last slot; `now` read by the caller) is recorded
  // in the hold-time histogram and, unless `completion` is kIgnored, fed to
  // the limit algorithm (holds of adaptive resources are always measured).
  // `key`: the key the slot was held for, null for none; `priority`: the
  // class it was held for.
  void release(bool measured, Clock::time_point granted_at,
               Clock::time_point now, Completion completion,
               detail::NoticeList& notices, const std::string* key = nullptr,
               Priority priority = Priority::kCritical)
      CL_EXCLUDES(mu_);
  // Feeds one sample to the limit algorithm and puts its limit in force.
  void learn(const LimitSample& sample, detail::NoticeList& notices)
      CL_EXCLUDES(mu_, algorithm_mu_);
  void set_limit_locked(std::int64_t limit, Clock::time_point now,
                        detail::NoticeList& notices) CL_REQUIRES(mu_);

  // Helpers of the queueing path.
  // Takes a free slot under mu_ if nobody waits (the CAS of try_grant()).
  bool grant_at_once_locked(detail::WaiterNode& node) CL_REQUIRES(mu_);
  // A slot was given back: to the waiter the discipline picks, or freed.
  // `count_release`: false when undoing a grant (revert_grant()).
  void hand_over_locked(Clock::time_point now, bool count_release,
                        detail::NoticeList& notices) CL_REQUIRES(mu_);
  // Grants slots to waiters, in grant order, while the limit (and the
  // reserves) leave one for the waiter picked.
  void grant_while_room_locked(Clock::time_point now, detail::NoticeList& notices)
      CL_REQUIRES(mu_);
  // Reserves: slots each class holds now (exact under mu_, where every
  // grant and release of a resource with reserves is made).
  std::array<std::int64_t, kPriorityCount> class_held_locked() const CL_REQUIRES(mu_);
  // Whether a request of `priority` may take one more slot: one is free
  // under the limit and, with reserves, for every class c >= priority the
  // classes <= c would hold at most limit - (the reserves above c).
  bool class_may_take_locked(Priority priority) const CL_REQUIRES(mu_);
  // Calls the test hook of reserves (src/internal/test_hooks.h), if set.
  void after_reserved_grant_locked() const CL_REQUIRES(mu_);
  // Grant order across classes: the highest class with waiters, or -1.
  int highest_waiting_class_locked() const CL_REQUIRES(mu_);
  int lowest_waiting_class_locked() const CL_REQUIRES(mu_);
  // Per-key shares: whether a request of `key` (null: none) may take one
  // more slot as far as its share goes; the key's count of held slots
  // raised and lowered (erasing the entry when nothing is left).
  bool key_has_room_locked(const std::string* key) const CL_REQUIRES(mu_);
  void key_acquired_locked(const std::string* key) CL_REQUIRES(mu_);
  void key_released_locked(const std::string* key) CL_REQUIRES(mu_);
  // Moves a key's count of held slots, refiling the key if it crosses its
  // share.
  void change_held_locked(detail::KeyCount& count, std::int64_t delta) CL_REQUIRES(mu_);
  // Allocates the key's two spare order entries if it has none (may throw).
  void make_spares_locked(detail::KeyCount& count) CL_REQUIRES(mu_);
  // Files the key in the orders its waiters and share put it in now
  // (eligible_by_oldest_/eligible_by_newest_, blocked_by_count_, or none).
  void refile_locked(detail::KeyCount& count) noexcept CL_REQUIRES(mu_);
  using KeyMap = std::unordered_map<std::string, detail::KeyCount>;
  // Erases the key's entry (an element of keys_) if it holds and waits for
  // nothing.
  void erase_key_if_idle_locked(KeyMap::iterator it) CL_REQUIRES(mu_);
  // The first waiter, in the order `from_head`, that a free slot may go to,
  // which the caller grants: records whom it passes over (see kKeyLimit).
  // When no waiter may have the slot it counts passed_over_ instead.
  detail::WaiterNode* first_eligible_locked(bool from_head) CL_REQUIRES(mu_);
  // Whether a queued node's share has kept it from a slot the resource had.
  bool held_back_locked(const detail::WaiterNode& node) const CL_REQUIRES(mu_);
  void note_rejection_locked(Outcome reason, Priority priority) CL_REQUIRES(mu_);
  void link_tail(detail::WaiterNode& node, Clock::time_point now) CL_REQUIRES(mu_);
  void unlink(detail::WaiterNode& node) CL_REQUIRES(mu_);
  void reject_locked(detail::WaiterNode& node, Outcome reason,
                     detail::NoticeList& notices) CL_REQUIRES(mu_);
  bool standing_locked(Clock::time_point now) CL_REQUIRES(mu_);
  // Sheds the oldest waiters of the lowest classes waiting, and of none
  // above `below` (the class of a newcomer about to wait: a class is shed
  // only once every lower one is).
  void shed_locked(Clock::time_point now, detail::NoticeList& notices,
                   std::size_t below = kPriorityCount) CL_REQUIRES(mu_);
  detail::WaiterNode* pick_locked(Clock::time_point now,
                                  detail::NoticeList& notices) CL_REQUIRES(mu_);
  void grant_locked(detail::WaiterNode& node, Clock::time_point now)
      CL_REQUIRES(mu_);
  // Folds the releases not yet recorded in hold_seconds into the bucket of
  // the latest measured hold (see statistics.h).
  void attribute_unmeasured_locked(std::uint64_t releases) const CL_REQUIRES(mu_);

  static constexpr bool kStatisticsEnabled = CL_STATISTICS != 0;

  const std::string name_;
  // The name again, shared with the Permits this resource refuses, which may
  // outlive it (see Permit::refused_by_name()).
  const std::shared_ptr<const std::string> shared_name_;
  // Copied (aliased to this) by self() when the resource is not owned by a
  // shared_ptr: its count tells the destructor whether a Permit or a request
  // still uses the resource (host scope, whose slots are not counted here).
  const std::shared_ptr<const char> unowned_uses_;
  const std::int64_t capacity_;
  const std::int64_t max_waiting_;  // -1: unbounded
  const QueueDiscipline discipline_;
  const Clock::duration target_;
  const Clock::duration interval_;
  const std::shared_ptr<LimitAlgorithm> algorithm_;  // null: fixed limit
  const std::int64_t per_key_;  // 0: no per-key share
  const bool early_reject_;
  const bool reserved_;  // some reserve_[p] > 0
  // Every grant and release under mu_ (a per-key share or reserves).
  const bool locked_;
  // Set once by close(), under mu_; read without it by try_grant().
  std::atomic<bool> closed_{false};
  // Slots in force, 1..capacity_. Written under mu_ (seq_cst, see the
  // protocol above); read without it by the lock-free path.
  std::atomic<std::int64_t> limit_;
  // Serialises the algorithm's calls and the limits they put in force.
  // Order: algorithm_mu_ before mu_.
  detail::Mutex algorithm_mu_;

  // See the protocol above.
  std::atomic<std::uint64_t> word_{0};
  // Highest in_use granted so far (relaxed: a statistic; statistics() takes
  // the larger of it and in_use, so a grant not yet reflected here is seen).
  std::atomic<std::int64_t> peak_in_use_{0};
  // Set (release) once the first measured hold is recorded; until then every
  // hold is measured, so there is always a hold to attribute others to.
  std::atomic<bool> hold_measured_{false};

  mutable detail::Mutex mu_;
  std::int64_t waiting_ CL_GUARDED_BY(mu_) = 0;
  detail::WaiterNode* head_ CL_GUARDED_BY(mu_) = nullptr;  // oldest waiter
  detail::WaiterNode* tail_ CL_GUARDED_BY(mu_) = nullptr;  // newest waiter
  // The waiters of each class (indexed by priority_index()), oldest first,
  // linked through class_prev_/class_next_, and their number.
  struct ClassQueue {
    detail::WaiterNode* head = nullptr;
    detail::WaiterNode* tail = nullptr;
    std::int64_t waiting = 0;
  };
  std::array<ClassQueue, kPriorityCount> class_queues_ CL_GUARDED_BY(mu_){};
  // Since when the oldest waiter has been older than target_ without a break.
  std::optional<Clock::time_point> above_target_since_ CL_GUARDED_BY(mu_);
  // Per-key shares: the keys holding or waiting for a slot now, and only
  // those (see key_released_locked() and unlink()). Node-based, so a
  // KeyCount stays put while its key is in the map.
  KeyMap keys_ CL_GUARDED_BY(mu_);
  // The waiters without a key, as one more key that is never at its share.
  detail::KeyCount keyless_ CL_GUARDED_BY(mu_);
  // Keys with waiters and below their share (keyless_ included), by the
  // arrival number of their oldest waiter and of their newest: the first of
  // the one and the last of the other are the waiters FIFO and LIFO order
  // hand a free slot to. Keys with waiters at their share, by their count of
  // waiters (the last loses a waiter when the queue is full, see enqueue()).
  detail::KeyOrder eligible_by_oldest_ CL_GUARDED_BY(mu_);
  detail::KeyOrder eligible_by_newest_ CL_GUARDED_BY(mu_);
  detail::KeyOrder blocked_by_count_ CL_GUARDED_BY(mu_);
  // Always empty: makes the spare entries of make_spares_locked().
  detail::KeyOrder spares_ CL_GUARDED_BY(mu_);
  // Arrival number of the latest waiter queued (per-key shares only).
  std::uint64_t next_seq_ CL_GUARDED_BY(mu_) = 0;
  // Whom handoffs passed over (see kKeyLimit): a FIFO-order handoff to the
  // waiter numbered s passes every queued waiter older than s, so those
  // below the highest such s were passed; a LIFO-order one passes every
  // queued waiter newer than it, numbered in (lifo_passed_from_,
  // lifo_passed_to_) (the latest run of overlapping such ranges).
  std::uint64_t fifo_passed_below_ CL_GUARDED_BY(mu_) = 0;
  std::uint64_t lifo_passed_from_ CL_GUARDED_BY(mu_) = 0;
  std::uint64_t lifo_passed_to_ CL_GUARDED_BY(mu_) = 0;
  // Times a free slot passed over every waiter (all held back by their
  // shares); a waiter that sees it move was held back (see kKeyLimit).
  std::uint64_t passed_over_ CL_GUARDED_BY(mu_) = 0;
  // Releases taken out of word_ before they could wrap.
  std::uint64_t releases_folded_ CL_GUARDED_BY(mu_) = 0;
  // Counters and histograms. wait_seconds holds the grants that waited only;
  // hold_seconds the measured holds plus those attributed to them.
  mutable ResourceStatistics stats_ CL_GUARDED_BY(mu_);
  // Bucket and duration of the latest measured hold.
  std::size_t last_hold_bucket_ CL_GUARDED_BY(mu_) = 0;
  double last_hold_seconds_ CL_GUARDED_BY(mu_) = 0.0;
  // Moving estimate of service time, fed by the timed holds at release.
  ServiceTimeEstimate service_ CL_GUARDED_BY(mu_);

  // Host scope: every operation above is delegated to the machine-wide pool
  // (src/host/); null for process scope. Set once by the constructor.
  std::shared_ptr<detail::HostPool> host_;
  std::string host_note_;
  bool host_note_warning_ = false;

  // Last, so that the members of the lock-free path keep their places.
  const std::array<std::int64_t, kPriorityCount> reserve_;
  // Slots held by, and granted to, each class other than the default
  // (Priority::kCritical, whose entries stay 0): its share is in_use (and
  // acquired_total) minus theirs, so that the default class's lock-free
  // path counts nothing more. Relaxed: statistics, and (changed under mu_
  // only, with reserves) the reserve rule.
  std::array<std::atomic<std::int64_t>, kPriorityCount> class_held_{};
  std::array<std::atomic<std::uint64_t>, kPriorityCount> class_acquired_{};
  // Each class's acquired_total as statistics() last reported it: the
  // shares above are derived from counts that move a moment apart, so a
  // grant may be seen in the default class's share and then in its own;
  // reported counts never go down (Prometheus would read a reset).
  mutable std::array<std::uint64_t, kPriorityCount> class_acquired_reported_
      CL_GUARDED_BY(mu_){};
};

}  // namespace concurrency_limiter
