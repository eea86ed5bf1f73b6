"""Tools for the process-pool tests: a module of their own that imports nothing heavy, so a
spawned worker starts in well under a second."""

from __future__ import annotations

import os
import time


def worker_pid() -> int:
    return os.getpid()


def sleep_for(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def crash(code: int) -> str:
    os._exit(code)

