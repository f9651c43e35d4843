"""A virtualenv with the original ``fastapi-concurrency-limiter`` from the package index.

The original package and this one share the import name, so the original runs
from its own virtualenv, created on first use under ``.cache/spike/`` and
reused while its inputs are unchanged. The server stack in it (FastAPI,
Starlette, uvicorn, anyio, pydantic, ...) is pinned to the versions installed
for this interpreter, and the interpreter is the same one: the only
difference between the ``original`` and ``fcl`` variants is the package.

The original declares ``requires-python >= 3.12`` but needs only what 3.11
has (``asyncio.timeout``); it is installed with ``--ignore-requires-python``
so that both packages run on the same interpreter.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import data

REQUIREMENT = "fastapi-concurrency-limiter==0.1.2"
VERSION = REQUIREMENT.split("==")[1]

PINNED = (
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic-core",
    "anyio",
    "sniffio",
    "uvicorn",
    "h11",
    "httptools",
    "uvloop",
    "websockets",
    "click",
    "idna",
    "typing-extensions",
    "typing-inspection",
    "annotated-types",
    "annotated-doc",
)
"""The server's stack; those installed here are pinned to the same version there.

uvicorn picks ``uvloop`` and ``httptools`` when they are importable, so their
presence must match too: a package missing here is not installed there.
"""


class Unavailable(Exception):
    """The original package cannot be installed or run here."""


def _pins() -> list[str]:
    pins = []
    for name in PINNED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pins.append(f"{name}=={importlib.metadata.version(name)}")
    return pins


def venv_dir() -> Path:
    return data.CACHE_DIR / f"original-{VERSION}-py{sys.version_info[0]}{sys.version_info[1]}"


def ensure_python(progress: Callable[[str], None] = print) -> Path:
    """The interpreter of the original package's virtualenv, created if needed."""
    if sys.version_info < (3, 11):
        raise Unavailable(
            f"{REQUIREMENT} needs Python 3.11+ (asyncio.timeout); this is {sys.version.split()[0]}"
        )
    directory = venv_dir()
    python = directory / "bin" / "python"
    requirements = [REQUIREMENT, *_pins()]
    stamp = json.dumps({"python": sys.version, "requirements": requirements}, indent=2)
    stamp_path = directory / "spike-stamp.json"
    data.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # Concurrent runs (several checkouts share no cache, but one checkout may
    # run twice) build it once; the stamp is written last, so a half-built
    # virtualenv is never taken for a finished one.
    with (data.CACHE_DIR / "original.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp_path.exists() and stamp_path.read_text(encoding="utf-8") == stamp:
            return python
        progress(f"creating {directory} with {REQUIREMENT} (once; cached for later runs)")
        shutil.rmtree(directory, ignore_errors=True)
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", str(directory)],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--ignore-requires-python",
                    *requirements,
                ],  # fmt: skip
                check=True,
                capture_output=True,
                timeout=600,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            output = getattr(e, "stderr", b"") or b""
            raise Unavailable(
                f"could not install {REQUIREMENT}: {e}\n{output.decode(errors='replace')[-2000:]}"
            ) from None
        stamp_path.write_text(stamp, encoding="utf-8")
    return python


if __name__ == "__main__":
    print(ensure_python())
