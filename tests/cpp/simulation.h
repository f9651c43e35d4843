// A simulated downstream and a closed-loop load in simulated time, to test
// and measure limit algorithms deterministically (no threads, no clock).
//
// The downstream has a knee at `k` concurrent requests: up to k, each takes
// a service time drawn with mean `base`; past it, they share its capacity,
// so each takes that times in_flight / k (throughput stays at k / base,
// latency grows). The draw is +-`jitter` around `base` by default, or one of
// the distributions real service times follow (ServiceTimes).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <queue>
#include <random>
#include <vector>

#include "concurrency_limiter/limit.h"

namespace concurrency_limiter::testing {

// How service times below the knee vary around their mean.
enum class ServiceTimes {
  kJitter,       // uniform in [1-jitter, 1+jitter] x mean
  kExponential,  // coefficient of variation 1
  kLognormal05,  // lognormal, sigma 0.5 (CV 0.53)
  kLognormal10,  // lognormal, sigma 1.0 (CV 1.31)
  kBimodal,      // 90 % fast, 10 % ten times slower (CV 1.42)
};

inline const char* to_string(ServiceTimes d) {
  switch (d) {
    case ServiceTimes::kJitter: return "jitter";
    case ServiceTimes::kExponential: return "exp";
    case ServiceTimes::kLognormal05: return "logn0.5";
    case ServiceTimes::kLognormal10: return "logn1.0";
    case ServiceTimes::kBimodal: return "bimodal";
  }
  return "?";
}

struct SimulatedDownstream {
  double base = 0.1;  // seconds: the mean service time at or below the knee
  double k = 4.0;     // the knee: concurrency it serves without slowing down
  double jitter = 0.1;  // kJitter: each latency is scaled by a factor in [1-j, 1+j]
  ServiceTimes service_times = ServiceTimes::kJitter;
  // Fraction of requests that fail (reported as dropped), for error tests.
  double error_rate = 0.0;

  // With `cores` > 0, a downstream that shares `cores` processors with the
  // rest of the service, which keeps `background` of them busy (a database
  // of CPU-bound queries on the service's own machine): latency = base x
  // max(1, (in_flight + background) / cores), so throughput keeps growing,
  // ever less, with the concurrency (taken from the rest of the service),
  // instead of stopping at a knee.
  double cores = 0.0;
  double background = 0.0;

  double latency(std::int64_t in_flight) const {
    if (cores > 0.0) {
      return base * std::max(1.0, (static_cast<double>(in_flight) + background) / cores);
    }
    return base * std::max(1.0, static_cast<double>(in_flight) / k);
  }

  // A factor of mean 1 that scales latency() for one request.
  template <class Rng>
  double draw(Rng& rng) const {
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    switch (service_times) {
      case ServiceTimes::kJitter:
        return 1.0 + jitter * (2.0 * unit(rng) - 1.0);
      case ServiceTimes::kExponential:
        return std::exponential_distribution<double>(1.0)(rng);
      case ServiceTimes::kLognormal05:
        return std::lognormal_distribution<double>(-0.125, 0.5)(rng);
      case ServiceTimes::kLognormal10:
        return std::lognormal_distribution<double>(-0.5, 1.0)(rng);
      case ServiceTimes::kBimodal:
        return (unit(rng) < 0.9 ? 1.0 : 10.0) / 1.9;
    }
    return 1.0;
  }
};

// `clients` clients, each sending its next request as soon as the previous
// one ends (no think time). Requests beyond the limit wait (FIFO, no
// timeout); the limit is the algorithm's, put in force exactly as a Resource
// does: raising it admits waiters at once, lowering it retires slots as they
// are released.
class ClosedLoopSimulation {
 public:
  struct Point {
    double time;
    std::int64_t limit;
  };

  ClosedLoopSimulation(LimitAlgorithm& algorithm, std::int64_t capacity,
                       std::int64_t clients, std::uint32_t seed = 1)
      : algorithm_(algorithm), waiting_(clients), rng_(seed) {
    limit_ = algorithm_.start(capacity);
    trace_.push_back({0.0, limit_});
  }

  SimulatedDownstream downstream;

  // Runs until simulated time `end` (seconds).
  void run_until(double end) {
    for (;;) {
      while (waiting_ > 0 && in_use_ < limit_) {
        --waiting_;
        ++in_use_;
        peak_over_limit_ = std::max(peak_over_limit_, in_use_ - limit_);
        const double factor = downstream.draw(rng_);
        const bool fails = unit_(rng_) < downstream.error_rate;
        events_.push({now_ + downstream.latency(in_use_) * factor, now_, fails});
      }
      if (events_.empty() || events_.top().end > end) break;
      const Event e = events_.top();
      events_.pop();
      now_ = e.end;
      LimitSample s;
      s.end = Clock::time_point{} + to_duration(now_);
      s.service_time = to_duration(e.end - e.start);
      s.in_flight = in_use_;
      s.dropped = e.fails;
      --in_use_;
      ++waiting_;  // the client sends its next request at once
      if (!e.fails) {
        ++completed_;
        latency_sum_ += e.end - e.start;
      }
      const std::int64_t limit = algorithm_.update(s);
      if (limit != limit_) {
        limit_ = limit;
        trace_.push_back({now_, limit_});
      }
    }
    now_ = end;
  }

  // `n` more clients, each sending its first request at once (a spike).
  void add_clients(std::int64_t n) { waiting_ += n; }

  double now() const { return now_; }
  std::int64_t limit() const { return limit_; }
  std::int64_t completed() const { return completed_; }  // successes so far
  // The sum of the successes' service times so far, in seconds.
  double latency_sum() const { return latency_sum_; }
  // Every change of the limit, in time order (the first at time 0).
  const std::vector<Point>& trace() const { return trace_; }

  // The lowest and highest limit in force during [from, to).
  std::pair<std::int64_t, std::int64_t> limit_range(double from, double to) const {
    std::int64_t lo = INT64_MAX, hi = 0;
    for (std::size_t i = 0; i < trace_.size(); ++i) {
      const double start = trace_[i].time;
      const double stop = i + 1 < trace_.size() ? trace_[i + 1].time : now_;
      if (stop <= from || start >= to) continue;
      lo = std::min(lo, trace_[i].limit);
      hi = std::max(hi, trace_[i].limit);
    }
    return {lo, hi};
  }

 private:
  struct Event {
    double end;
    double start;
    bool fails;
    bool operator>(const Event& o) const { return end > o.end; }
  };

  static Clock::duration to_duration(double seconds) {
    return std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(seconds));
  }

  LimitAlgorithm& algorithm_;
  std::priority_queue<Event, std::vector<Event>, std::greater<>> events_;
  std::int64_t limit_ = 1;
  std::int64_t in_use_ = 0;
  std::int64_t waiting_;
  std::int64_t completed_ = 0;
  double latency_sum_ = 0.0;
  std::int64_t peak_over_limit_ = 0;
  double now_ = 0.0;
  std::mt19937 rng_;
  std::uniform_real_distribution<double> unit_{0.0, 1.0};
  std::vector<Point> trace_;
};

}  // namespace concurrency_limiter::testing
