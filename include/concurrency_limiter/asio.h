// Asio integration: wait for slots without blocking a thread.
//
// async_acquire() is the asynchronous form of Limiter::acquire() for servers
// built on Asio (standalone Asio 1.22 or later, header only). It takes any
// completion token, so the same call serves callbacks, C++20 coroutines,
// deferred operations and futures:
//
//   #include "concurrency_limiter/asio.h"
//   namespace cl = concurrency_limiter;
//
//   asio::awaitable<void> handle(Session& s) {
//     auto [ec, permit] = co_await cl::async_acquire(
//         limiter, needs_db, std::chrono::seconds(2),
//         asio::experimental::as_tuple(asio::use_awaitable));
//     if (ec) {                        // ec.message(): "timed out waiting for resource 'db'"
//       co_await s.reply_503();
//       co_return;
//     }
//     co_await s.reply(co_await run_query());   // the slot is held until `permit` dies
//   }
//
// The handler's signature is void(std::error_code, Permit). On success the
// error code is clear and the Permit holds one slot of every resource of the
// set. Otherwise the Permit is empty and the error code says why; it compares
// equal to the Outcome (`ec == cl::Outcome::kTimeout`), its message names the
// resource that turned the request away, and a cancelled wait also compares
// equal to std::errc::operation_canceled (as asio::error::operation_aborted
// does), a timeout to std::errc::timed_out.
//
// What it waits on: the request joins the queue of each resource in the
// set's order, exactly as the blocking calls do; no thread blocks. The slot is
// handed over by whichever thread releases it (an I/O thread, a worker pool),
// and the completion is then posted to the handler's associated executor: the
// handler never runs inline, neither inside async_acquire() nor on the
// releasing thread. A strand, a second io_context or a coroutine's executor is
// honoured. An operation keeps its executor's io_context from running out of
// work while it waits.
//
// Executors, as in Asio's own operations: the handler's associated executor
// runs it. Where the handler has none (a plain callback, use_future), the
// I/O executor (or io_context) passed as the first argument does; the
// overloads without that argument require a handler that has one (a
// coroutine's, one bound with asio::bind_executor) and refuse to compile
// otherwise. Nothing runs on a hidden thread pool (asio::system_executor).
//
// Allocation: the operation and its shared state are allocated through the
// handler's associated allocator (asio::bind_allocator, a coroutine's frame
// allocator), as are the completion and the timer's handler. Not everything
// is: the engine's Acquisition, its waiter nodes and its copy of the key are
// allocated with the global operator new (and freed with operator delete),
// whatever the handler's allocator, so every async_acquire() still
// allocates from the global heap.
//
// Timeout: `timeout` covers acquiring every resource of the set; when it
// passes the request leaves the queue and completes with kTimeout, every slot
// it held released at once. One steady_timer per waiting request; no timer at
// all when a slot is free at once. A zero or negative timeout means "try
// once": granted if every resource has a slot free with nobody waiting,
// otherwise refused (kTimeout; kQueueFull where a full queue would have
// turned it away on arrival), posted like any completion; it never joins a
// queue, so
// it never takes a slot released later and never pushes a waiter out of a
// full queue. Clock::duration::max() (or anything beyond a century) waits
// without a deadline.
//
// Cancellation: per-operation cancellation of types terminal and partial is
// honoured through the handler's associated cancellation slot, so
// `co_await (async_acquire(..., use_awaitable) || timer.async_wait(use_awaitable))`
// and every other Asio composition work. A cancelled request leaves the queue
// and completes with kCancelled; nothing is held. Type total alone is not
// honoured (the request keeps waiting), because the operation cannot promise
// what it requires, that cancelling leaves no side effect: joining a LIFO,
// adaptive or per-key queue can already have pushed another waiter out of a
// full queue (kQueueFull, kKeyLimit) or shed it, which a cancel cannot undo.
// (Asio's parallel_group and operator|| emit terminal, which is honoured.)
// The grant-vs-timeout and grant-vs-cancel races are decided once by the
// engine under the resource's lock: when the slot was granted first, the
// operation completes with the Permit (and a caller that no longer wants it
// just drops it); otherwise the slot goes to the next waiter. A slot is never
// lost. As for every Asio operation, the cancellation slot must not be
// emitted concurrently with the operation's completion (emit from the
// handler's executor or strand).
//
// io_context destruction: operations still waiting when their io_context is
// destroyed leave their queues, and their handlers are destroyed without being
// called (the Asio rule for pending operations). A grant whose completion was
// posted but never ran is released when the io_context destroys it. Either
// way no slot stays taken and nothing leaks. Which io_context: the one of the
// handler's associated executor, or of the I/O executor passed in when that
// executor cannot name one (use_future); it must outlive its operations'
// completions, as for any Asio operation.
//
// Key: the overloads taking a `std::optional<std::string> key` before the
// timeout acquire for that client (see "Key" in acquisition.h): on resources
// with a per-key share no key holds more than its share, a key at its share
// waits without holding up other keys, and a timeout caused by the share
// completes with kKeyLimit (also equal to std::errc::timed_out). std::nullopt
// is exempt from the share, as the overloads without a key are.
//
// Priority: the overloads taking a `Priority` after the key acquire for that
// class (see "Priority classes" in resource.h): a freed slot goes to the
// highest class waiting, a full queue pushes out the newest waiter of the
// lowest class for a higher one (that operation completes with
// kLowerPriority), reserves keep slots for the classes above. The others
// acquire as Priority::kCritical. A class other than kCritical on a set
// with a per-key share throws
// std::invalid_argument from the async_acquire() call itself, whatever the
// completion token (a lazy one too: use_awaitable, deferred), before
// anything is queued.
//
// Lifetime: the operation owns the set's resources (and its Permit them, see
// permit.h): the Limiter may be destroyed while operations wait. Closing a
// resource (Resource::close(), Limiter::close()) completes its waiting
// operations with kUnavailable.
//
// Thread safety: async_acquire() may be called from any thread, concurrently
// with itself and with releases from other threads.
//
// Boost.Asio: not supported; this header needs standalone Asio (1.22+).
// Boost.Asio 1.77+ has everything used here, but its completion convention
// is boost::system::error_code, not std::error_code: with std::error_code
// in the signature, `co_await ... use_awaitable` would not throw on a
// rejection, and as_tuple users would get the other type. Supporting it means
// a second completion signature with the Outcome conditions carried through
// Boost.System's std::error_category interop, and a CI build against Boost
// 1.77+ to keep it working (Debian 12's default libboost-dev is 1.74, which
// lacks cancellation slots). Standalone Asio and Boost.Asio can coexist in
// one program: an io_context of each, async_acquire() on the standalone one.
#pragma once

#include <asio/associated_allocator.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/execution.hpp>
#include <asio/execution_context.hpp>
#include <asio/post.hpp>
#include <asio/prefer.hpp>
#include <asio/query.hpp>
#include <asio/steady_timer.hpp>
#include <asio/system_executor.hpp>
#include <asio/version.hpp>
#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>

#include "concurrency_limiter/acquisition.h"
#include "concurrency_limiter/internal/mutex.h"
#include "concurrency_limiter/internal/thread_annotations.h"
#include "concurrency_limiter/limiter.h"
#include "concurrency_limiter/outcome.h"
#include "concurrency_limiter/permit.h"
#include "concurrency_limiter/resource_set.h"

#if ASIO_VERSION < 102200
#error "concurrency_limiter/asio.h needs Asio 1.22 or later (cancellation slots)"
#endif

namespace concurrency_limiter {

// --- Error codes ----------------------------------------------------------

// The category of the error conditions `Outcome::kTimeout` ... `kCancelled`
// (`ec == Outcome::kShed`). Its name is "concurrency_limiter".
const std::error_category& outcome_category() noexcept;

// The category of the error codes of one resource: same values and
// conditions as outcome_category(), with messages that name the resource
// ("timed out waiting for resource 'db'"). One per name, kept for the life
// of the program.
const std::error_category& resource_category(std::string_view resource_name);

// The error code of a rejected Permit (clear for a granted one).
std::error_code make_error_code(const Permit& permit);

inline std::error_condition make_error_condition(Outcome o) noexcept {
  return {static_cast<int>(o), outcome_category()};
}

}  // namespace concurrency_limiter

template <>
struct std::is_error_condition_enum<concurrency_limiter::Outcome> : std::true_type {};

namespace concurrency_limiter {
namespace detail {

inline std::string outcome_message(int value, std::string_view resource) {
  std::string on = resource.empty() ? std::string("a resource")
                                    : "resource '" + std::string(resource) + "'";
  switch (static_cast<Outcome>(value)) {
    case Outcome::kGranted: return "granted";
    case Outcome::kTimeout: return "timed out waiting for " + on;
    case Outcome::kQueueFull: return "queue full for " + on;
    case Outcome::kShed: return "shed from the queue of " + on;
    case Outcome::kDisconnected: return "client disconnected while waiting for " + on;
    case Outcome::kCancelled: return "cancelled while waiting for " + on;
    case Outcome::kKeyLimit: return "key at its per-key share of " + on;
    case Outcome::kUnavailable: return on + " unavailable (closed, or its shared state out of reach)";
    case Outcome::kDeadline: return "client's deadline spent waiting for " + on;
    case Outcome::kPredictedTimeout:
      return "predicted to time out waiting for " + on;
    case Outcome::kLowerPriority:
      return "pushed out of the queue of " + on + " by a request of a higher priority";
    case Outcome::kPending: return "still waiting for " + on;
  }
  return "unknown outcome";
}

class OutcomeCategory : public std::error_category {
 public:
  explicit OutcomeCategory(std::string resource = {}) : resource_(std::move(resource)) {}
  const char* name() const noexcept override { return "concurrency_limiter"; }
  std::string message(int value) const override {
    return outcome_message(value, resource_);
  }
  std::error_condition default_error_condition(int value) const noexcept override {
    return {value, outcome_category()};
  }
  // Also equal to the generic conditions a caller may already test for.
  bool equivalent(int value, const std::error_condition& cond) const noexcept override {
    if (cond == default_error_condition(value)) return true;
    const auto o = static_cast<Outcome>(value);
    return (o == Outcome::kCancelled && cond == std::errc::operation_canceled) ||
           ((o == Outcome::kTimeout || o == Outcome::kKeyLimit || o == Outcome::kDeadline ||
             o == Outcome::kPredictedTimeout) &&
            cond == std::errc::timed_out) ||
           (o == Outcome::kUnavailable && cond == std::errc::resource_unavailable_try_again);
  }

 private:
  const std::string resource_;
};

}  // namespace detail

inline const std::error_category& outcome_category() noexcept {
  static const detail::OutcomeCategory category;
  return category;
}

inline const std::error_category& resource_category(std::string_view resource_name) {
  // Never freed: error codes may outlive every resource and static
  // destructors. One small object per distinct resource name.
  struct Registry {
    detail::Mutex mu;
    std::map<std::string, std::unique_ptr<detail::OutcomeCategory>, std::less<>>
        by_name CL_GUARDED_BY(mu);
  };
  static Registry* const registry = new Registry;
  detail::MutexLock lock(registry->mu);
  auto it = registry->by_name.find(resource_name);
  if (it == registry->by_name.end()) {
    it = registry->by_name
             .emplace(std::string(resource_name),
                      std::make_unique<detail::OutcomeCategory>(std::string(resource_name)))
             .first;
  }
  return *it->second;
}

inline std::error_code make_error_code(const Permit& permit) {
  if (permit.outcome() == Outcome::kGranted) return {};
  const int value = static_cast<int>(permit.outcome());
  if (permit.refused_by_name().empty()) return {value, outcome_category()};
  return {value, resource_category(permit.refused_by_name())};
}

// --- async_acquire ----------------------------------------------------------

namespace detail {

class AcquireService;

// A waiting operation as its service sees it.
class PendingAcquire {
 public:
  PendingAcquire(const PendingAcquire&) = delete;
  PendingAcquire& operator=(const PendingAcquire&) = delete;

  // The engine decided the acquisition: post the completion, which takes
  // ownership of this operation. Called once, with the claim mutex held.
  virtual void complete() noexcept = 0;
  // Deletes the operation without calling its handler.
  virtual void destroy() noexcept = 0;

  // Shared with the engine's callback, the timer and the cancellation slot,
  // which may outlive the operation.
  struct Shared {
    // Lets the timer and the cancellation slot reach the acquisition while
    // it may still be pending; cleared before the acquisition is handed to
    // the handler or destroyed. Held across Acquisition::cancel(), whose
    // completion callback takes claim_mu: order cancel_mu, then claim_mu.
    Mutex cancel_mu CL_ACQUIRED_BEFORE(claim_mu);
    Acquisition* acquisition CL_GUARDED_BY(cancel_mu) = nullptr;
    // Decides who owns a pending operation once it leaves the waiting state:
    // the engine's callback (which posts its completion while holding the
    // mutex) or the service shutting down (which destroys it). So a
    // completion is never posted to an io_context that is already gone.
    Mutex claim_mu;
    PendingAcquire* op CL_GUARDED_BY(claim_mu) = nullptr;
  };

  // True if the caller now owns the operation (the engine had not decided).
  bool claim() noexcept {
    MutexLock lock(shared_->claim_mu);
    return std::exchange(shared_->op, nullptr) != nullptr;
  }

 protected:
  explicit PendingAcquire(std::shared_ptr<Shared> shared) : shared_(std::move(shared)) {}
  // Never deleted through a PendingAcquire* (destroy() does it); virtual
  // only because the friend below makes it accessible (-Wnon-virtual-dtor).
  virtual ~PendingAcquire() = default;

  std::shared_ptr<Shared> shared_;

 private:
  friend class AcquireService;
  PendingAcquire* prev_ = nullptr;  // guarded by the service's mu_
  PendingAcquire* next_ = nullptr;  // guarded by the service's mu_
  bool linked_ = false;             // guarded by the service's mu_
};

// Knows the operations waiting in one execution context, so that they can
// be ended when the context shuts down.
class AcquireService final : public asio::execution_context::service {
 public:
  inline static asio::execution_context::id id;

  explicit AcquireService(asio::execution_context& context) : service(context) {}

  // False once the context is shutting down: the caller destroys the
  // operation instead of starting it.
  bool add(PendingAcquire& op) {
    MutexLock lock(mu_);
    if (shut_down_) return false;
    op.prev_ = nullptr;
    op.next_ = head_;
    if (head_) head_->prev_ = &op;
    head_ = &op;
    op.linked_ = true;
    return true;
  }

  void remove(PendingAcquire& op) noexcept {
    MutexLock lock(mu_);
    unlink_locked(op);
  }

 private:
  void unlink_locked(PendingAcquire& op) noexcept CL_REQUIRES(mu_) {
    if (!op.linked_) return;
    if (op.prev_) op.prev_->next_ = op.next_; else head_ = op.next_;
    if (op.next_) op.next_->prev_ = op.prev_;
    op.prev_ = op.next_ = nullptr;
    op.linked_ = false;
  }

  // Runs before the scheduler's own shutdown (services shut down newest
  // first, and the scheduler is the context's first service), so a
  // completion posted by a callback that won claim() is still destroyed by
  // the scheduler. Operations are ended one at a time without mu_ held:
  // destroying one may release slots and complete others.
  void shutdown() override {
    for (;;) {
      PendingAcquire* op;
      {
        MutexLock lock(mu_);
        shut_down_ = true;
        op = head_;
        if (!op) return;
        unlink_locked(*op);
      }
      if (op->claim()) op->destroy();
    }
  }

  Mutex mu_;
  PendingAcquire* head_ CL_GUARDED_BY(mu_) = nullptr;
  bool shut_down_ CL_GUARDED_BY(mu_) = false;
};

template <class Executor>
inline constexpr bool kHasContext =
    asio::execution::is_executor<Executor>::value &&
    asio::can_query<Executor, asio::execution::context_t>::value;

template <class Executor>
asio::execution_context& context_of(const Executor& ex) {
  return asio::query(ex, asio::execution::context);
}

// The executor whose context owns the operation (its timer and its service):
// the handler's when it can name a context, else the I/O executor.
template <class HandlerExecutor, class IoExecutor>
auto owning_executor(const HandlerExecutor& handler_ex, const IoExecutor& io_ex) {
  if constexpr (kHasContext<HandlerExecutor>) {
    return handler_ex;
  } else {
    return io_ex;
  }
}

template <class Handler>
void invoke_with(Handler& handler, Permit permit) {
  const std::error_code ec = make_error_code(permit);
  std::move(handler)(ec, std::move(permit));
}

template <class Handler>
using HandlerAllocator = asio::associated_allocator_t<Handler, std::allocator<void>>;

template <class Allocator, class T>
using Rebound = typename std::allocator_traits<Allocator>::template rebind_alloc<T>;

// A completion decided at once (granted, or a zero timeout refused), posted
// to the handler's executor with the handler's allocator.
template <class Handler>
struct ImmediateCompletion {
  using allocator_type = HandlerAllocator<Handler>;
  allocator_type get_allocator() const noexcept {
    return asio::get_associated_allocator(handler, std::allocator<void>());
  }
  void operator()() { invoke_with(handler, std::move(permit)); }

  Handler handler;
  Permit permit;
};

// The timer's handler: expires the acquisition unless it was decided.
template <class Allocator>
struct ExpireOnTimer {
  using allocator_type = Allocator;
  allocator_type get_allocator() const noexcept { return allocator; }
  void operator()(const std::error_code& ec) const {
    if (ec) return;  // cancelled: the operation completed first
    MutexLock lock(shared->cancel_mu);
    if (shared->acquisition) shared->acquisition->expire();
  }

  std::shared_ptr<PendingAcquire::Shared> shared;
  Allocator allocator;
};

template <class Handler, class HandlerExecutor>
class AcquireOp final : public PendingAcquire {
 public:
  using Allocator = HandlerAllocator<Handler>;

  // Allocates the operation (and its shared state) through the handler's
  // associated allocator.
  static AcquireOp* create(Handler handler, const HandlerExecutor& handler_ex,
                           AcquireService& service,
                           std::unique_ptr<Acquisition> acquisition) {
    const Allocator allocator = asio::get_associated_allocator(handler, std::allocator<void>());
    Rebound<Allocator, AcquireOp> op_allocator(allocator);
    using Traits = std::allocator_traits<Rebound<Allocator, AcquireOp>>;
    AcquireOp* op = Traits::allocate(op_allocator, 1);
    try {
      auto shared = std::allocate_shared<Shared>(Rebound<Allocator, Shared>(allocator));
      return ::new (static_cast<void*>(op))
          AcquireOp(std::move(handler), handler_ex, service, std::move(acquisition),
                    std::move(shared), allocator);
    } catch (...) {
      Traits::deallocate(op_allocator, op, 1);
      throw;
    }
  }

  // Arms the timer, connects the cancellation slot and queues the request.
  // The caller owns the operation until this returns.
  template <class OwningExecutor>
  void start(const OwningExecutor& owner_ex, Clock::duration timeout) {
    if (!service_.add(*this)) {  // the context is shutting down
      dispose();
      return;
    }
    auto shared = shared_;
    // Held until the acquisition is started, so a timer or a cancellation
    // arriving meanwhile (from another thread) acts on a started request.
    MutexLock cancel_lock(shared->cancel_mu);
    shared->acquisition = acquisition_.get();
    {
      MutexLock lock(shared->claim_mu);
      shared->op = this;
    }
    // Beyond a century counts as no deadline (and cannot overflow the clock).
    if (timeout < std::chrono::hours(24 * 365 * 100)) {
      timer_.emplace(owner_ex);
      timer_->expires_after(timeout);
      timer_->async_wait(ExpireOnTimer<Allocator>{shared, allocator_});
    }
    slot_ = asio::get_associated_cancellation_slot(handler_);
    if (slot_.is_connected()) {
      slot_.assign([shared](asio::cancellation_type type) {
        // Not total: see "Cancellation" at the top of this header.
        constexpr auto honoured =
            asio::cancellation_type::terminal | asio::cancellation_type::partial;
        if ((type & honoured) == asio::cancellation_type::none) return;
        MutexLock lock(shared->cancel_mu);
        if (shared->acquisition) shared->acquisition->cancel(Outcome::kCancelled);
      });
    }
    const Outcome o = acquisition_->start(
        [shared](Outcome) {
          MutexLock lock(shared->claim_mu);
          if (PendingAcquire* op = std::exchange(shared->op, nullptr)) op->complete();
        },
        timer_ ? Clock::now() + timeout : Clock::time_point::max());
    if (o != Outcome::kPending) {  // decided at once: no callback will come
      shared->acquisition = nullptr;
      MutexLock lock(shared->claim_mu);
      shared->op = nullptr;
      complete();
    }
  }

  void complete() noexcept override {
    asio::post(work_, Completion{this});
  }

  void destroy() noexcept override {
    {
      MutexLock lock(shared_->cancel_mu);
      shared_->acquisition = nullptr;
    }
    dispose();
  }

 private:
  AcquireOp(Handler handler, const HandlerExecutor& handler_ex, AcquireService& service,
            std::unique_ptr<Acquisition> acquisition, std::shared_ptr<Shared> shared,
            const Allocator& allocator)
      : PendingAcquire(std::move(shared)),
        handler_(std::move(handler)),
        allocator_(allocator),
        work_(asio::prefer(handler_ex, asio::execution::outstanding_work.tracked)),
        service_(service),
        acquisition_(std::move(acquisition)) {}

  // Posted to the handler's executor; owns the operation until it runs.
  struct Completion {
    using allocator_type = Allocator;
    allocator_type get_allocator() const noexcept { return op->allocator_; }

    AcquireOp* op;
    Completion(AcquireOp* o) : op(o) {}
    Completion(Completion&& other) noexcept : op(std::exchange(other.op, nullptr)) {}
    Completion& operator=(Completion&&) = delete;
    ~Completion() {
      if (op) op->destroy();  // never run: the context was destroyed
    }
    void operator()() { std::exchange(op, nullptr)->finish(); }
  };

  ~AcquireOp() {
    service_.remove(*this);
    // The members go in reverse order: the timer (cancelling its wait), then
    // the acquisition (leaving the queue or releasing its slots), the work.
  }

  // Destroys and frees the operation through the handler's allocator.
  void dispose() noexcept {
    Rebound<Allocator, AcquireOp> op_allocator(allocator_);
    this->~AcquireOp();
    std::allocator_traits<Rebound<Allocator, AcquireOp>>::deallocate(op_allocator, this, 1);
  }

  void finish() {
    {
      MutexLock lock(shared_->cancel_mu);
      shared_->acquisition = nullptr;  // the timer and the slot can no longer act
    }
    if (slot_.is_connected()) slot_.clear();
    // The permit owns its resources (or the one that refused it): the error
    // code below may name a resource nobody else holds any more.
    Permit permit = make_permit(std::move(acquisition_));
    Handler handler = std::move(handler_);
    dispose();  // frees the timer and the work before the handler runs
    invoke_with(handler, std::move(permit));
  }

  Handler handler_;
  Allocator allocator_;
  std::decay_t<decltype(asio::prefer(std::declval<const HandlerExecutor&>(),
                                     asio::execution::outstanding_work.tracked))>
      work_;
  AcquireService& service_;
  std::unique_ptr<Acquisition> acquisition_;
  std::optional<asio::steady_timer> timer_;
  asio::cancellation_slot slot_;
};

// The I/O executor of the overloads without one: none. The handler's
// associated executor must then do (see "Executors" at the top).
struct NoIoExecutor {};

template <class IoExecutor>
struct InitiationBase {
  using executor_type = IoExecutor;
  explicit InitiationBase(const IoExecutor& ex) : ex_(ex) {}
  executor_type get_executor() const noexcept { return ex_; }

  IoExecutor ex_;
};

template <>
struct InitiationBase<NoIoExecutor> {
  explicit InitiationBase(NoIoExecutor) {}
};

template <class IoExecutor>
class AcquireInitiation : public InitiationBase<IoExecutor> {
 public:
  explicit AcquireInitiation(const IoExecutor& ex) : InitiationBase<IoExecutor>(ex) {}

  template <class Handler>
  void operator()(Handler&& handler, std::shared_ptr<const ResourceSet> set,
                  Clock::duration timeout) const {
    start(std::forward<Handler>(handler), std::make_unique<Acquisition>(std::move(set)),
          timeout);
  }
  // With a key, null for none. (A pointer, not a std::optional: GCC 12
  // warns, wrongly, of an uninitialised optional<string> carried through
  // async_initiate.)
  template <class Handler>
  void operator()(Handler&& handler, std::shared_ptr<const ResourceSet> set,
                  Clock::duration timeout, std::unique_ptr<std::string> key,
                  Priority priority = Priority::kCritical) const {
    std::optional<std::string> k;
    if (key) k = std::move(*key);
    start(std::forward<Handler>(handler),
          std::make_unique<Acquisition>(std::move(set), std::move(k), priority), timeout);
  }
  // An acquisition made by async_acquire() itself, so that a refused class
  // throws at the call whatever the completion token (a lazy one, such as
  // use_awaitable or deferred, runs the initiation only when awaited).
  template <class Handler>
  void operator()(Handler&& handler, std::unique_ptr<Acquisition> acquisition,
                  Clock::duration timeout) const {
    start(std::forward<Handler>(handler), std::move(acquisition), timeout);
  }

 private:
  template <class Handler>
  static auto handler_executor(const Handler& handler, const InitiationBase<IoExecutor>& base) {
    if constexpr (std::is_same_v<IoExecutor, NoIoExecutor>) {
      static_assert(!std::is_same_v<asio::associated_executor_t<Handler>, asio::system_executor>,
                    "async_acquire: this completion handler has no associated executor "
                    "(a plain callback): pass an I/O executor or an io_context as the "
                    "first argument, or bind one with asio::bind_executor");
      return asio::get_associated_executor(handler);
    } else {
      return asio::get_associated_executor(handler, base.ex_);
    }
  }

  template <class Handler>
  void start(Handler&& handler, std::unique_ptr<Acquisition> acquisition,
             Clock::duration timeout) const {
    using H = std::decay_t<Handler>;
    auto handler_ex = handler_executor(handler, *this);
    // A timeout <= 0 tries once and never queues; otherwise the uncontended
    // case takes its slots at once.
    bool decided = true;
    if (timeout <= Clock::duration::zero()) {
      acquisition->try_once();
    } else {
      decided = acquisition->try_acquire();
    }
    if (decided) {
      // No timer, no bookkeeping, one post.
      asio::post(handler_ex, ImmediateCompletion<H>{H(std::forward<Handler>(handler)),
                                                    make_permit(std::move(acquisition))});
      return;
    }
    auto owner_ex = [&] {
      if constexpr (std::is_same_v<IoExecutor, NoIoExecutor>) {
        return handler_ex;
      } else {
        return owning_executor(handler_ex, this->ex_);
      }
    }();
    static_assert(kHasContext<decltype(owner_ex)>,
                  "async_acquire needs an I/O executor: pass one (or an "
                  "io_context) as its first argument");
    auto& service = asio::use_service<AcquireService>(context_of(owner_ex));
    auto* op = AcquireOp<H, decltype(handler_ex)>::create(
        H(std::forward<Handler>(handler)), handler_ex, service, std::move(acquisition));
    op->start(owner_ex, timeout);
  }
};

template <class T>
inline constexpr bool kIsExecutor =
    asio::execution::is_executor<T>::value || asio::is_executor<T>::value;

// A token the overloads without an I/O executor accept: anything but a
// handler without an associated executor (a plain callback), which would
// have nowhere to run.
template <class Token>
inline constexpr bool kCarriesExecutor =
    !std::is_invocable_v<std::decay_t<Token>&&, std::error_code, Permit> ||
    !std::is_same_v<asio::associated_executor_t<std::decay_t<Token>>, asio::system_executor>;

}  // namespace detail

// Acquires a slot of every resource in `set` (from limiter.select()) within
// `timeout`, without blocking, and completes `token` with
// (std::error_code, Permit) on the handler's associated executor. See the top
// of this header for the semantics.
//
// `io_executor` (or `context`) is the executor of handlers that have none (a
// plain callback), and owns the operation when the handler's executor cannot
// name an execution context (use_future). The overloads without it require a
// handler with an associated executor (coroutines, bound handlers).
// `limiter` selected `set` and supplies the timeout of the overloads without
// one; `set` owns its resources, so the limiter need not outlive the call.
template <class Executor, class CompletionToken>
  requires detail::kIsExecutor<Executor>
auto async_acquire(const Executor& io_executor, const Limiter& limiter,
                   std::shared_ptr<const ResourceSet> set, Clock::duration timeout,
                   CompletionToken&& token) {
  static_cast<void>(limiter);  // the timeout is given
  return asio::async_initiate<CompletionToken, void(std::error_code, Permit)>(
      detail::AcquireInitiation<Executor>(io_executor), token,
      std::move(set), timeout);
}

// For client `key` (see "Key" above).
template <class Executor, class CompletionToken>
  requires detail::kIsExecutor<Executor>
auto async_acquire(const Executor& io_executor, const Limiter& limiter,
                   std::shared_ptr<const ResourceSet> set,
                   std::optional<std::string> key, Clock::duration timeout,
                   CompletionToken&& token) {
  static_cast<void>(limiter);  // the timeout is given
  return asio::async_initiate<CompletionToken, void(std::error_code, Permit)>(
      detail::AcquireInitiation<Executor>(io_executor), token, std::move(set), timeout,
      key ? std::make_unique<std::string>(std::move(*key)) : nullptr);
}

// For client `key` (std::nullopt: none) and priority class `priority` (see
// "Priority" above).
template <class Executor, class CompletionToken>
  requires detail::kIsExecutor<Executor>
auto async_acquire(const Executor& io_executor, const Limiter& limiter,
                   std::shared_ptr<const ResourceSet> set, std::optional<std::string> key,
                   Priority priority, Clock::duration timeout, CompletionToken&& token) {
  static_cast<void>(limiter);  // the timeout is given
  auto acquisition = std::make_unique<Acquisition>(std::move(set), std::move(key), priority);
  return asio::async_initiate<CompletionToken, void(std::error_code, Permit)>(
      detail::AcquireInitiation<Executor>(io_executor), token, std::move(acquisition), timeout);
}

// With the limiter's timeout.
template <class Executor, class CompletionToken>
  requires detail::kIsExecutor<Executor>
auto async_acquire(const Executor& io_executor, const Limiter& limiter,
                   std::shared_ptr<const ResourceSet> set, CompletionToken&& token) {
  return async_acquire(io_executor, limiter, std::move(set), limiter.timeout(),
                       std::forward<CompletionToken>(token));
}

template <class ExecutionContext, class... Args>
  requires std::is_convertible_v<ExecutionContext&, asio::execution_context&>
auto async_acquire(ExecutionContext& context, const Limiter& limiter, Args&&... args) {
  return async_acquire(context.get_executor(), limiter, std::forward<Args>(args)...);
}

// Without an I/O executor: the handler's associated executor runs the
// completion and owns the operation (a coroutine's, use_awaitable; one bound
// with asio::bind_executor). A handler without one does not compile.
template <class CompletionToken>
  requires detail::kCarriesExecutor<CompletionToken>
auto async_acquire(const Limiter& limiter, std::shared_ptr<const ResourceSet> set,
                   Clock::duration timeout, CompletionToken&& token) {
  static_cast<void>(limiter);  // the timeout is given
  return asio::async_initiate<CompletionToken, void(std::error_code, Permit)>(
      detail::AcquireInitiation<detail::NoIoExecutor>(detail::NoIoExecutor{}), token,
      std::move(set), timeout);
}

template <class CompletionToken>
  requires detail::kCarriesExecutor<CompletionToken>
auto async_acquire(const Limiter& limiter, std::shared_ptr<const ResourceSet> set,
                   CompletionToken&& token) {
  return async_acquire(limiter, std::move(set), limiter.timeout(),
                       std::forward<CompletionToken>(token));
}

template <class CompletionToken>
  requires detail::kCarriesExecutor<CompletionToken>
auto async_acquire(const Limiter& limiter, std::shared_ptr<const ResourceSet> set,
                   std::optional<std::string> key, Clock::duration timeout,
                   CompletionToken&& token) {
  static_cast<void>(limiter);  // the timeout is given
  return asio::async_initiate<CompletionToken, void(std::error_code, Permit)>(
      detail::AcquireInitiation<detail::NoIoExecutor>(detail::NoIoExecutor{}), token,
      std::move(set), timeout,
      key ? std::make_unique<std::string>(std::move(*key)) : nullptr);
}

template <class CompletionToken>
  requires detail::kCarriesExecutor<CompletionToken>
auto async_acquire(const Limiter& limiter, std::shared_ptr<const ResourceSet> set,
                   std::optional<std::string> key, Priority priority, Clock::duration timeout,
                   CompletionToken&& token) {
  static_cast<void>(limiter);  // the timeout is given
  auto acquisition = std::make_unique<Acquisition>(std::move(set), std::move(key), priority);
  return asio::async_initiate<CompletionToken, void(std::error_code, Permit)>(
      detail::AcquireInitiation<detail::NoIoExecutor>(detail::NoIoExecutor{}), token,
      std::move(acquisition), timeout);
}

}  // namespace concurrency_limiter
