"""Host scope: the operators' commands when the segment directory is unusable."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CLI = [sys.executable, "-m", "fastapi_concurrency_limiter"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCL_")}
    env.update(extra)
    return env


def test_status_with_an_unusable_directory_says_why_without_a_traceback() -> None:
    # A segment directory that other users can write (or one another user
    # created first, or a symbolic link): `reset` says why in one line, but
    # `status` dies with a Python traceback (the RuntimeError of
    # list_host_resources() is not caught).
    with tempfile.TemporaryDirectory(prefix="fcl-status-", dir="/dev/shm") as d:
        os.chmod(d, 0o777)
        out = subprocess.run(CLI + ["status"], capture_output=True, text=True, timeout=60,
                             env=_env(FCL_HOST_DIR=d))
        said = out.stdout + out.stderr
        assert out.returncode != 0
        assert "writable by other users" in said, said
        assert "Traceback" not in said, said
        out = subprocess.run(CLI + ["status", "--json"], capture_output=True, text=True,
                             timeout=60, env=_env(FCL_HOST_DIR=d))
        assert "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
