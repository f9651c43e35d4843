#!/usr/bin/env bash
# Installs the wheel that suits one interpreter into a fresh virtualenv, on a
# PATH without any compiler (so nothing can be built from source: as on a
# user's machine that has none), and runs the Python suite against it:
#
#   scripts/test-wheel.sh DIST VENV PYTHON [pytest arguments...]
#
# PINS (optional): requirements installed together with the test
# dependencies, e.g. PINS="fastapi==0.117.*" to test an older FastAPI.
set -euo pipefail

dist=$(realpath "$1") venv=$2 python=$3
shift 3

rm -rf "$venv"
"$python" -m venv "$venv"
venv=$(realpath "$venv")

# PATH: the venv, and symlinks to the only programs the suite or pip may
# start. No cc, c++, gcc, g++, clang.
tools=$(mktemp -d)
rm=$(command -v rm)  # the trap runs after PATH is stripped
trap '"$rm" -rf "$tools"' EXIT
for tool in sh env uname; do
  ln -s "$(command -v "$tool")" "$tools/$tool"
done
# The cluster-scope tests start a redis-server of their own (they skip
# without one), join three into a Redis Cluster with redis-cli, and make a
# certificate with openssl for the test over TLS.
for tool in redis-server redis-cli openssl; do
  if command -v "$tool" >/dev/null; then
    ln -s "$(command -v "$tool")" "$tools/$tool"
  fi
done
export PATH="$venv/bin:$tools"
unset CC CXX
for compiler in cc c++ gcc g++ clang clang++; do
  if command -v "$compiler" >/dev/null; then
    echo "error: a compiler is still on PATH: $(command -v "$compiler")" >&2
    exit 1
  fi
done

pip=(python -m pip --quiet --disable-pip-version-check)
# From DIST only: pip picks the wheel whose tags this interpreter accepts.
"${pip[@]}" install --no-index --no-deps --find-links "$dist" fastapi-concurrency-limiter
# Then the runtime and test dependencies, as wheels only.
# PINS: requirements split on spaces, not globbed (fastapi==0.117.*).
set -f
# shellcheck disable=SC2086
"${pip[@]}" install --only-binary :all: "fastapi-concurrency-limiter[test]" ${PINS:-}
set +f

# Show which wheel is under test, and that the tests import it (not sources).
python - <<'PY'
import importlib.metadata, sys
import fastapi_concurrency_limiter as fcl
wheel = importlib.metadata.distribution("fastapi-concurrency-limiter").read_text("WHEEL") or ""
tags = [line.split(": ", 1)[1] for line in wheel.splitlines() if line.startswith("Tag: ")]
assert fcl.__file__ and fcl.__file__.startswith(sys.prefix), fcl.__file__
versions = ", ".join(f"{d} {importlib.metadata.version(d)}" for d in ("fastapi", "starlette"))
print(f"== Python {sys.version.split()[0]}: wheel {', '.join(tags)}, no compiler on PATH; {versions}")
PY
python -m pytest -q "$@"
