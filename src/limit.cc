#include "concurrency_limiter/limit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

namespace concurrency_limiter {
namespace {

// Gradient2Limit's decisions (measured on the grid of tests/cpp/limit_grid.h):
// - kGrowth: the most the slots in force grow per decision at no-load
//   latency; less when the latency is already up to 10 % above it, so that
//   a limit just past the knee does not jump beyond 1.5x the knee
//   (kGrowthTarget / ratio);
// - kDecisionSamples: the successes a decision needs at least. With 40,
//   exponential service times let a limit at a knee of 2 look 1.3x slow,
//   and one at 3 look at no-load latency, often enough to move the limit
//   between 1 and 4;
// - kMinGradient: the deepest cut per decision. A decision rests on 80
//   successes or more, so a latency 4x the no-load one is no noise: the
//   knee fell, and halving per decision (Netflix's 0.5) takes one decision
//   per halving, ten latencies each, to get there;
// - latencies a decision spans: kDecisionSpan (heavy tails: a window only
//   a few latencies long holds the short requests that finished in it but
//   not the long one each slot is still serving at its end), kDescentSpan
//   for a descent step (which counts its own 100 samples, and leaves out
//   the requests granted before the step, so the bias does not arise),
//   kFirstSpan for the first decision, which only learns the latency that
//   sets how long requests are left out after a change.
constexpr double kGrowth = 1.5;
constexpr double kGrowthTarget = 1.4;
constexpr double kGrowthNearKnee = 1.2;
constexpr double kDecisionSamples = 80.0;
constexpr double kMinGradient = 0.25;
constexpr double kDecisionSpan = 10.0;
constexpr double kDescentSpan = 4.0;
constexpr double kFirstSpan = 2.0;

double seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

void check_bounds(std::int64_t min_limit, std::int64_t initial_limit) {
  if (min_limit < 1) {
    throw std::invalid_argument("min_limit must be an integer >= 1, got " +
                                std::to_string(min_limit));
  }
  if (initial_limit != 0 && initial_limit < min_limit) {
    throw std::invalid_argument(
        "initial_limit must be >= min_limit (" + std::to_string(min_limit) +
        "), or 0 for the default, got " + std::to_string(initial_limit));
  }
}

void check_window(Clock::duration window, std::int64_t min_samples) {
  if (window < Clock::duration::zero()) {
    throw std::invalid_argument("window must be >= 0 seconds");
  }
  if (min_samples < 1) {
    throw std::invalid_argument("min_window_samples must be an integer >= 1, got " +
                                std::to_string(min_samples));
  }
}

void check_backoff(double backoff) {
  if (!(backoff > 0.0 && backoff < 1.0)) {
    throw std::invalid_argument("backoff must be in (0, 1), got " +
                                std::to_string(backoff));
  }
}

// The limit to start from, checked against the resource's capacity.
double initial(std::int64_t min_limit, std::int64_t initial_limit,
               std::int64_t capacity) {
  if (min_limit > capacity) {
    throw std::invalid_argument("min_limit (" + std::to_string(min_limit) +
                                ") must be <= capacity (" +
                                std::to_string(capacity) + ")");
  }
  if (initial_limit > capacity) {
    throw std::invalid_argument("initial_limit (" + std::to_string(initial_limit) +
                                ") must be <= capacity (" +
                                std::to_string(capacity) + ")");
  }
  if (initial_limit == 0) {
    initial_limit = std::max(min_limit, std::min(capacity, kDefaultInitialLimit));
  }
  return static_cast<double>(initial_limit);
}

// A bool copied from bytes that may be damaged (shared memory) holds 0 or 1
// afterwards; it is read as a byte, never as a bool that might be neither.
void make_valid(bool& b) noexcept {
  unsigned char byte;
  std::memcpy(&byte, &b, 1);
  byte = byte != 0 ? 1 : 0;
  std::memcpy(&b, &byte, 1);
}

// `x` clamped to [lo, hi]; lo if it is not a number.
double in_range(double x, double lo, double hi) {
  return std::isfinite(x) ? std::clamp(x, lo, hi) : lo;
}

}  // namespace

std::optional<SampleWindow::Summary> SampleWindow::add(const LimitSample& s) {
  if (!started_) {
    started_ = true;
    started_at_ = s.end;
  }
  ++samples_;
  if (s.dropped) {
    ++drops_;
  } else {
    const double latency = seconds(s.service_time);
    latency_sum_ += latency;
    latency_square_sum_ += latency * latency;
    in_flight_sum_ += static_cast<double>(s.in_flight);
  }
  max_in_flight_ = std::max(max_in_flight_, s.in_flight);
  if (samples_ < min_samples_ || s.end - started_at_ < min_time_) return std::nullopt;

  Summary w;
  w.samples = samples_;
  w.drops = drops_;
  if (const auto ok = samples_ - drops_; ok > 0) {
    w.mean_latency = latency_sum_ / static_cast<double>(ok);
    w.mean_square_latency = latency_square_sum_ / static_cast<double>(ok);
    w.mean_in_flight = in_flight_sum_ / static_cast<double>(ok);
  }
  w.max_in_flight = max_in_flight_;
  started_at_ = s.end;
  samples_ = drops_ = max_in_flight_ = 0;
  latency_sum_ = latency_square_sum_ = in_flight_sum_ = 0.0;
  return w;
}

void SampleWindow::reset() noexcept {
  started_ = false;
  started_at_ = {};
  samples_ = drops_ = max_in_flight_ = 0;
  latency_sum_ = latency_square_sum_ = in_flight_sum_ = 0.0;
}

void SampleWindow::repair(Clock::duration min_time, std::int64_t min_samples,
                          Clock::time_point now) noexcept {
  min_time_ = min_time;
  min_samples_ = min_samples;
  make_valid(started_);
  const bool ok = samples_ >= 0 && drops_ >= 0 && drops_ <= samples_ &&
                  max_in_flight_ >= 0 && std::isfinite(latency_sum_) &&
                  latency_sum_ >= 0.0 && std::isfinite(latency_square_sum_) &&
                  latency_square_sum_ >= 0.0 && std::isfinite(in_flight_sum_) &&
                  in_flight_sum_ >= 0.0 && !(started_ && started_at_ > now);
  if (!ok) reset();
}

std::int64_t FixedLimit::start(std::int64_t capacity) {
  limit_ = std::clamp<std::int64_t>(limit_, 1, capacity);
  return limit_;
}

AimdLimit::AimdLimit(AimdOptions options)
    : o_(options), s_{.window = SampleWindow(o_.window, o_.min_window_samples)} {
  check_bounds(o_.min_limit, o_.initial_limit);
  check_window(o_.window, o_.min_window_samples);
  check_backoff(o_.backoff);
  if (o_.timeout < Clock::duration::zero()) {
    throw std::invalid_argument("timeout must be >= 0 seconds");
  }
}

std::int64_t AimdLimit::start(std::int64_t capacity) {
  s_.limit = initial(o_.min_limit, o_.initial_limit, capacity);
  s_.max = static_cast<double>(capacity);
  return static_cast<std::int64_t>(s_.limit);
}

void AimdLimit::restore(const State& state, std::int64_t capacity,
                        Clock::time_point now) noexcept {
  std::memcpy(static_cast<void*>(&s_), &state, sizeof s_);  // bytes: see make_valid()
  s_.window.repair(o_.window, o_.min_window_samples, now);
  s_.max = static_cast<double>(capacity);
  s_.limit = in_range(s_.limit, static_cast<double>(o_.min_limit), s_.max);
}

std::int64_t AimdLimit::update(const LimitSample& sample) noexcept {
  if (const auto w = s_.window.add(sample)) {
    const bool slow = o_.timeout > Clock::duration::zero() &&
                      w->mean_latency > seconds(o_.timeout);
    if (w->drops > 0 || slow) {
      s_.limit *= o_.backoff;
    } else if (static_cast<double>(w->max_in_flight) >= std::floor(s_.limit) / 2) {
      s_.limit += 1.0;
    }
    s_.limit = std::clamp(s_.limit, static_cast<double>(o_.min_limit), s_.max);
  }
  return static_cast<std::int64_t>(s_.limit);
}

void AimdLimit::on_set_limit(std::int64_t limit, Clock::time_point) noexcept {
  s_.limit = std::clamp(static_cast<double>(limit), static_cast<double>(o_.min_limit), s_.max);
  s_.window.reset();
}

GradientLimit::GradientLimit(GradientOptions options)
    : o_(options), s_{.window = SampleWindow(o_.window, o_.min_window_samples)} {
  check_bounds(o_.min_limit, o_.initial_limit);
  check_window(o_.window, o_.min_window_samples);
  check_backoff(o_.backoff);
  if (!(o_.tolerance > 1.0)) {
    throw std::invalid_argument("tolerance must be > 1, got " +
                                std::to_string(o_.tolerance));
  }
  if (!(o_.drop_rate >= 0.0 && o_.drop_rate < 1.0)) {
    throw std::invalid_argument("drop_rate must be in [0, 1), got " +
                                std::to_string(o_.drop_rate));
  }
}

std::int64_t GradientLimit::start(std::int64_t capacity) {
  s_.limit = initial(o_.min_limit, o_.initial_limit, capacity);
  s_.max = static_cast<double>(capacity);
  return in_force();
}

void GradientLimit::restore(const State& state, std::int64_t capacity,
                            Clock::time_point now) noexcept {
  std::memcpy(static_cast<void*>(&s_), &state, sizeof s_);  // bytes: see make_valid()
  s_.window.repair(o_.window, o_.min_window_samples, now);
  s_.max = static_cast<double>(capacity);
  s_.limit = in_range(s_.limit, static_cast<double>(o_.min_limit), s_.max);
  // A latency estimate out of range is forgotten and learned again.
  if (!std::isfinite(s_.no_load) || s_.no_load < 0.0 ||
      !std::isfinite(s_.no_load_in_flight) || s_.no_load_in_flight < 0.0) {
    s_.no_load = s_.no_load_in_flight = 0.0;
    s_.no_load_trusted = false;
  }
  if (!std::isfinite(s_.probe_latency) || !std::isfinite(s_.probe_in_flight) ||
      s_.probe_latency < 0.0 || s_.probe_in_flight < 0.0) {
    s_.probed = false;
    s_.probe_latency = s_.probe_in_flight = 0.0;
  }
  make_valid(s_.no_load_trusted);
  make_valid(s_.probed);
  make_valid(s_.changed);
  make_valid(s_.cut);
  if (!std::isfinite(s_.cut_latency) || !std::isfinite(s_.cut_in_flight) ||
      !std::isfinite(s_.cut_from) || !(s_.cut_latency > 0.0) ||
      !(s_.cut_in_flight > 0.0) || s_.cut_from < 0.0) {
    s_.cut = false;
    s_.cut_from = s_.cut_latency = s_.cut_in_flight = 0.0;
  }
  s_.no_load_trusted = s_.no_load_trusted && s_.no_load > 0.0;
  s_.probed = s_.probed && s_.probe_in_flight > 0.0;
  s_.changed = s_.changed && s_.changed_at != Clock::time_point{} && s_.changed_at <= now;
}

std::int64_t GradientLimit::in_force() const noexcept {
  // The limit is kept fractional so that small steps accumulate; the slots
  // in force are its integer part (a small epsilon absorbs rounding).
  return static_cast<std::int64_t>(std::floor(s_.limit + 1e-9));
}

std::int64_t GradientLimit::update(const LimitSample& sample) noexcept {
  // The requests granted before the first release started on an idle
  // downstream, as the concurrency ramped up: not representative.
  if (!s_.changed) {
    s_.changed = true;
    s_.changed_at = sample.end;
  }
  // A request granted before the limit last changed ran under the old limit:
  // it would blur the effect of the change, so it is left out.
  if (sample.end - sample.service_time < s_.changed_at) return in_force();
  if (const auto w = s_.window.add(sample)) {
    const std::int64_t before = in_force();
    on_window(*w);
    if (in_force() != before) s_.changed_at = sample.end;
  }
  return in_force();
}

void GradientLimit::on_set_limit(std::int64_t limit, Clock::time_point now) noexcept {
  s_.limit = std::clamp(static_cast<double>(limit), static_cast<double>(o_.min_limit), s_.max);
  s_.window.reset();
  s_.probed = false;
  s_.cut = false;
  s_.changed = true;
  s_.changed_at = now;
}

void GradientLimit::on_window(const SampleWindow::Summary& w) {
  const bool after_probe = std::exchange(s_.probed, false);
  const bool after_cut = std::exchange(s_.cut, false);
  const double floor_limit = static_cast<double>(o_.min_limit);
  const auto bounded = [&](double limit) {
    return std::clamp(limit, floor_limit, s_.max);
  };

  // Drops are a sign of overload with no usable latency (a request that
  // failed fast would pull the mean down): they cut, and nothing else is
  // learned from the window.
  const std::int64_t ok = w.samples - w.drops;
  if (w.drops > 0 && static_cast<double>(w.drops) >
                         o_.drop_rate * static_cast<double>(w.samples)) {
    s_.limit = bounded(s_.limit * o_.backoff);
    return;
  }
  if (ok == 0) return;
  const double latency = w.mean_latency;
  const double n = w.mean_in_flight;

  // The no-load latency. A lower mean than any before is a new estimate, but
  // one measured at a concurrency from which nothing lower was tried yet may
  // still include queueing inside the downstream: it is trusted once a
  // window at clearly lower concurrency was not faster (or at the floor,
  // below which nothing can be tried).
  const bool at_floor = n <= floor_limit + 0.5;
  if (s_.no_load == 0.0 || latency < 0.9 * s_.no_load) {
    s_.no_load = latency;
    s_.no_load_in_flight = n;
    s_.no_load_trusted = at_floor;
  } else {
    // Lower concurrency, about the same latency: the estimate holds.
    if (n <= 0.85 * s_.no_load_in_flight && latency <= o_.tolerance * s_.no_load) {
      s_.no_load_trusted = true;
    }
    if (latency < s_.no_load) {
      s_.no_load = latency;
    } else if (after_cut && n <= 0.85 * s_.cut_in_flight &&
               latency / s_.cut_latency > 1.0 - 0.5 * (1.0 - n / s_.cut_in_flight) &&
               latency <= o_.tolerance * s_.cut_latency) {
      // The cut lowered the concurrency, latency stayed about where it was:
      // it was not queueing but a slower downstream. Relearn, and undo the
      // cut. (Latency that rose further says nothing of the kind: the
      // downstream is still changing.)
      s_.no_load = latency;
      s_.no_load_in_flight = n;
      s_.no_load_trusted = true;
      s_.limit = std::max(s_.limit, bounded(s_.cut_from));
      return;
    } else if (at_floor) {
      // At the floor the limiter adds no concurrency: a slower mean here
      // means the downstream itself got slower. Relearn.
      s_.no_load += (latency - s_.no_load) * 0.5;
      s_.no_load_trusted = true;
    }
  }

  // A limit less than half used does not bind: latency measured under it
  // says nothing about the limit (at light load it is mostly noise: a pause
  // of the process, a busy neighbour), and low load is no reason to shrink.
  // It is neither lowered nor raised; the window that uses it decides.
  const double limit_now = static_cast<double>(in_force());
  const double used = static_cast<double>(w.max_in_flight);
  if (used < limit_now / 2) return;

  const double ratio = latency / s_.no_load;
  // Queueing: the concurrency that would carry this window's throughput
  // (n / latency) at the tolerated latency, never more than halving.
  const double cut =
      std::clamp(o_.tolerance * n / ratio, s_.limit * 0.5, s_.limit);
  if (!s_.no_load_trusted) {
    // The no-load latency may still contain queueing: step below the
    // concurrency it was measured at and see whether latency follows. While
    // it falls in proportion (plainly past the knee) the steps are halvings.
    const bool proportional =
        after_probe && s_.probe_in_flight > 1.05 * n &&
        s_.probe_latency / latency >= 1.0 + 0.75 * (s_.probe_in_flight / n - 1.0);
    s_.probed = true;
    s_.probe_latency = latency;
    s_.probe_in_flight = n;
    const double probe = std::min(s_.limit, n) * (proportional ? 0.5 : 0.8);
    s_.limit = bounded(ratio > o_.tolerance ? std::min(cut, probe) : probe);
  } else if (ratio > o_.tolerance) {
    s_.cut = true;
    s_.cut_from = s_.limit;
    s_.cut_latency = latency;
    s_.cut_in_flight = n;
    s_.limit = bounded(cut);
  } else if (ratio <= 1.05) {
    // At no-load latency: far from the knee, grow multiplicatively.
    s_.limit = bounded(std::max(s_.limit + 1.0, s_.limit * o_.tolerance));
  } else {
    s_.limit = bounded(s_.limit + 1.0);
  }
}

}  // namespace concurrency_limiter

namespace concurrency_limiter {

void NoLoadLatency::add(double latency, double in_flight, double n,
                        double smoothing_samples, double /*long_window*/, bool at_floor) noexcept {
  if (!(n > 0.0) || !(latency > 0.0)) return;
  if (smoothed == 0.0) {
    smoothed = latency;
    smoothed_in_flight = in_flight;
  } else {
    const double a = std::min(1.0, n / smoothing_samples);
    smoothed += a * (latency - smoothed);
    smoothed_in_flight += a * (in_flight - smoothed_in_flight);
  }
  samples = std::min(samples + n, 1e15);
  if (!settled) return;
  const double a = std::min(1.0, n / smoothing_samples);
  if (in_flight <= 1.05 * value_in_flight || at_floor) {
    if (!at_floor && smoothed > 1.5 * value && smoothed_in_flight <= 1.05 * value_in_flight) {
      // Much slower at no more concurrency: the knee moved down, or the
      // downstream itself got slower. Which one, the descent tells (latency
      // falls with concurrency only in the first case).
      settled = descending = past_knee = false;
      step_samples = step_latency = step_in_flight = step_square_latency = 0.0;
      return;
    }
    // At the concurrency the estimate was measured at or below it: the
    // latency of this window is no-load latency too (an unbiased average,
    // not a minimum).
    value += a * (latency - value);
  }
  // At more concurrency the estimate does not move. Following the windows
  // that happen to be faster would sink it below the true no-load latency
  // (a minimum of noisy means), and following the long-term average
  // (Gradient2's long window) would let latency held past the knee become
  // the reference, the limit then growing past the knee step by step (the
  // creep of Netflix PR #134). A downstream that got slower is learned
  // anyway: the cuts bring the limit back to the concurrency the estimate
  // was measured at, where windows average it again.
}

double NoLoadLatency::descend(double latency, double in_flight, double n,
                              bool at_floor, double square_latency) noexcept {
  if (settled || !(n > 0.0) || !(latency > 0.0)) return 1.0;
  step_samples += n;
  step_latency += latency * n;
  step_in_flight += in_flight * n;
  step_square_latency += std::max(square_latency, latency * latency) * n;
  const double l = step_latency / step_samples;
  const double f = step_in_flight / step_samples;
  // How much this step's latencies vary: their squared coefficient of
  // variation; over their count, the variance of the log of its mean.
  const double spread = std::max(0.0, step_square_latency / step_samples / (l * l) - 1.0);
  const double noise = spread / step_samples;
  if (step_samples < kDescentSamples && !at_floor) return 1.0;
  step_samples = step_latency = step_in_flight = step_square_latency = 0.0;
  // The step before ran at about twice the concurrency: was it about twice
  // as slow (the downstream past its knee, queueing)? Then go on down.
  bool settle = at_floor;
  double back = 1.0;
  if (descending) {
    const double fewer = descent_in_flight / f;
    const double slower = descent_latency / l;
    // Settle when this step is not clearly faster (latency fell by less
    // than 0.35x as much as the concurrency), or when the step cost
    // throughput beyond what the samples' spread explains: by Little's law
    // the step before served fewer / slower times as many requests per
    // second. A downstream past its knee serves as many with fewer (slower
    // == fewer); one that shares its cores with the rest of the service
    // serves fewer requests at every halving, each less slow (measured in
    // the overload experiment: 1.8 queries in flight on 2 cores instead of
    // 5 made each 1.8x faster, and served 36 % fewer). Only where both
    // steps' service times vary little (CPU-bound queries; a coefficient
    // of variation under kQuietSpread's root) and by three standard errors
    // of the two means: with exponential, lognormal or bimodal service
    // times, 100 samples cannot tell such a loss from noise, and a sample
    // that drew few slow requests looks both fast and quiet, so a false end
    // past the knee would keep queueing in the estimate for good (measured
    // on the grid with other seeds: 3-7x the latency of the best fixed
    // limit). Those fall back on the first rule.
    const bool quiet = spread <= kQuietSpread && descent_spread <= kQuietSpread;
    const bool lost = quiet && fewer / slower > kDescentLoss &&
                      std::log(fewer / slower) > kDescentZ * std::sqrt(noise + descent_noise);
    const bool faster = slower >= 1.0 + 0.35 * (fewer - 1.0);
    const bool flat = !faster || lost;
    settle = settle || fewer < 1.2 || flat;
    // The step before was slower, but not much, and an earlier one was much
    // slower: the knee lies between this step and the one before. Back up
    // to the step before (the last halving overshot the knee by up to 2x;
    // at the step before, latency was within 1.35x of no-load) instead of
    // growing back from here one decision at a time. Without an earlier
    // much slower step (no knee below the start, or a first step that was
    // noise) the limit stays, and grows from where the estimate was
    // measured.
    if (flat && past_knee && !at_floor && fewer >= 1.2 && descent_latency > l) {
      back = std::min(2.0, fewer);
    }
  }
  if (settle) {
    settled = true;
    descending = past_knee = false;
    value = smoothed = l;
    value_in_flight = smoothed_in_flight = f;
    samples = 0.0;
    return back;
  }
  past_knee = descending;
  descending = true;
  descent_latency = l;
  descent_in_flight = f;
  descent_noise = noise;
  descent_spread = spread;
  return 0.5;
}

void NoLoadLatency::repair() noexcept {
  make_valid(settled);
  make_valid(descending);
  make_valid(past_knee);
  const auto bad = [](double x) { return !std::isfinite(x) || x < 0.0; };
  if (bad(smoothed) || bad(samples) || bad(value) || bad(smoothed_in_flight) ||
      bad(value_in_flight)) {
    smoothed = samples = value = smoothed_in_flight = value_in_flight = 0.0;
    settled = false;
  }
  if (bad(descent_latency) || bad(descent_in_flight) || bad(step_samples) ||
      bad(step_latency) || bad(step_in_flight) || bad(step_square_latency) ||
      bad(descent_noise) || bad(descent_spread) ||
      // The mean of the squares is at least the square of the mean.
      step_square_latency * step_samples < step_latency * step_latency * (1.0 - 1e-9)) {
    descending = past_knee = false;
    descent_latency = descent_in_flight = descent_noise = descent_spread = 0.0;
    step_samples = step_latency = step_in_flight = step_square_latency = 0.0;
  }
  if (settled && value == 0.0) settled = false;
}

namespace {


void check_common(std::int64_t min_limit, std::int64_t initial_limit, Clock::duration window,
                  std::int64_t min_window_samples, double backoff, double drop_rate,
                  double smoothing, double smoothing_samples, double long_window) {
  check_bounds(min_limit, initial_limit);
  check_window(window, min_window_samples);
  check_backoff(backoff);
  if (!(drop_rate >= 0.0 && drop_rate < 1.0)) {
    throw std::invalid_argument("drop_rate must be in [0, 1), got " + std::to_string(drop_rate));
  }
  if (!(smoothing > 0.0 && smoothing <= 1.0)) {
    throw std::invalid_argument("smoothing must be in (0, 1], got " + std::to_string(smoothing));
  }
  if (!(smoothing_samples >= 1.0 && std::isfinite(smoothing_samples))) {
    throw std::invalid_argument("smoothing_samples must be >= 1, got " +
                                std::to_string(smoothing_samples));
  }
  if (!(long_window >= 1.0 && std::isfinite(long_window))) {
    throw std::invalid_argument("long_window must be >= 1, got " + std::to_string(long_window));
  }
}

// Adds window `w` to `pending`; true when `pending` may be decided on: it
// spans at least 10 of its mean latencies (`span`: from the last decision
// to the window's end). A window only a few latencies long holds the short
// requests that finished in it but not the long one each slot is still
// serving at its end: with heavy-tailed service times it looks much faster
// than the downstream is.
bool too_many_drops(const SampleWindow::Summary& w, double drop_rate) {
  return w.drops > 0 &&
         static_cast<double>(w.drops) > drop_rate * static_cast<double>(w.samples);
}

bool decide(SampleWindow::Summary& pending, const SampleWindow::Summary& w,
            Clock::duration span, bool settled, double drop_rate,
            double latencies = kDecisionSpan) {
  const auto ok = [](const SampleWindow::Summary& x) {
    return static_cast<double>(x.samples - x.drops);
  };
  const double a = ok(pending), b = ok(w);
  if (a + b > 0.0) {
    pending.mean_latency = (pending.mean_latency * a + w.mean_latency * b) / (a + b);
    pending.mean_square_latency =
        (pending.mean_square_latency * a + w.mean_square_latency * b) / (a + b);
    pending.mean_in_flight = (pending.mean_in_flight * a + w.mean_in_flight * b) / (a + b);
  }
  pending.samples += w.samples;
  pending.drops += w.drops;
  pending.max_in_flight = std::max(pending.max_in_flight, w.max_in_flight);
  // Drops are decided on at once, whatever the successes (they cut x
  // backoff per window). A descent step counts its own samples
  // (NoLoadLatency::kDescentSamples).
  if (too_many_drops(pending, drop_rate)) return true;
  return seconds(span) >= latencies * pending.mean_latency &&
         (!settled || ok(pending) >= kDecisionSamples);
}

Clock::duration hold(double latency) {
  return std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(std::min(2.0 * latency, 3600.0)));
}


std::int64_t floor_of(double limit) {
  // The limit is kept fractional so that small steps accumulate; the slots
  // in force are its integer part (a small epsilon absorbs rounding).
  return static_cast<std::int64_t>(std::floor(limit + 1e-9));
}

}  // namespace

Gradient2Limit::Gradient2Limit(Gradient2Options options)
    : o_(options),
      s_{.window = SampleWindow(o_.window, o_.min_window_samples),
         .max = 1.0,
         .limit = 1.0,
         .no_load = NoLoadLatency{},
         .changed = false,
         .changed_at = {},
         .decided_at = {},
         .pending = {},
         .cut_to = 0.0} {
  check_common(o_.min_limit, o_.initial_limit, o_.window, o_.min_window_samples, o_.backoff,
               o_.drop_rate, o_.smoothing, o_.smoothing_samples, o_.long_window);
  if (!(o_.tolerance > 1.0 && std::isfinite(o_.tolerance))) {
    throw std::invalid_argument("tolerance must be > 1, got " + std::to_string(o_.tolerance));
  }
  if (!(o_.queue_size >= 0.0 && std::isfinite(o_.queue_size))) {
    throw std::invalid_argument("queue_size must be >= 0, got " + std::to_string(o_.queue_size));
  }
}

std::int64_t Gradient2Limit::start(std::int64_t capacity) {
  s_.limit = initial(o_.min_limit, o_.initial_limit, capacity);
  s_.max = static_cast<double>(capacity);
  return in_force();
}

std::int64_t Gradient2Limit::in_force() const noexcept { return floor_of(s_.limit); }

void Gradient2Limit::restore(const State& state, std::int64_t capacity,
                             Clock::time_point now) noexcept {
  std::memcpy(static_cast<void*>(&s_), &state, sizeof s_);  // bytes: see make_valid()
  s_.window.repair(o_.window, o_.min_window_samples, now);
  s_.max = static_cast<double>(capacity);
  s_.limit = in_range(s_.limit, static_cast<double>(o_.min_limit), s_.max);
  s_.no_load.repair();
  s_.cut_to = std::isfinite(s_.cut_to) ? std::clamp(s_.cut_to, 0.0, s_.max) : 0.0;
  const SampleWindow::Summary& p = s_.pending;
  if (p.samples < 0 || p.drops < 0 || p.drops > p.samples || p.max_in_flight < 0 ||
      !std::isfinite(p.mean_latency) || p.mean_latency < 0.0 ||
      !std::isfinite(p.mean_square_latency) || p.mean_square_latency < 0.0 ||
      !std::isfinite(p.mean_in_flight) || p.mean_in_flight < 0.0) {
    s_.pending = {};
  }
  make_valid(s_.changed);
  s_.changed = s_.changed && s_.changed_at != Clock::time_point{} && s_.changed_at <= now &&
               s_.decided_at != Clock::time_point{} && s_.decided_at <= now;
}

std::int64_t Gradient2Limit::update(const LimitSample& sample) noexcept {
  // The requests granted before the first release started on an idle
  // downstream, as the concurrency ramped up: not representative.
  if (!s_.changed) {
    s_.changed = true;
    s_.changed_at = s_.decided_at = sample.end;
    return in_force();
  }
  // For two latencies after the limit changed, requests that ran under the
  // old limit are still finishing: left out. (Leaving out instead the
  // requests granted before the change would keep, shortly after it, only
  // the short ones: a window of them looks faster than the downstream is.)
  if (sample.end < s_.changed_at + hold(s_.no_load.smoothed)) return in_force();
  // During the descent, a request granted before the last step ran at the
  // concurrency before it: left out too (a straggler from twice the
  // concurrency would make the step look as slow as the one before).
  if (!s_.no_load.settled && sample.end - sample.service_time < s_.changed_at) {
    return in_force();
  }
  if (const auto w = s_.window.add(sample)) {
    const double span = s_.no_load.smoothed == 0.0 ? kFirstSpan
                        : !s_.no_load.settled      ? kDescentSpan
                                                   : kDecisionSpan;
    if (!decide(s_.pending, *w, sample.end - s_.decided_at, s_.no_load.settled, o_.drop_rate,
                span)) {
      return in_force();
    }
    s_.decided_at = sample.end;
    const std::int64_t before = in_force();
    // The first window still holds the ramp from an idle downstream: its
    // latency is learned from, no decision taken, and the next starts clean.
    const bool first = s_.no_load.smoothed == 0.0;
    on_window(std::exchange(s_.pending, {}), first);
    if (first || in_force() != before) s_.changed_at = sample.end;
  }
  return in_force();
}

void Gradient2Limit::on_set_limit(std::int64_t limit, Clock::time_point now) noexcept {
  s_.limit = std::clamp(static_cast<double>(limit), static_cast<double>(o_.min_limit), s_.max);
  s_.window.reset();
  s_.pending = {};
  s_.changed = true;
  s_.changed_at = s_.decided_at = now;
}

void Gradient2Limit::on_window(const SampleWindow::Summary& w, bool first) {
  const double floor_limit = static_cast<double>(o_.min_limit);
  const auto bounded = [&](double limit) { return std::clamp(limit, floor_limit, s_.max); };
  if (too_many_drops(w, o_.drop_rate)) {
    s_.limit = bounded(s_.limit * o_.backoff);
    return;
  }
  const auto ok = static_cast<double>(w.samples - w.drops);
  if (ok == 0.0) return;
  const double latency = w.mean_latency;
  const bool at_floor = in_force() <= o_.min_limit;
  NoLoadLatency& nl = s_.no_load;
  nl.add(latency, w.mean_in_flight, ok, o_.smoothing_samples, o_.long_window, at_floor);

  const double limit_now = static_cast<double>(in_force());
  if (first || static_cast<double>(w.max_in_flight) < limit_now / 2) return;  // or under-used
  if (!nl.settled) {
    // A step down halves the concurrency in use: with fewer clients than
    // the limit (at least half of it used), halving the limit itself would
    // not lower the concurrency at all, and the descent would settle on a
    // no-load latency measured at that concurrency, queueing past the knee
    // included.
    const double factor =
        nl.descend(latency, w.mean_in_flight, ok, at_floor, w.mean_square_latency);
    const auto used = static_cast<double>(w.max_in_flight);
    const double from = factor < 1.0 && used < limit_now ? used : s_.limit;
    s_.limit = bounded(from * factor);
    return;
  }
  const double ratio = latency / nl.value;
  const double gradient = std::clamp(o_.tolerance / ratio, kMinGradient, 1.0);
  const double queue = o_.queue_size > 0.0 ? o_.queue_size : std::sqrt(s_.limit);
  // At no-load latency (within 10 %), far from the knee: up to x1.5 at
  // once. Past the tolerance: the gradient at once, from the slots in force (the
  // concurrency the latency was measured at; from a fractional limit above
  // them a cut may not lower them at all). Smoothing either (Netflix's 0.2)
  // makes every move take five decisions, and a decision takes ten
  // latencies: minutes with 1 s service times, during which the limit sits
  // far above the knee or far below the ceiling.
  if (ratio <= 1.1) {
    const double growth = std::clamp(kGrowthTarget / ratio, 1.0, kGrowth);
    double next = std::max(limit_now + 1.0, limit_now * growth);
    // Above the limit the last cut left, the knee is near: x1.2 (or +1)
    // per decision, so that a window that looks at no-load latency by
    // chance does not carry the limit past 1.5x the knee.
    if (s_.cut_to > 0.0 && next > s_.cut_to) {
      next = std::max(s_.cut_to, std::max(limit_now + 1.0, limit_now * kGrowthNearKnee));
    }
    s_.limit = bounded(next);
    return;
  }
  if (ratio > o_.tolerance) {
    s_.limit = bounded(limit_now * gradient);
    s_.cut_to = s_.limit;
    return;
  }
  double next = s_.limit * gradient;
  if (ratio <= 1.0 + (o_.tolerance - 1.0) / 2) {
    next += queue;
  } else if (ratio <= o_.tolerance) {
    return;  // between: hold
  }
  s_.limit = bounded(s_.limit * (1.0 - o_.smoothing) + next * o_.smoothing);
}

VegasLimit::VegasLimit(VegasOptions options)
    : o_(options),
      s_{.window = SampleWindow(o_.window, o_.min_window_samples),
         .max = 1.0,
         .limit = 1.0,
         .no_load = NoLoadLatency{},
         .changed = false,
         .changed_at = {},
         .decided_at = {},
         .pending = {}} {
  check_common(o_.min_limit, o_.initial_limit, o_.window, o_.min_window_samples, o_.backoff,
               o_.drop_rate, o_.smoothing, o_.smoothing_samples, o_.long_window);
  const auto positive = [](double x) { return x > 0.0 && std::isfinite(x); };
  if (!positive(o_.alpha) || !positive(o_.beta) || !(o_.alpha < o_.beta)) {
    throw std::invalid_argument("alpha and beta must be > 0 with alpha < beta, got " +
                                std::to_string(o_.alpha) + " and " + std::to_string(o_.beta));
  }
  if (!(o_.threshold >= 0.0 && o_.threshold < o_.alpha)) {
    throw std::invalid_argument("threshold must be in [0, alpha), got " +
                                std::to_string(o_.threshold));
  }
  if (!(o_.min_queue >= 0.0 && std::isfinite(o_.min_queue))) {
    throw std::invalid_argument("min_queue must be >= 0, got " + std::to_string(o_.min_queue));
  }
}

std::int64_t VegasLimit::start(std::int64_t capacity) {
  s_.limit = initial(o_.min_limit, o_.initial_limit, capacity);
  s_.max = static_cast<double>(capacity);
  return in_force();
}

std::int64_t VegasLimit::in_force() const noexcept { return floor_of(s_.limit); }

void VegasLimit::restore(const State& state, std::int64_t capacity,
                         Clock::time_point now) noexcept {
  std::memcpy(static_cast<void*>(&s_), &state, sizeof s_);  // bytes: see make_valid()
  s_.window.repair(o_.window, o_.min_window_samples, now);
  s_.max = static_cast<double>(capacity);
  s_.limit = in_range(s_.limit, static_cast<double>(o_.min_limit), s_.max);
  s_.no_load.repair();
  const SampleWindow::Summary& p = s_.pending;
  if (p.samples < 0 || p.drops < 0 || p.drops > p.samples || p.max_in_flight < 0 ||
      !std::isfinite(p.mean_latency) || p.mean_latency < 0.0 ||
      !std::isfinite(p.mean_square_latency) || p.mean_square_latency < 0.0 ||
      !std::isfinite(p.mean_in_flight) || p.mean_in_flight < 0.0) {
    s_.pending = {};
  }
  make_valid(s_.changed);
  s_.changed = s_.changed && s_.changed_at != Clock::time_point{} && s_.changed_at <= now &&
               s_.decided_at != Clock::time_point{} && s_.decided_at <= now;
}

std::int64_t VegasLimit::update(const LimitSample& sample) noexcept {
  // The requests granted before the first release started on an idle
  // downstream, as the concurrency ramped up: not representative.
  if (!s_.changed) {
    s_.changed = true;
    s_.changed_at = s_.decided_at = sample.end;
    return in_force();
  }
  // For two latencies after the limit changed, requests that ran under the
  // old limit are still finishing: left out. (Leaving out instead the
  // requests granted before the change would keep, shortly after it, only
  // the short ones: a window of them looks faster than the downstream is.)
  if (sample.end < s_.changed_at + hold(s_.no_load.smoothed)) return in_force();
  if (const auto w = s_.window.add(sample)) {
    if (!decide(s_.pending, *w, sample.end - s_.decided_at, s_.no_load.settled, o_.drop_rate)) {
      return in_force();
    }
    s_.decided_at = sample.end;
    const std::int64_t before = in_force();
    const bool first = s_.no_load.smoothed == 0.0;  // as Gradient2Limit's
    on_window(std::exchange(s_.pending, {}), first);
    if (first || in_force() != before) s_.changed_at = sample.end;
  }
  return in_force();
}

void VegasLimit::on_set_limit(std::int64_t limit, Clock::time_point now) noexcept {
  s_.limit = std::clamp(static_cast<double>(limit), static_cast<double>(o_.min_limit), s_.max);
  s_.window.reset();
  s_.pending = {};
  s_.changed = true;
  s_.changed_at = s_.decided_at = now;
}

void VegasLimit::on_window(const SampleWindow::Summary& w, bool first) {
  const double floor_limit = static_cast<double>(o_.min_limit);
  const auto bounded = [&](double limit) { return std::clamp(limit, floor_limit, s_.max); };
  if (too_many_drops(w, o_.drop_rate)) {
    s_.limit = bounded(s_.limit * o_.backoff);
    return;
  }
  const auto ok = static_cast<double>(w.samples - w.drops);
  if (ok == 0.0) return;
  const double latency = w.mean_latency;
  const bool at_floor = in_force() <= o_.min_limit;
  NoLoadLatency& nl = s_.no_load;
  nl.add(latency, w.mean_in_flight, ok, o_.smoothing_samples, o_.long_window, at_floor);

  const double limit_now = static_cast<double>(in_force());
  if (first || static_cast<double>(w.max_in_flight) < limit_now / 2) return;  // or under-used
  if (!nl.settled) {
    s_.limit = bounded(s_.limit * nl.descend(latency, w.mean_in_flight, ok, at_floor,
                                                 w.mean_square_latency));
    return;
  }
  const double log_limit = std::log10(std::max(s_.limit, 1.0));
  const double queue = s_.limit * (1.0 - nl.value / latency);
  const double alpha = std::max(o_.min_queue, o_.alpha * log_limit);
  const double beta = std::max(2.0 * o_.min_queue, o_.beta * log_limit);
  double next = s_.limit;
  if (queue <= o_.threshold * log_limit) {
    next = s_.limit + std::max(1.0, o_.beta * log_limit);
  } else if (queue < alpha) {
    next = s_.limit + std::max(log_limit, 0.5);
  } else if (queue > beta) {
    next = s_.limit - std::max(log_limit, 0.5);
  } else {
    return;
  }
  s_.limit = bounded(s_.limit * (1.0 - o_.smoothing) + next * o_.smoothing);
}

}  // namespace concurrency_limiter
