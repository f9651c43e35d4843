#!/usr/bin/env bash
# Prints the interpreter for each Python version given (e.g. 3.10 3.12), one
# path a line: pyenv's newest installed release of that version when pyenv
# is present, else pythonX.Y on PATH. Fails, naming every version missing,
# rather than test fewer Pythons than asked.
set -euo pipefail

missing=()
for version in "$@"; do
  python=""
  if command -v pyenv >/dev/null; then
    # The interpreter itself, not pyenv's shim: shims follow .python-version.
    if release=$(pyenv latest "$version" 2>/dev/null); then
      python="$(pyenv root)/versions/$release/bin/python$version"
    fi
  fi
  if [ -z "$python" ] || [ ! -x "$python" ]; then
    python=$(command -v "python$version" || true)
  fi
  # The wheels are for regular (GIL) CPython of exactly that version.
  if [ -z "$python" ] || ! "$python" -c "
import sys, sysconfig
assert '%d.%d' % sys.version_info[:2] == '$version'
assert sys.implementation.name == 'cpython' and not sysconfig.get_config_var('Py_GIL_DISABLED')
" 2>/dev/null; then
    missing+=("$version")
    continue
  fi
  echo "$python"
done

if [ ${#missing[@]} -gt 0 ]; then
  {
    echo "error: no CPython ${missing[*]} found (looked in pyenv, then for python3.X on PATH)."
    echo "Install it (e.g. 'pyenv install ${missing[0]}'), or test fewer versions:"
    echo "  make test PYTHONS='3.11'"
  } >&2
  exit 1
fi
