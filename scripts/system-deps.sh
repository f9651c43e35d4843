#!/usr/bin/env bash
# Installs the Debian packages the build needs when they are missing:
# a C++ toolchain, Clang (for its thread-safety analysis), CMake, Ninja,
# pkg-config, GoogleTest, Google Benchmark, standalone Asio and SQLite (the
# Asio integration and the C++ demo server), Python's venv and headers, and
# redis-server and redis-tools (the cluster-scope tests start their own
# servers on free ports, and join three into a Redis Cluster with redis-cli),
# and openssl (a certificate for the test of Redis over TLS).
# Needs root (or sudo) only when something is missing.
set -euo pipefail

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v ninja >/dev/null || need+=(ninja-build)
command -v g++ >/dev/null || need+=(g++)
command -v clang++ >/dev/null || need+=(clang)
command -v pkg-config >/dev/null || need+=(pkg-config)
[ -f /usr/include/gtest/gtest.h ] || need+=(libgtest-dev)
[ -f /usr/include/benchmark/benchmark.h ] || need+=(libbenchmark-dev)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v openssl >/dev/null || need+=(openssl)
[ -f /usr/include/asio.hpp ] || need+=(libasio-dev)
[ -f /usr/include/sqlite3.h ] || need+=(libsqlite3-dev)
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
python3 -c "import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" \
  2>/dev/null || need+=(python3-dev)

[ ${#need[@]} -eq 0 ] && exit 0
echo "installing missing Debian packages: ${need[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${need[@]}"
