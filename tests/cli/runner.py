"""Run the real `covey` entry point in a child process, as a user's shell would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import covey

# The child imports the same covey as the tests (a worktree, not another installed copy).
SOURCE_ROOT = str(Path(covey.__file__).resolve().parents[1])


def covey_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def covey(
    *args: str, stdin: str | None = None, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """`covey ARGS...`; `env` adds environment variables (e.g. CUDA_VISIBLE_DEVICES="")."""
    return subprocess.run(
        [sys.executable, "-m", "covey.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=covey_env(**env),
    )
