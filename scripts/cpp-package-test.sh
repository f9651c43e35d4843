#!/usr/bin/env bash
# The ways a C++ project consumes the library, each built and run:
#
#   scripts/cpp-package-test.sh OUT [JOBS]
#
#   0. a plain configure of this tree (top level: tests on) has no -Werror;
#      without GoogleTest it leaves the tests out (unless asked for);
#   1. the static library (Release) installed into OUT/prefix, a prefix other
#      than the configured one (the installed tree must be relocatable), and
#      tests/cmake-consumer built against it with GCC and with Clang: the
#      CMake package (concurrency_limiter::concurrency_limiter, and
#      concurrency_limiter::asio compiling the coroutine example), pkg-config
#      in CMake and on a compiler's command line, and C++23 programs that
#      must stay C++23;
#   2. the shared library (BUILD_SHARED_LIBS=ON) installed into
#      OUT/prefix-shared: its soname, and the consumer linked to it;
#   3. tests/cmake-subproject with add_subdirectory() of this tree;
#   4. tests/cmake-subproject with FetchContent of a source archive of the
#      library (made here, no network), building it shared.
#
# Builds that only need to compile are Debug (-O0). Prints each step's time.
set -euo pipefail

out=$1 jobs=${2:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"

step_start=$SECONDS
step() {
  echo "== cpp-package-test: $* (after $((SECONDS - step_start)) s)"
}
quiet() {  # runs a configure step, showing its output only if it fails
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then
    cat "$log"
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}
# Installs the library built with the given options into $1.
install_library() {
  local prefix=$1 build=$2
  shift 2
  quiet cmake -S . -B "$build" -G Ninja -DCMAKE_INSTALL_PREFIX="$out/configured-prefix" \
    -DCL_BUILD_TESTS=OFF -DCL_BUILD_BENCHMARKS=OFF -DCL_BUILD_EXAMPLES=OFF "$@"
  cmake --build "$build" -j "$jobs"
  quiet cmake --install "$build" --prefix "$prefix"
}
pc_path() {
  dirname "$(find "$1" -name concurrency_limiter.pc)"
}
# Builds tests/cmake-consumer against an installed prefix and runs it.
consume_installed() {
  local prefix=$1 build=$2
  shift 2
  PKG_CONFIG_PATH=$(pc_path "$prefix") quiet cmake -S tests/cmake-consumer -B "$build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Debug -DCMAKE_PREFIX_PATH="$prefix" "$@"
  cmake --build "$build" -j "$jobs"
  for program in consumer consumer_cxx23 consumer_pkgconfig; do
    if [ -x "$build/$program" ]; then "$build/$program"; fi
  done
  "$build/coroutine_limit" >/dev/null
}

step "a plain configure of this tree: no -Werror"
# Tests, benchmarks and examples are on (top level), but a new compiler's
# new warning must not fail a user's build: -Werror only with CL_WERROR=ON.
quiet cmake -S . -B "$out/plain" -G Ninja -DCMAKE_BUILD_TYPE=Release
if ! grep -q concurrency_limiter_tests "$out/plain/build.ninja" || grep -q -- -Werror "$out/plain/build.ninja"; then
  echo "a plain configure has no test suite, or compiles with -Werror:" >&2
  grep -- -Werror "$out/plain/build.ninja" | sort -u >&2
  exit 1
fi

step "a plain configure without GoogleTest: the tests are left out, said so"
if ! cmake -S . -B "$out/no-gtest" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON >"$out/no-gtest.log" 2>&1 \
  || ! grep -q "GoogleTest not found: the tests are not built" "$out/no-gtest.log" \
  || grep -q concurrency_limiter_tests "$out/no-gtest/build.ninja"; then
  cat "$out/no-gtest.log" >&2
  echo "a plain configure without GoogleTest failed, or did not leave the tests out" >&2
  exit 1
fi
# Asked for explicitly, the tests require GoogleTest.
if cmake -S . -B "$out/no-gtest-asked" -G Ninja -DCL_BUILD_TESTS=ON \
    -DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON >/dev/null 2>&1; then
  echo "-DCL_BUILD_TESTS=ON without GoogleTest configured without error" >&2
  exit 1
fi

step "static library, installed"
install_library "$out/prefix" "$out/build" -DCMAKE_BUILD_TYPE=Release
# The test hooks (src/internal/test_hooks.h) are not part of the API.
if grep -rlE "namespace testing|hold_host_lock_forever" "$out/prefix/include"; then
  echo "test hooks in the installed headers (above)" >&2
  exit 1
fi
step "consumer of the installed package, GCC"
consume_installed "$out/prefix" "$out/consumer" -DCMAKE_CXX_COMPILER=g++
step "pkg-config on a compiler's command line, C++23"
# As a Makefile would: the consumer's -std=c++23 comes first, and must stay.
# -Werror=non-virtual-dtor: the public headers' polymorphic classes stay
# clean under that warning.
# shellcheck disable=SC2046
g++ -std=c++23 -Werror=non-virtual-dtor -DCONSUMER_EXPECTS_CXX23 $(PKG_CONFIG_PATH=$(pc_path "$out/prefix") pkg-config --cflags concurrency_limiter) \
  tests/cmake-consumer/main.cc -o "$out/consumer/consumer_pkgconfig_cxx23" \
  $(PKG_CONFIG_PATH=$(pc_path "$out/prefix") pkg-config --libs concurrency_limiter)
"$out/consumer/consumer_pkgconfig_cxx23"
step "consumer of the installed package, Clang"
consume_installed "$out/prefix" "$out/consumer-clang" -DCMAKE_CXX_COMPILER=clang++ -DCONSUMER_PKGCONFIG=OFF

step "shared library, installed"
install_library "$out/prefix-shared" "$out/build-shared" -DCMAKE_BUILD_TYPE=Debug -DBUILD_SHARED_LIBS=ON
library=$(find "$out/prefix-shared" -name 'libconcurrency_limiter.so.*.*.*')
soname=$(objdump -p "$library" | awk '$1 == "SONAME" { print $2 }')
version=$(sed -n 's/^project(concurrency_limiter VERSION \([0-9]*\.[0-9]*\)\..*/\1/p' CMakeLists.txt)
if [ "$soname" != "libconcurrency_limiter.so.$version" ] || \
   [ ! -e "$(dirname "$library")/$soname" ] || [ ! -e "$(dirname "$library")/libconcurrency_limiter.so" ]; then
  echo "shared library: soname '$soname' (want libconcurrency_limiter.so.$version) or its links missing" >&2
  exit 1
fi
step "consumer of the installed shared library"
consume_installed "$out/prefix-shared" "$out/consumer-shared" -DCONSUMER_PKGCONFIG=OFF
# ldd's output is read whole first: with pipefail, `ldd | grep -q` fails when
# grep stops reading at its first match and ldd gets SIGPIPE.
libraries=$(ldd "$out/consumer-shared/consumer")
if ! grep -q "$soname => $out/prefix-shared" <<<"$libraries"; then
  echo "the consumer does not load $soname from $out/prefix-shared:" >&2
  ldd "$out/consumer-shared/consumer" >&2
  exit 1
fi

step "add_subdirectory()"
quiet cmake -S tests/cmake-subproject -B "$out/subdirectory" -G Ninja -DCMAKE_BUILD_TYPE=Debug \
  -DCL_SOURCE_DIR="$root"
cmake --build "$out/subdirectory" -j "$jobs"
"$out/subdirectory/consumer"
"$out/subdirectory/coroutine_limit" >/dev/null

step "FetchContent of a source archive, shared"
# What a release archive of the C++ library holds: no tests, no Python.
cmake -E tar czf "$out/concurrency_limiter-src.tar.gz" CMakeLists.txt LICENSE cmake include src
quiet cmake -S tests/cmake-subproject -B "$out/fetchcontent" -G Ninja -DCMAKE_BUILD_TYPE=Debug \
  -DCL_SOURCE_URL="$out/concurrency_limiter-src.tar.gz" -DBUILD_SHARED_LIBS=ON
cmake --build "$out/fetchcontent" -j "$jobs"
"$out/fetchcontent/consumer"
"$out/fetchcontent/coroutine_limit" >/dev/null
libraries=$(ldd "$out/fetchcontent/consumer")
grep -q "libconcurrency_limiter.so" <<<"$libraries" || {
  echo "the FetchContent build did not link the shared library" >&2
  exit 1
}

step "done"
