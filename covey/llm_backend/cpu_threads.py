"""CPU threads and OpenMP's wait policy: fast when the machine is idle, no collapse when not.

torch's CPU kernels run on a GNU OpenMP team. Between two parallel regions an idle thread
spins (busy-waits) for a while, by default about 300k iterations, before it sleeps. On an
idle machine that saves a wake-up per region. On a machine where another process wants
the same cores it is a disaster: a region ends only when its last thread finishes, that
thread may be waiting for a time slice while its team-mates burn theirs spinning, and a
decode step has hundreds of regions. A step then costs time slices instead of
microseconds (the issue measured one app node go from 3 s to 80-100 s).

No fixed setting is right for both. Measured by the lead on a quiet 2-core machine (int4
weights, 512-token prompt, TPOT ms, 3 runs each):
- idle: 2 threads spinning 12.8/11.7/12.1 (GOMP_SPINCOUNT=20000 14.2/12.8/11.8, 1000
  16.3/13.9/13.8), PASSIVE 25.6/25.9/29.4 (every region pays a wake-up), 1 thread
  17.5/17.0/17.3;
- one competing process (a matmul loop, 2 spinning OpenMP threads): 1 thread 20.5/19.7/21.1,
  PASSIVE 30/31/22, GOMP_SPINCOUNT=2000 38/42/37, 20000 298/299/294, OpenMP's default 2183.
On a crowded machine (measured 2026-11-29 on the same 2 cores while other jobs ran, load
4-22, runs interleaved, 256-token prompt, TPOT ms of 3-run groups) the spread is wide and
no setting wins every time: 1 thread 54-113 (one group 219-693), 2 passive threads 18-175,
3 threads (GNU OpenMP's short "throttled" waits, used when it manages more threads than
CPUs) 21-88 in one session and 94-281 in two later ones, the governor 58-157 (it chose 1).
In the last two sessions one thread was fastest, so no special mode for a crowd.
So the thread count is what adapts: the thread governor (thread_governor.py) runs one
thread per CPU while other processes leave the cores free and fewer, down to one, while
they do not; one thread has no team to wait for. With the governor on, the wait policy
only matters while the cores are free and for the step or two before the governor sees a
new competitor: a 20k-iteration spin (about 0.2 ms) is as fast as OpenMP's default when
idle and bounds such a step to about 0.3 s instead of 2 s.

When the user fixes the count (OMP_NUM_THREADS, or EngineConfig.num_threads) there is no
governor to step in, and the passive wait stays the safe default: on a 2-core machine
shared with ~8 busy processes a step took 30-380 ms passive against 780-1170 ms with a
10k-iteration spin. With OMP_NUM_THREADS in the environment `configure_openmp_env` picks
PASSIVE; a count given only in EngineConfig (after torch loaded) gets the short spin.

OpenMP reads its settings once, when torch loads it, so `configure_openmp_env` must run
before `import torch`: the `covey` command does it first thing. A library user who imports
torch earlier gets OpenMP's default spin with the governor; `openmp_env_applied` says
whether the settings came in time. Settings the user already made are never overridden.
"""

from __future__ import annotations

import os
import sys

# With the thread governor: a short spin. With a thread count the user fixed: passive.
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "20000"}
OPENMP_FIXED_THREADS = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_openmp_env(environ: dict[str, str] | None = None) -> bool:
    """Set covey's OpenMP defaults in `environ` (os.environ) where the user set nothing.

    Returns False when torch is already imported in this process: then the settings come
    too late for it (they still reach child processes)."""
    env = os.environ if environ is None else environ
    user_chose = "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env
    if not user_chose:
        fixed = env.get("OMP_NUM_THREADS", "")
        fixed_count = fixed.isdigit() and int(fixed) > 0
        env.update(OPENMP_FIXED_THREADS if fixed_count else OPENMP_DEFAULTS)
    return "torch" not in sys.modules


def openmp_env_applied() -> bool:
    """True when this process's OpenMP wait was chosen (covey's default or the user's own
    OMP_WAIT_POLICY / GOMP_SPINCOUNT)."""
    return "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ


def affinity_cpus() -> frozenset[int]:
    """The CPUs this process may run on (its affinity mask, e.g. a container's cpuset); all
    the machine's where the OS has no mask to read."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


def available_cpus() -> int:
    """How many CPUs this process may run on (`affinity_cpus`), at least one."""
    return max(1, len(affinity_cpus()))


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
