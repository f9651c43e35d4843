// FutureCompletion: an engine completion callback that resolves an asyncio
// future, for the Python package's waiters.
//
// Why in C++: the same work done by a Python callback (a bound method behind
// a functools.partial) costs a Python frame and several calls per grant,
// which is most of what a handoff to a waiting request costs.
//
// asyncio futures are not thread-safe: only the thread running the future's
// loop may resolve it. The engine calls back on whichever thread decided the
// outcome (a releasing thread, a timer, a cancel), so this compares the loop
// that the calling thread is running with the future's loop (not the thread
// that created anything: one loop may be run by one thread and later by
// another; see on_loop_thread()). On the loop's thread it sets the result at once, unless the
// future is already done (a cancelled waiter's is); from any other thread it
// hands the result over with loop.call_soon_threadsafe().
//
// Copies share one state (std::function must be copyable); the Python
// references are dropped with the GIL held, whichever thread drops them.
#pragma once

#include <nanobind/nanobind.h>

#include <memory>
#include <utility>

#include "concurrency_limiter/outcome.h"

namespace fastapi_concurrency_limiter {

namespace nb = nanobind;

class FutureCompletion {
  struct Names;

 public:
  FutureCompletion(nb::object future, nb::object loop)
      : state_(std::make_shared<State>(std::move(future), std::move(loop))) {}

  // Called by the engine, from noexcept code: a Python error (e.g. the loop
  // is closed) is reported as unraisable instead of unwinding into it.
  void operator()(concurrency_limiter::Outcome outcome) const noexcept {
    nb::gil_scoped_acquire gil;
    try {
      const Names& names = Names::get();
      nb::object result = nb::cast(outcome);
      if (on_loop_thread(names)) {
        set_unless_done(state_->future, result);
      } else {
        state_->loop.attr(names.call_soon_threadsafe)(names.set_unless_done_fn,
                                                      state_->future, result);
      }
    } catch (nb::python_error& e) {
      e.discard_as_unraisable("fastapi_concurrency_limiter completion callback");
    }
  }

  // Makes the names below; call once at module initialisation, so that no
  // completion has to (with whatever locks its thread holds).
  static void prepare() { Names::get(); }

  // Whether the calling thread is running the future's loop. asyncio's
  // loops record the thread that runs them in `_thread_id` (None when not
  // running): comparing it costs an attribute read, where
  // asyncio._get_running_loop() makes a getpid() system call before Python
  // 3.12. Loops without the attribute are asked the documented way.
  bool on_loop_thread(const Names& names) const {
    PyObject* loop = state_->loop.ptr();
    PyObject* thread_id = PyObject_GetAttr(loop, names.thread_id.ptr());
    if (thread_id != nullptr) {
      const bool same = thread_id != Py_None && PyLong_Check(thread_id) &&
                        PyLong_AsUnsignedLong(thread_id) == PyThread_get_thread_ident();
      Py_DECREF(thread_id);
      if (PyErr_Occurred()) throw nb::python_error();
      return same;
    }
    PyErr_Clear();
    PyObject* running = PyObject_CallNoArgs(names.get_running_loop.ptr());
    if (running == nullptr) throw nb::python_error();
    Py_DECREF(running);
    return running == loop;
  }

  // future.set_result(result) unless the future is done. Raises
  // nb::python_error.
  static void set_unless_done(nb::handle future, nb::handle result) {
    const Names& names = Names::get();
    nb::object done = future.attr(names.done)();
    if (!PyObject_IsTrue(done.ptr())) future.attr(names.set_result)(result);
  }

 private:
  struct State {
    State(nb::object f, nb::object l) : future(std::move(f)), loop(std::move(l)) {}
    ~State() {
      nb::gil_scoped_acquire gil;
      future.reset();
      loop.reset();
    }
    nb::object future;
    nb::object loop;
  };

  // Interned names and functions, made once (with the GIL) and never freed:
  // callbacks may still run while the interpreter shuts down.
  struct Names {
    nb::object get_running_loop;
    nb::object set_unless_done_fn;
    nb::str done{"done"};
    nb::str set_result{"set_result"};
    nb::str call_soon_threadsafe{"call_soon_threadsafe"};
    nb::str thread_id{"_thread_id"};

    static const Names& get() {
      static const Names* names = new Names{
          nb::module_::import_("asyncio").attr("_get_running_loop"),
          nb::cpp_function([](nb::handle future, nb::handle result) {
            FutureCompletion::set_unless_done(future, result);
          })};
      return *names;
    }
  };

  std::shared_ptr<State> state_;
};

}  // namespace fastapi_concurrency_limiter
