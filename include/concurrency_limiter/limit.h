// Limit algorithms: how an adaptive resource chooses its limit.
//
// A resource enforces a limit (the slots in force now, 1..capacity); a
// LimitAlgorithm decides it. The two are separate, as in Netflix's
// concurrency-limits: the resource feeds the algorithm one LimitSample per
// released slot and puts in force whatever limit the algorithm returns, so
// any algorithm can be plugged in from C++:
//
//   auto db = std::make_shared<Resource>(ResourceOptions{
//       .name = "db", .capacity = 50,
//       .limit_algorithm = std::make_shared<Gradient2Limit>()});
//
// Shipped algorithms (compared on the grid of bench/limit_grid.cc;
// docs/adaptive.md):
//   Gradient2Limit a latency gradient against an averaged no-load latency,
//                  after Netflix's Gradient2 (the default of adaptive
//                  resources);
//   VegasLimit     keeps an estimated queue between two thresholds, after
//                  Netflix's VegasLimit;
//   AimdLimit      additive increase, multiplicative decrease on drops;
//   GradientLimit  the default of earlier versions: it collapses when
//                  service times vary widely;
//   FixedLimit     a constant.
//
// Thread safety: a resource calls its algorithm's start() once and then
// update() for every sample, never two calls at once, so an algorithm needs no
// locking of its own. An algorithm instance belongs to one resource.
//
// Host scope (host_resource.h): one limit for every process of the machine
// needs one algorithm fed by every process's samples, so its state lives in
// shared memory, where an object with virtual functions cannot. The built-in
// algorithms therefore keep their whole state in a trivially copyable
// `State` (state(), restore()), and their options in plain structs; a host
// resource accepts only them (a custom LimitAlgorithm is refused).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace concurrency_limiter {

using Clock = std::chrono::steady_clock;

// Where adaptive limits start by default (as Netflix's Gradient2): high
// enough not to throttle a fresh process much (the limit grows by a tenth or
// more per decision while latency stays at the no-load level), low enough that a moderately busy resource uses half of it,
// which is what the algorithms need to learn anything.
inline constexpr std::int64_t kDefaultInitialLimit = 20;

// One finished request, as a limit algorithm sees it.
struct LimitSample {
  Clock::time_point end{};          // when its slot was released
  Clock::duration service_time{};   // from the grant of its last slot to release
                                    // (time spent waiting in queues excluded)
  std::int64_t in_flight = 1;       // slots of the resource held just before
                                    // the release, counting this one
  bool dropped = false;             // the work failed or timed out
};

// How a request that held slots ended, as its owner reports it on release.
enum class Completion : std::uint8_t {
  kSuccess,  // a latency sample
  kDropped,  // the handler raised or timed out: a sign of overload
  kIgnored,  // nothing to learn (e.g. the request gave up before doing work)
};

class LimitAlgorithm {
 public:
  virtual ~LimitAlgorithm() = default;

  // Called once, before any update(): returns the limit to start with. Every
  // limit the algorithm returns must lie in [1, capacity] (the resource clamps
  // it anyway).
  virtual std::int64_t start(std::int64_t capacity) = 0;

  // One finished request. Returns the limit to put in force now, often the
  // same as before. Called with no lock of the resource held, but serialised.
  // noexcept: it runs inside Permit::release() and destructors, which cannot
  // report an error; an exception escaping it ends the program
  // (std::terminate). Catch what a custom algorithm may throw and return the
  // previous limit.
  virtual std::int64_t update(const LimitSample& sample) noexcept = 0;

  // Resource::set_limit() put `limit` (in [1, capacity]) in force at `now`:
  // the algorithm should move on from it at its next decision instead of
  // returning its own limit from before. Serialised with update() like it;
  // must not throw. The default does nothing, so an algorithm that ignores
  // it puts its own limit back with the next update() that returns one.
  virtual void on_set_limit(std::int64_t limit, Clock::time_point now) noexcept {
    static_cast<void>(limit);
    static_cast<void>(now);
  }
};

// Groups samples into windows of at least `min_time` and `min_samples`
// (a window closes with the first sample that satisfies both), so that a
// decision rests on averages instead of single requests.
class SampleWindow {
 public:
  struct Summary {
    std::int64_t samples = 0;        // successes + drops
    std::int64_t drops = 0;
    double mean_latency = 0.0;       // seconds, over successes only
    double mean_square_latency = 0.0;  // seconds^2, over successes only
    double mean_in_flight = 0.0;     // over successes only
    std::int64_t max_in_flight = 0;  // over every sample
  };

  SampleWindow(Clock::duration min_time, std::int64_t min_samples)
      : min_time_(min_time), min_samples_(min_samples) {}

  // Adds a sample; returns the window's summary when it closes (and starts
  // the next window), nullopt otherwise.
  std::optional<Summary> add(const LimitSample& sample);

  // After a copy read from shared memory: puts the window's settings back to
  // (min_time, min_samples) and, if any count or sum is out of range or the
  // window started after `now` (a state from another clock's time), starts
  // a new window (the samples so far are lost, nothing else).
  void repair(Clock::duration min_time, std::int64_t min_samples,
              Clock::time_point now) noexcept;

  // Forgets the samples of the current window.
  void reset() noexcept;

 private:
  Clock::duration min_time_;
  std::int64_t min_samples_;
  bool started_ = false;  // started_at_ is set
  Clock::time_point started_at_{};
  std::int64_t samples_ = 0;
  std::int64_t drops_ = 0;
  double latency_sum_ = 0.0;
  double latency_square_sum_ = 0.0;
  double in_flight_sum_ = 0.0;
  std::int64_t max_in_flight_ = 0;
};

// A limit that does not move. `limit` is clamped to [1, capacity].
class FixedLimit final : public LimitAlgorithm {
 public:
  explicit FixedLimit(std::int64_t limit) : limit_(limit) {}
  std::int64_t start(std::int64_t capacity) override;
  std::int64_t update(const LimitSample&) noexcept override { return limit_; }
  // Adopts `limit` as its constant.
  void on_set_limit(std::int64_t limit, Clock::time_point) noexcept override {
    limit_ = limit;
  }
  // The limit as given (before start() clamps it).
  std::int64_t value() const noexcept { return limit_; }

 private:
  std::int64_t limit_;
};

struct AimdOptions {
  std::int64_t min_limit = 1;
  // 0: kDefaultInitialLimit, or capacity if lower (min_limit if higher).
  std::int64_t initial_limit = 0;
  // Multiplier applied when a window saw a drop or a mean latency above
  // `timeout`. In (0, 1).
  double backoff = 0.9;
  // Mean latency that counts as a drop; zero: latency is ignored.
  Clock::duration timeout = Clock::duration::zero();
  Clock::duration window = std::chrono::seconds(1);
  std::int64_t min_window_samples = 10;

  bool operator==(const AimdOptions&) const = default;
};

// Additive increase, multiplicative decrease, per window: +1 when the window
// used at least half the limit and saw no drop, times `backoff` when it saw
// one. Knows nothing of latency unless `timeout` is set: it finds a limit only
// if the downstream fails when overloaded.
class AimdLimit final : public LimitAlgorithm {
 public:
  // Throws std::invalid_argument on out-of-range options.
  explicit AimdLimit(AimdOptions options = {});
  std::int64_t start(std::int64_t capacity) override;
  std::int64_t update(const LimitSample& sample) noexcept override;
  // Moves on from `limit`; the current window's samples are dropped.
  void on_set_limit(std::int64_t limit, Clock::time_point now) noexcept override;
  double limit() const noexcept { return s_.limit; }

  // Everything update() changes (see "Host scope" above).
  struct State {
    SampleWindow window;
    double max = 1.0;
    double limit = 1.0;
  };
  const AimdOptions& options() const noexcept { return o_; }
  const State& state() const noexcept { return s_; }
  // Puts `state` in force (after start(capacity)), bringing every value into
  // range first: a state read from shared memory may be damaged. Times
  // later than `now` (a state written with another clock) count as unset:
  // kept, they would hold every decision until the clock caught up.
  void restore(const State& state, std::int64_t capacity, Clock::time_point now) noexcept;

 private:
  AimdOptions o_;
  State s_;
};

struct GradientOptions {
  std::int64_t min_limit = 1;
  // 0: kDefaultInitialLimit, or capacity if lower (min_limit if higher).
  std::int64_t initial_limit = 0;
  // A window's mean latency up to `tolerance` times the no-load latency is
  // normal; above it, the downstream is queueing and the limit is cut. > 1.
  double tolerance = 1.25;
  // Multiplier applied when more than `drop_rate` of a window's requests
  // were dropped. In (0, 1).
  double backoff = 0.9;
  // Fraction of drops in a window tolerated without a cut, in [0, 1): errors
  // that are not caused by overload should not drive the limit to the floor.
  double drop_rate = 0.05;
  Clock::duration window = std::chrono::seconds(1);
  std::int64_t min_window_samples = 10;

  bool operator==(const GradientOptions&) const = default;
};

// A latency gradient in the spirit of Netflix's Gradient2 and Envoy's
// gradient controller, with the fixes their issue trackers ask for.
//
// Per window of samples (successes only; drops carry no latency), leaving
// out requests granted before the limit last changed (they ran under the old
// limit):
//   - no-load latency: the lowest window mean seen. It is trusted once a
//     window at clearly lower concurrency was not faster, or was measured at
//     the floor. Until then, whenever the limit is at least half used, the
//     limit steps below the concurrency the estimate was measured at (x0.8,
//     x0.5 while latency keeps falling in proportion, i.e. while the
//     downstream is plainly past its knee). Nothing is ever pinned to a
//     minimum and a trusted estimate is not probed again, so there is no
//     periodic probe and no 503 dip. The estimate moves up only from windows
//     at the floor, where the latency cannot be the limiter's doing, and
//     after a cut that did not lower the latency (below).
//   - latency above tolerance x no-load: the limit is cut to the concurrency
//     that carries the window's throughput at that latency (Little's law:
//     tolerance x in_flight x no-load / latency), at most by half per window.
//     There is no queue term while latency is elevated, so a moderate
//     overload cannot make the limit creep up.
//   - a cut that lowered the concurrency clearly while latency fell by less
//     than half as much: the latency was not queueing, the downstream itself
//     got slower. The no-load estimate is stale: it becomes the new window's
//     latency and the cut is undone (instead of cutting on to the floor).
//   - latency normal and the limit at least half used: +1, or x tolerance
//     when latency is at the no-load level (far from the knee).
//   - limit less than half used (by the window's peak): neither lowered nor
//     raised, whatever the latency. It does not bind, and latency at light
//     load is mostly noise.
//   - drops above `drop_rate` of the window: x backoff, nothing else learned.
// Bounded to [min_limit, capacity]. Against a downstream whose latency is
// base x max(1, in_flight / k) it settles between k and tolerance x k + 1
// (tests/cpp/limit_test.cc).
class GradientLimit final : public LimitAlgorithm {
 public:
  // Throws std::invalid_argument on out-of-range options.
  explicit GradientLimit(GradientOptions options = {});
  std::int64_t start(std::int64_t capacity) override;
  std::int64_t update(const LimitSample& sample) noexcept override;
  // Moves on from `limit`, as from a change of its own: the current window
  // is dropped and requests granted before `now` are left out.
  void on_set_limit(std::int64_t limit, Clock::time_point now) noexcept override;

  // The limit before rounding down, and the no-load latency estimate in
  // seconds (0 until the first window): for tests and benchmarks.
  double limit() const noexcept { return s_.limit; }
  double no_load_latency() const noexcept { return s_.no_load; }

  // Everything update() changes (see "Host scope" above).
  struct State {
    SampleWindow window;
    double max = 1.0;
    double limit = 1.0;
    double no_load = 0.0;            // seconds; 0: not measured yet
    double no_load_in_flight = 0.0;  // concurrency it was measured at
    bool no_load_trusted = false;
    // The previous window ended with a downward probe (probe_*).
    bool probed = false;
    // When the limit in force last changed (valid if changed).
    bool changed = false;
    Clock::time_point changed_at{};
    double probe_latency = 0.0;
    double probe_in_flight = 0.0;
    // The previous window ended with a queueing cut (cut_*): the limit
    // before it, and the window's latency and concurrency.
    bool cut = false;
    double cut_from = 0.0;
    double cut_latency = 0.0;
    double cut_in_flight = 0.0;
  };
  const GradientOptions& options() const noexcept { return o_; }
  const State& state() const noexcept { return s_; }
  // Puts `state` in force (after start(capacity)), bringing every value into
  // range first: a state read from shared memory may be damaged. Times
  // later than `now` (a state written with another clock) count as unset:
  // kept, they would hold every decision until the clock caught up.
  void restore(const State& state, std::int64_t capacity, Clock::time_point now) noexcept;

 private:
  std::int64_t in_force() const noexcept;
  void on_window(const SampleWindow::Summary& w);

  GradientOptions o_;
  State s_;
};

// The no-load latency of a downstream, learned from decisions' windows for
// Gradient2Limit and VegasLimit. Service times vary (a lognormal, a few slow
// requests among fast ones), so the lowest window mean is no estimate: with
// windows of 10 samples it lies far below the true mean, and a limit that
// takes it for the no-load latency sees queueing everywhere and collapses
// (GradientLimit with 300 ms and 1 s service times). Instead the estimate is
// an average, kept with the concurrency it was measured at:
//   - a window at that concurrency or lower (or at the floor) moves it
//     towards its mean by samples / `smoothing_samples` (at most all the
//     way): at no more concurrency, a slower window is noise or a slower
//     downstream, not queueing of the limiter's making, so the average is
//     unbiased and a slower downstream is learned again without a probe;
//   - a window at more concurrency does not move it: following the faster
//     ones would sink it below the true no-load latency (a minimum of
//     noisy means), following the long-term average would let queueing
//     held at the tolerance become the reference and the limit creep up
//     (Netflix PR #134). A slower downstream is learned from the windows
//     at no more concurrency, where the cuts bring the limit;
//   - latency smoothed over the last windows 1.5x the estimate or more at
//     no more concurrency means the knee moved down or the downstream got
//     slower: the descent below tells which, once;
//   - a first estimate measured with the limit in use may include queueing
//     (a resource that starts above the downstream's knee): until a step to
//     half the concurrency is not clearly faster (latency fell by less than
//     0.35x as much: a false end would keep queueing in the estimate, one
//     step too many costs only the growth back), or, where service times
//     vary little, cost more than a sixth of the throughput (by Little's
//     law, concurrency / latency) by more than three standard errors of the
//     two steps' means (a downstream that shares its cores with the rest of
//     the service has no knee: each halving makes it faster, and serve
//     less; with varied service times 100 samples cannot tell), the
//     algorithm halves its
//     limit once per step of kDescentSamples (from the concurrency in use,
//     the step's peak, when fewer requests than the limit come: halving a
//     limit of 20 against 10 clients would change nothing, and the descent
//     would end with queueing in the estimate), leaving out the requests
//     granted before the step (they ran at twice the concurrency). When an
//     earlier step was clearly faster than the one before it and the last
//     one is faster, but not clearly, the knee lies between the last two
//     steps: the descent ends back at the step before (latency within 1.35x
//     of no-load there), instead of growing back from half of it one
//     decision at a time (a minute with 300 ms service times). This descent
//     happens once, when the load first uses the limit, never again: there
//     is no periodic probe and no dip.
struct NoLoadLatency {
  double smoothed = 0.0;  // seconds; 0: no window yet
  double smoothed_in_flight = 0.0;
  double samples = 0.0;   // samples smoothed so far (capped)
  double value = 0.0;     // the estimate, seconds; 0: none yet
  double value_in_flight = 0.0;  // the concurrency it was measured at
  bool settled = false;   // the descent is over
  bool descending = false;
  // A descent step found the step before it clearly slower: the knee lies
  // below the concurrency the descent started from.
  bool past_knee = false;
  double descent_latency = 0.0;    // the last descent step's mean
  double descent_in_flight = 0.0;
  // The current descent step's sums (a step decides on kDescentSamples).
  double step_samples = 0.0;
  double step_latency = 0.0;
  double step_in_flight = 0.0;
  double step_square_latency = 0.0;
  // The last descent step's squared coefficient of variation over its
  // sample count: the variance of the log of its mean (see descend()).
  double descent_noise = 0.0;
  // ... and its squared coefficient of variation.
  double descent_spread = 0.0;

  static constexpr double kDescentSamples = 100.0;
  // A halving that cost more than 1 - 1/kDescentLoss of the throughput
  // (requests per second, by Little's law), by more than kDescentZ standard
  // errors, ends the descent.
  static constexpr double kDescentLoss = 1.2;
  static constexpr double kDescentZ = 3.0;
  // ... and only where both steps' squared coefficients of variation are
  // at most kQuietSpread (service times within about +-30 %).
  static constexpr double kQuietSpread = 0.1;

  // Feeds a window (its mean latency, mean concurrency and successes).
  void add(double latency, double in_flight, double samples, double smoothing_samples,
           double long_window, bool at_floor) noexcept;
  // While not settled, for a window measured with the limit in use: returns
  // the multiplier for the limit (0.5 for a descent step, 1 otherwise).
  // `square_latency`: the mean of the squared latencies of its successes
  // (how much they vary), 0 if unknown.
  double descend(double latency, double in_flight, double samples, bool at_floor,
                 double square_latency = 0.0) noexcept;

  // Brings damaged values into range (a state read from shared memory).
  void repair() noexcept;
};

struct Gradient2Options {
  std::int64_t min_limit = 1;
  // 0: kDefaultInitialLimit, or capacity if lower (min_limit if higher).
  std::int64_t initial_limit = 0;
  // A window's mean latency up to `tolerance` x the no-load latency is not
  // cut for; above it the gradient tolerance x no_load / latency (clamped to
  // [0.25, 1]) scales the slots in force. > 1. (Netflix's rttTolerance.)
  double tolerance = 1.3;
  // How much of each new limit is taken: limit = limit x (1 - smoothing) +
  // new x smoothing, for the moves between no-load latency and the
  // tolerance (the queue allowance); growth at no-load latency and cuts
  // past the tolerance are taken whole. In (0, 1].
  double smoothing = 0.2;
  // The queue allowance added to a limit whose latency is at the no-load
  // level (within half the tolerance): lets it grow. 0: sqrt(limit).
  double queue_size = 0.0;
  // Samples over which the no-load latency is averaged (NoLoadLatency).
  // >= 1.
  double smoothing_samples = 100.0;
  // Netflix's longWindow. No longer used (NoLoadLatency does not follow
  // latency at more concurrency: that is what let Gradient2 creep up);
  // still checked, >= 1, so that existing options stay valid.
  double long_window = 600.0;
  // Multiplier applied when more than `drop_rate` of a window's requests
  // were dropped. In (0, 1).
  double backoff = 0.9;
  // Fraction of drops in a window tolerated without a cut, in [0, 1).
  double drop_rate = 0.05;
  Clock::duration window = std::chrono::seconds(1);
  std::int64_t min_window_samples = 10;

  bool operator==(const Gradient2Options&) const = default;
};

// Netflix's Gradient2, made to hold when service times vary:
//   gradient = clamp(tolerance x no_load / latency, 0.25, 1)
//   new      = limit x gradient + queue      (queue only near no-load latency)
//   limit    = limit x (1 - smoothing) + new x smoothing   (see below)
// per decision, where latency is the mean of the windows since the last
// decision and no_load the estimate of NoLoadLatency, and:
//   - a decision waits until its windows span 10 of their mean latencies
//     and hold at least 80 successes (fewer are too noisy to tell a limit
//     1.5x past the knee from one at it with exponential service times):
//     a window only a few latencies long holds the short requests that
//     finished in it but not the long one each slot is still serving at its
//     end, and with heavy-tailed service times looks much faster than the
//     downstream is; for two latencies after the limit changed, requests
//     still finishing ran under the old limit and are left out;
//   - the queue allowance is added only while latency is within half the
//     tolerance of no-load (Netflix adds it always, so a moderate overload
//     that holds latency at the tolerance makes the limit creep up, their
//     PR #134); between that and the tolerance the limit holds;
//   - no decision is taken early on fewer successes when the latency is
//     far off (a sequential test, e.g. the mean minus three standard errors
//     above twice the no-load latency after 16): measured on the grid, early
//     cuts changed nothing (the misses come from growth and the start-up
//     descent, not from slow cuts) and early growth on 16-40 successes cost
//     2-5 cells of 80 (heavy tails: windows that short look faster than
//     the downstream is);
//   - at no-load latency (within 10 %) the slots in force grow by up to
//     x1.5 per decision (1.4 / ratio: to no more than 1.4x the knee from a
//     limit already past it; at least +1), but only by x1.2 (at least +1)
//     above the limit the last cut for latency left, where the knee was:
//     near it, a window that looks at no-load latency by chance must not
//     carry the limit past 1.5x the knee (at 9 slots with a knee of 8, x1.5
//     or +sqrt(limit) gave 13-15). Past the tolerance the slots are cut by the
//     gradient (down to a quarter: a decision on 80 successes that sees
//     4x the no-load latency sees a knee that fell), both at once, without
//     smoothing: smoothed, every move takes five decisions of ten
//     latencies each, minutes with 1 s service times, while the limit sits
//     far below the ceiling or far past the knee;
//   - the very first request is left out (it started on an idle
//     downstream), and the first decision only learns latency;
//   - drops above `drop_rate` of a window cut the limit x backoff and teach
//     nothing else (a failed request's latency is no service time);
//   - a limit less than half used (by the window's peak) is neither lowered
//     nor raised.
// Bounded to [min_limit, capacity].
class Gradient2Limit final : public LimitAlgorithm {
 public:
  // Throws std::invalid_argument on out-of-range options.
  explicit Gradient2Limit(Gradient2Options options = {});
  std::int64_t start(std::int64_t capacity) override;
  std::int64_t update(const LimitSample& sample) noexcept override;
  // Moves on from `limit`; the current window's samples are dropped.
  void on_set_limit(std::int64_t limit, Clock::time_point now) noexcept override;

  double limit() const noexcept { return s_.limit; }
  double no_load_latency() const noexcept { return s_.no_load.value; }

  // Everything update() changes (see "Host scope" above).
  struct State {
    SampleWindow window;
    double max = 1.0;
    double limit = 1.0;
    NoLoadLatency no_load;
    // When the limit in force last changed (valid if changed): requests
    // that finish shortly after it ran under the old limit and are left out.
    bool changed = false;
    Clock::time_point changed_at{};
    // When the last decision was taken (valid if changed), and the windows
    // since, until they span enough latencies to be decided on.
    Clock::time_point decided_at{};
    SampleWindow::Summary pending;
    // The limit the last cut for latency left (0: none yet): the knee lies
    // about there, and growth above it is slow (x1.2 per decision).
    double cut_to = 0.0;
  };
  const Gradient2Options& options() const noexcept { return o_; }
  const State& state() const noexcept { return s_; }
  // As GradientLimit::restore().
  void restore(const State& state, std::int64_t capacity, Clock::time_point now) noexcept;

 private:
  std::int64_t in_force() const noexcept;
  void on_window(const SampleWindow::Summary& w, bool first);

  Gradient2Options o_;
  State s_;
};

struct VegasOptions {
  std::int64_t min_limit = 1;
  // 0: kDefaultInitialLimit, or capacity if lower (min_limit if higher).
  std::int64_t initial_limit = 0;
  // Queue thresholds as multiples of log10(limit) (at least `min_queue`
  // each): below alpha the limit grows by log10(limit), above beta it
  // shrinks by as much; at most `threshold` x log10(limit) queued, it grows
  // by beta x log10(limit) (far from the knee). As Netflix's VegasLimit.
  double alpha = 3.0;
  double beta = 6.0;
  double threshold = 1.0;
  // The smallest alpha and beta, in requests: at a limit of 2 or 3,
  // log10 is too small to mean a queue.
  double min_queue = 0.5;
  // How much of each new limit is taken, in (0, 1].
  double smoothing = 1.0;
  // As Gradient2Options.
  double smoothing_samples = 100.0;
  double long_window = 600.0;
  double backoff = 0.9;
  double drop_rate = 0.05;
  Clock::duration window = std::chrono::seconds(1);
  std::int64_t min_window_samples = 10;

  bool operator==(const VegasOptions&) const = default;
};

// TCP Vegas applied to concurrency, after Netflix's VegasLimit: the queue
// is estimated as limit x (1 - no_load / latency) per decision (decisions
// as Gradient2Limit's) and kept between alpha and beta. The no-load latency is NoLoadLatency's (Netflix
// takes the lowest sample and resets it now and then, which noise biases
// low). Drops cut x backoff (Netflix subtracts log10(limit)); an under-used
// limit does not move. Bounded to [min_limit, capacity].
class VegasLimit final : public LimitAlgorithm {
 public:
  // Throws std::invalid_argument on out-of-range options.
  explicit VegasLimit(VegasOptions options = {});
  std::int64_t start(std::int64_t capacity) override;
  std::int64_t update(const LimitSample& sample) noexcept override;
  void on_set_limit(std::int64_t limit, Clock::time_point now) noexcept override;

  double limit() const noexcept { return s_.limit; }
  double no_load_latency() const noexcept { return s_.no_load.value; }

  struct State {
    SampleWindow window;
    double max = 1.0;
    double limit = 1.0;
    NoLoadLatency no_load;
    // When the limit in force last changed (valid if changed): requests
    // that finish shortly after it ran under the old limit and are left out.
    bool changed = false;
    Clock::time_point changed_at{};
    // When the last decision was taken (valid if changed), and the windows
    // since, until they span enough latencies to be decided on.
    Clock::time_point decided_at{};
    SampleWindow::Summary pending;
  };
  const VegasOptions& options() const noexcept { return o_; }
  const State& state() const noexcept { return s_; }
  void restore(const State& state, std::int64_t capacity, Clock::time_point now) noexcept;

 private:
  std::int64_t in_force() const noexcept;
  void on_window(const SampleWindow::Summary& w, bool first);

  VegasOptions o_;
  State s_;
};

static_assert(std::is_trivially_copyable_v<AimdOptions>);
static_assert(std::is_trivially_copyable_v<AimdLimit::State>);
static_assert(std::is_trivially_copyable_v<GradientOptions>);
static_assert(std::is_trivially_copyable_v<GradientLimit::State>);
static_assert(std::is_trivially_copyable_v<Gradient2Options>);
static_assert(std::is_trivially_copyable_v<Gradient2Limit::State>);
static_assert(std::is_trivially_copyable_v<VegasOptions>);
static_assert(std::is_trivially_copyable_v<VegasLimit::State>);

}  // namespace concurrency_limiter
