// Python bindings of the engine: type and error mapping only, no logic.
//
// Errors: std::invalid_argument -> ValueError, std::logic_error ->
// RuntimeError (nanobind's defaults). Durations cross as float seconds.
#include <nanobind/nanobind.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <chrono>

#include "concurrency_limiter/concurrency_limiter.h"
#include "future_completion.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace cl = concurrency_limiter;

namespace {

cl::Clock::duration from_seconds(double seconds) {
  return std::chrono::duration_cast<cl::Clock::duration>(
      std::chrono::duration<double>(seconds));
}

// ResourceStatistics::rejected_total and ClassStatistics::rejected_total.
template <typename Statistics>
nb::dict rejected_by_reason(const Statistics& s) {
  nb::dict out;
  for (cl::Outcome o : {cl::Outcome::kTimeout, cl::Outcome::kQueueFull,
                        cl::Outcome::kShed, cl::Outcome::kDisconnected,
                        cl::Outcome::kCancelled, cl::Outcome::kKeyLimit,
                        cl::Outcome::kUnavailable, cl::Outcome::kDeadline,
                        cl::Outcome::kPredictedTimeout, cl::Outcome::kLowerPriority}) {
    out[nb::str(cl::to_string(o).data())] = s.rejected(o);
  }
  return out;
}

// A per-class array as a list of one count per priority value.
std::vector<std::int64_t> by_class(const std::array<std::int64_t, cl::kPriorityCount>& counts) {
  return {counts.begin(), counts.end()};
}

// ResourceOptions::reserve from a list of one count per priority value.
std::array<std::int64_t, cl::kPriorityCount> reserve_from(
    const std::vector<std::int64_t>& reserve) {
  if (reserve.size() != cl::kPriorityCount) {
    throw std::invalid_argument(
        "reserve must list 4 slot counts, one per priority (sheddable, "
        "sheddable_plus, critical, critical_plus), got " +
        std::to_string(reserve.size()));
  }
  std::array<std::int64_t, cl::kPriorityCount> out{};
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = reserve[i];
  return out;
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "C++ engine of fastapi_concurrency_limiter.";
  fastapi_concurrency_limiter::FutureCompletion::prepare();

  nb::enum_<cl::Outcome>(m, "Outcome", "How an acquisition ended.")
      .value("granted", cl::Outcome::kGranted)
      .value("timeout", cl::Outcome::kTimeout)
      .value("queue_full", cl::Outcome::kQueueFull)
      .value("shed", cl::Outcome::kShed)
      .value("disconnected", cl::Outcome::kDisconnected)
      .value("cancelled", cl::Outcome::kCancelled)
      .value("key_limit", cl::Outcome::kKeyLimit)
      .value("unavailable", cl::Outcome::kUnavailable)
      .value("deadline", cl::Outcome::kDeadline)
      .value("predicted_timeout", cl::Outcome::kPredictedTimeout)
      .value("lower_priority", cl::Outcome::kLowerPriority)
      .value("pending", cl::Outcome::kPending);

  nb::enum_<cl::Priority>(m, "Priority", "A request's priority class, lowest first.")
      .value("sheddable", cl::Priority::kSheddable)
      .value("sheddable_plus", cl::Priority::kSheddablePlus)
      .value("critical", cl::Priority::kCritical)
      .value("critical_plus", cl::Priority::kCriticalPlus);

  nb::enum_<cl::Completion>(m, "Completion", "How a request that held slots ended.")
      .value("success", cl::Completion::kSuccess)
      .value("dropped", cl::Completion::kDropped)
      .value("ignored", cl::Completion::kIgnored);

  nb::class_<cl::LimitAlgorithm>(m, "LimitAlgorithm");
  nb::class_<cl::GradientLimit, cl::LimitAlgorithm>(m, "GradientLimit")
      .def(nb::new_([](std::int64_t min_limit, std::int64_t initial_limit,
                       double tolerance, double backoff, double drop_rate,
                       double window, std::int64_t min_window_samples) {
             return std::make_shared<cl::GradientLimit>(cl::GradientOptions{
                 .min_limit = min_limit,
                 .initial_limit = initial_limit,
                 .tolerance = tolerance,
                 .backoff = backoff,
                 .drop_rate = drop_rate,
                 .window = from_seconds(window),
                 .min_window_samples = min_window_samples});
           }),
           "min_limit"_a, "initial_limit"_a, "tolerance"_a, "backoff"_a,
           "drop_rate"_a, "window"_a, "min_window_samples"_a);
  nb::class_<cl::Gradient2Limit, cl::LimitAlgorithm>(m, "Gradient2Limit")
      .def(nb::new_([](std::int64_t min_limit, std::int64_t initial_limit,
                       double tolerance, double backoff, double drop_rate,
                       double window, std::int64_t min_window_samples) {
             return std::make_shared<cl::Gradient2Limit>(cl::Gradient2Options{
                 .min_limit = min_limit,
                 .initial_limit = initial_limit,
                 .tolerance = tolerance,
                 .backoff = backoff,
                 .drop_rate = drop_rate,
                 .window = from_seconds(window),
                 .min_window_samples = min_window_samples});
           }),
           "min_limit"_a, "initial_limit"_a, "tolerance"_a, "backoff"_a,
           "drop_rate"_a, "window"_a, "min_window_samples"_a);
  nb::class_<cl::VegasLimit, cl::LimitAlgorithm>(m, "VegasLimit")
      .def(nb::new_([](std::int64_t min_limit, std::int64_t initial_limit,
                       double backoff, double drop_rate, double window,
                       std::int64_t min_window_samples) {
             return std::make_shared<cl::VegasLimit>(cl::VegasOptions{
                 .min_limit = min_limit,
                 .initial_limit = initial_limit,
                 .backoff = backoff,
                 .drop_rate = drop_rate,
                 .window = from_seconds(window),
                 .min_window_samples = min_window_samples});
           }),
           "min_limit"_a, "initial_limit"_a, "backoff"_a, "drop_rate"_a, "window"_a,
           "min_window_samples"_a);
  nb::class_<cl::AimdLimit, cl::LimitAlgorithm>(m, "AimdLimit")
      .def(nb::new_([](std::int64_t min_limit, std::int64_t initial_limit,
                       double backoff, double window, std::int64_t min_window_samples) {
             return std::make_shared<cl::AimdLimit>(cl::AimdOptions{
                 .min_limit = min_limit,
                 .initial_limit = initial_limit,
                 .backoff = backoff,
                 .window = from_seconds(window),
                 .min_window_samples = min_window_samples});
           }),
           "min_limit"_a, "initial_limit"_a, "backoff"_a, "window"_a,
           "min_window_samples"_a);

  nb::enum_<cl::QueueDiscipline>(m, "QueueDiscipline")
      .value("fifo", cl::QueueDiscipline::kFifo)
      .value("lifo", cl::QueueDiscipline::kLifo)
      .value("adaptive", cl::QueueDiscipline::kAdaptive);

  nb::enum_<cl::Scope>(m, "Scope")
      .value("process", cl::Scope::kProcess)
      .value("host", cl::Scope::kHost);

  nb::class_<cl::Histogram>(m, "Histogram")
      .def_prop_ro_static("bounds",
                          [](nb::handle) {
                            return std::vector<double>(cl::Histogram::kBounds.begin(),
                                                       cl::Histogram::kBounds.end());
                          })
      .def_prop_ro("counts",
                   [](const cl::Histogram& h) {
                     return std::vector<std::uint64_t>(h.counts.begin(), h.counts.end());
                   })
      .def_ro("count", &cl::Histogram::count)
      .def_ro("sum", &cl::Histogram::sum);

  nb::class_<cl::ClassStatistics>(m, "ClassStatistics")
      .def_ro("in_use", &cl::ClassStatistics::in_use)
      .def_ro("waiting", &cl::ClassStatistics::waiting)
      .def_ro("acquired_total", &cl::ClassStatistics::acquired_total)
      .def_prop_ro("rejected_total", &rejected_by_reason<cl::ClassStatistics>);

  nb::class_<cl::ResourceStatistics>(m, "ResourceStatistics")
      .def_ro("name", &cl::ResourceStatistics::name)
      .def_ro("capacity", &cl::ResourceStatistics::capacity)
      .def_ro("limit", &cl::ResourceStatistics::limit)
      .def_ro("in_use", &cl::ResourceStatistics::in_use)
      .def_ro("waiting", &cl::ResourceStatistics::waiting)
      .def_ro("active_keys", &cl::ResourceStatistics::active_keys)
      .def_ro("peak_in_use", &cl::ResourceStatistics::peak_in_use)
      .def_ro("max_waiting", &cl::ResourceStatistics::max_waiting)
      .def_ro("queue", &cl::ResourceStatistics::queue)
      .def_ro("acquired_total", &cl::ResourceStatistics::acquired_total)
      .def_prop_ro("rejected_total", &rejected_by_reason<cl::ResourceStatistics>)
      .def_ro("wait_seconds", &cl::ResourceStatistics::wait_seconds)
      .def_ro("hold_seconds", &cl::ResourceStatistics::hold_seconds)
      .def_ro("service_seconds", &cl::ResourceStatistics::service_seconds)
      .def_prop_ro("classes", [](const cl::ResourceStatistics& s) {
        return std::vector<cl::ClassStatistics>(s.classes.begin(), s.classes.end());
      });

  nb::class_<cl::Resource>(m, "Resource")
      .def(nb::new_([](std::string name, std::int64_t capacity,
                       std::optional<std::int64_t> max_waiting,
                       cl::QueueDiscipline queue, double adaptive_target,
                       double adaptive_interval,
                       std::shared_ptr<cl::LimitAlgorithm> limit_algorithm,
                       cl::Scope scope, std::int64_t per_key, bool early_reject,
                       const std::vector<std::int64_t>& reserve) {
             return std::make_shared<cl::Resource>(cl::ResourceOptions{
                 .name = std::move(name),
                 .capacity = capacity,
                 .max_waiting = max_waiting,
                 .queue = queue,
                 .adaptive_target = from_seconds(adaptive_target),
                 .adaptive_interval = from_seconds(adaptive_interval),
                 .limit_algorithm = std::move(limit_algorithm),
                 .scope = scope,
                 .per_key = per_key,
                 .early_reject = early_reject,
                 .reserve = reserve_from(reserve)});
           }),
           "name"_a, "capacity"_a, "max_waiting"_a.none(), "queue"_a,
           "adaptive_target"_a, "adaptive_interval"_a,
           "limit_algorithm"_a.none() = nb::none(), "scope"_a = cl::Scope::kProcess,
           "per_key"_a = 0, "early_reject"_a = false,
           "reserve"_a = std::vector<std::int64_t>(cl::kPriorityCount, 0))
      .def_prop_ro("name", &cl::Resource::name)
      .def_prop_ro("capacity", &cl::Resource::capacity)
      .def_prop_ro("limit", &cl::Resource::limit)
      .def("set_limit", &cl::Resource::set_limit, "limit"_a)
      .def_prop_ro("adaptive", &cl::Resource::adaptive)
      .def_prop_ro("max_waiting", &cl::Resource::max_waiting)
      .def_prop_ro("queue", &cl::Resource::queue)
      .def_prop_ro("scope", &cl::Resource::scope)
      .def_prop_ro("host_note", &cl::Resource::host_note)
      .def_prop_ro("host_note_is_warning", &cl::Resource::host_note_is_warning)
      .def_prop_ro("per_key", &cl::Resource::per_key)
      .def_prop_ro("early_reject", &cl::Resource::early_reject)
      .def_prop_ro("reserve",
                   [](const cl::Resource& r) {
                     return std::vector<std::int64_t>(r.reserve().begin(), r.reserve().end());
                   })
      .def_prop_ro("in_use", &cl::Resource::in_use)
      .def_prop_ro("waiting", &cl::Resource::waiting)
      .def("statistics", &cl::Resource::statistics);

  nb::class_<cl::ResourceSet>(m, "ResourceSet")
      .def(nb::new_([](std::vector<std::shared_ptr<cl::Resource>> resources) {
             return std::make_shared<cl::ResourceSet>(std::move(resources));
           }),
           "resources"_a)
      .def_prop_ro("resources",
                   [](const cl::ResourceSet& s) { return s.resources(); })
      .def("describe", &cl::ResourceSet::describe);

  nb::class_<cl::Limiter>(m, "Limiter")
      .def(nb::new_([](std::vector<std::shared_ptr<cl::Resource>> resources,
                       double timeout) {
             return std::make_shared<cl::Limiter>(std::move(resources),
                                                  from_seconds(timeout));
           }),
           "resources"_a, "timeout"_a)
      .def("select",
           [](const cl::Limiter& l,
              const std::vector<std::shared_ptr<cl::Resource>>& resources) {
             return std::const_pointer_cast<cl::ResourceSet>(l.select(resources));
           },
           "resources"_a)
      .def("statistics", &cl::Limiter::statistics);

  nb::class_<cl::Acquisition> acquisition(m, "Acquisition");
  nb::enum_<cl::Acquisition::State>(acquisition, "State")
      .value("idle", cl::Acquisition::State::kIdle)
      .value("pending", cl::Acquisition::State::kPending)
      .value("granted", cl::Acquisition::State::kGranted)
      .value("rejected", cl::Acquisition::State::kRejected)
      .value("released", cl::Acquisition::State::kReleased);
  acquisition
      .def(nb::init<std::shared_ptr<const cl::ResourceSet>, std::optional<std::string>,
                    cl::Priority>(),
           "resource_set"_a, "key"_a.none() = nb::none(),
           "priority"_a = cl::Priority::kCritical)
      .def_prop_ro("key", &cl::Acquisition::key)
      .def_prop_ro("priority", &cl::Acquisition::priority)
      .def("try_acquire", &cl::Acquisition::try_acquire)
      .def("try_once", &cl::Acquisition::try_once)
      .def("refuse", &cl::Acquisition::refuse, "reason"_a)
      .def("start",
           [](cl::Acquisition& a, std::function<void(cl::Outcome)> callback) {
             // The engine calls back from noexcept code: a Python exception
             // (e.g. a closed event loop) is reported as unraisable instead
             // of unwinding into it.
             return a.start([callback = std::move(callback)](cl::Outcome o) {
               try {
                 callback(o);
               } catch (nb::python_error& e) {
                 nb::gil_scoped_acquire gil;
                 e.discard_as_unraisable("fastapi_concurrency_limiter completion callback");
               }
             });
           },
           "callback"_a)
      // The asyncio waiter: the completion resolves `future` on `loop`.
      // `timeout`: seconds the caller will wait (None: no limit), for early
      // rejection; the caller's timer still expires the request.
      .def("start",
           [](cl::Acquisition& a, nb::object future, nb::object loop,
              std::optional<double> timeout) {
             cl::Clock::time_point deadline = cl::Clock::time_point::max();
             // Beyond a century counts as no deadline (and cannot overflow).
             if (timeout && *timeout < 100.0 * 365 * 24 * 3600) {
               deadline = cl::Clock::now() + from_seconds(*timeout);
             }
             return a.start(fastapi_concurrency_limiter::FutureCompletion(
                                std::move(future), std::move(loop)),
                            deadline);
           },
           "future"_a, "loop"_a, "timeout"_a.none() = nb::none())
      .def("expire", &cl::Acquisition::expire)
      .def("cancel", &cl::Acquisition::cancel, "reason"_a = cl::Outcome::kCancelled)
      .def("release", &cl::Acquisition::release,
           "completion"_a = cl::Completion::kSuccess)
      .def("restart_service_clock", &cl::Acquisition::restart_service_clock)
      .def_prop_ro("outcome", &cl::Acquisition::outcome)
      .def_prop_ro("state", &cl::Acquisition::state)
      .def_prop_ro("predicted_wait", &cl::Acquisition::predicted_wait)
      .def_prop_ro("refused_by", [](const cl::Acquisition& a) -> std::optional<std::string> {
        if (const cl::Resource* r = a.refused_by()) return r->name();
        return std::nullopt;
      });

  nb::class_<cl::HostProcessInfo>(m, "HostProcessInfo")
      .def_ro("pid", &cl::HostProcessInfo::pid)
      .def_ro("held", &cl::HostProcessInfo::held)
      .def_prop_ro("held_by_class",
                   [](const cl::HostProcessInfo& p) { return by_class(p.held_by_class); })
      .def_ro("waiting", &cl::HostProcessInfo::waiting)
      .def_ro("alive", &cl::HostProcessInfo::alive)
      .def_ro("other_pid_namespace", &cl::HostProcessInfo::other_pid_namespace);

  nb::class_<cl::HostResourceInfo>(m, "HostResourceInfo")
      .def_ro("name", &cl::HostResourceInfo::name)
      .def_ro("capacity", &cl::HostResourceInfo::capacity)
      .def_ro("limit", &cl::HostResourceInfo::limit)
      .def_ro("adaptive", &cl::HostResourceInfo::adaptive)
      .def_ro("max_waiting", &cl::HostResourceInfo::max_waiting)
      .def_ro("queue", &cl::HostResourceInfo::queue)
      .def_prop_ro("reserve", [](const cl::HostResourceInfo& r) { return by_class(r.reserve); })
      .def_ro("in_use", &cl::HostResourceInfo::in_use)
      .def_ro("waiting", &cl::HostResourceInfo::waiting)
      .def_ro("repairs", &cl::HostResourceInfo::repairs)
      .def_ro("problem", &cl::HostResourceInfo::problem)
      .def_ro("processes", &cl::HostResourceInfo::processes);

  m.def("list_host_resources", &cl::list_host_resources);
  // std::runtime_error -> RuntimeError (refused: live processes, no such name).
  m.def("remove_host_resource", &cl::remove_host_resource, "name"_a, "force"_a = false);

  nb::class_<cl::DeadlineQueue>(m, "DeadlineQueue")
      .def(nb::init<>())
      .def("add", &cl::DeadlineQueue::add, "acquisition"_a, "deadline"_a)
      .def("remove", &cl::DeadlineQueue::remove, "acquisition"_a)
      .def("expire_due", &cl::DeadlineQueue::expire_due, "now"_a)
      .def_prop_ro("next_deadline", &cl::DeadlineQueue::next_deadline)
      .def("__len__", &cl::DeadlineQueue::size);
}
