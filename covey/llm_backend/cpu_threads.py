"""CPU threads and OpenMP's wait policy: degrade in proportion to load, never collapse.

torch's CPU kernels run on a GNU OpenMP team. Between two parallel regions an idle thread
spins (busy-waits) for a long while, by default about 300k iterations, before it sleeps.
On an idle machine that saves a wake-up per region. On a machine where another process
wants the same cores it is a disaster: a region ends only when its last thread finishes,
that thread may be waiting for a time slice while its team-mates burn theirs spinning, and
a decode step has hundreds of regions. A step then costs time slices instead of
microseconds (the issue measured one app node go from 3 s to 80-100 s).

The choice here, measured (benchmarks/engine.py `contention`, and a 2-core machine shared
with ~8 other busy processes):
- OMP_WAIT_POLICY=PASSIVE: a thread that waits sleeps at once, so it never burns the time
  slice its late team-mate (or the Python thread dispatching the next op) needs. On that
  machine a decode step took 30-380 ms passive against 780-1170 ms with a 10k-iteration
  spin (GOMP_SPINCOUNT=10000) and 520-820 ms on one thread, runs interleaved;
- one thread per CPU this process may run on (its affinity mask, not the machine's count).

OpenMP reads its settings once, when torch loads it, so `configure_openmp_env` must run
before `import torch`: the `covey` command does it first thing. A library user who imports
torch earlier can set the same variables themselves; `openmp_env_applied` says whether it
was in time. Settings the user already made are never overridden.
"""

from __future__ import annotations

import os
import sys

OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_openmp_env(environ: dict[str, str] | None = None) -> bool:
    """Set covey's OpenMP defaults in `environ` (os.environ) where the user set nothing.

    Returns False when torch is already imported in this process: then the settings come
    too late for it (they still reach child processes)."""
    env = os.environ if environ is None else environ
    user_chose = "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env
    if not user_chose:
        env.update(OPENMP_DEFAULTS)
    return "torch" not in sys.modules


def openmp_env_applied() -> bool:
    """True when this process's OpenMP wait was chosen (covey's default or the user's own
    OMP_WAIT_POLICY / GOMP_SPINCOUNT)."""
    return "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_num_threads() -> int:
    """torch threads when the config names none: OMP_NUM_THREADS if the user set it, else
    one per available CPU."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return available_cpus()


def user_chose_threads(num_threads: int | None) -> bool:
    """True when the thread count is the user's (the config's `num_threads` or a valid
    OMP_NUM_THREADS): then the thread governor leaves it alone."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return num_threads is not None or (value.isdigit() and int(value) > 0)


def apply_num_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads for this process; returns the count in use."""
    import torch

    n = num_threads or default_num_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
