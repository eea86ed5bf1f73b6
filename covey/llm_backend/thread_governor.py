"""Fit torch's thread count to the cores other processes leave free, between engine steps.

Why: one decode step runs hundreds of short OpenMP regions, and a region ends only when its
last thread finishes. On an idle machine one thread per core with a spinning wait is the
fastest setting (about 12 ms per step of the embedded model on 2 cores, against 17 ms on
one thread). When another process wants those cores, a team as large as the machine waits
on its slowest member, who is waiting for a time slice its team-mates burn spinning: the
step collapses to hundreds of milliseconds or seconds. No fixed choice is right for both,
so the engine asks this governor between steps and it moves the count between 1 and the
CPUs this process may use.

What it measures: every `interval_s` (a few hundred ms; reading /proc/stat costs tens of
microseconds) the CPU time all processes spent on our CPUs (/proc/stat, non-idle jiffies,
steal included) minus this process's own CPU time (`os.times`), over the wall time between:
the cores other processes use. Not the step's wall time: in a batching engine a step's
length follows its batch and context, so a slow step says little about the machine, and
a spinning team's own CPU use would hide the contention it suffers.

What it decides (`ThreadPolicy`, a pure function of those samples, tested on scripted
ones): the threads that fit in the free cores, rounded at half a core. Fewer at once (one
collapsed step costs more than many slightly slow ones); more only after `up_after`
samples in a row with the cores clearly free (less than a quarter core used by others
beyond what the larger team needs), so a competitor that comes and goes does not make it
flap. It runs only when the user chose no thread count (EngineConfig.num_threads None and
no OMP_NUM_THREADS): a user's choice is respected.

torch's thread count is per process (and per calling thread for OpenMP): the engine calls
`between_steps` from the thread that runs its steps, and all engines of a process share
one governor (`process_governor`).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from covey.llm_backend.cpu_threads import affinity_cpus, available_cpus

# /proc/stat's per-CPU columns: user nice system idle iowait irq softirq steal guest
# guest_nice. Busy is everything but idle and iowait; guest time is already in user.
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuSample:
    """One reading: wall clock, CPU seconds spent on our CPUs by everyone, and by us."""

    wall_s: float
    busy_s: float
    own_s: float


def read_cpu_sample(cpus: frozenset[int], stat_path: str = "/proc/stat") -> CpuSample | None:
    """A sample now, over the CPUs in `cpus`; None where /proc/stat cannot be read (not
    Linux): then the governor leaves the thread count alone."""
    try:
        with open(stat_path, encoding="ascii") as f:
            lines = f.readlines()
    except OSError:
        return None
    ticks = 0
    seen = 0
    for line in lines:
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *cols = line.split()
        if int(name[3:]) not in cpus:
            continue
        seen += 1
        ticks += sum(int(cols[i]) for i in _BUSY_COLUMNS if i < len(cols))
    if not seen:
        return None
    t = os.times()
    return CpuSample(time.monotonic(), ticks / _CLOCK_TICKS, t.user + t.system)


def others_cores(before: CpuSample, after: CpuSample) -> float:
    """Cores other processes kept busy between two samples (never below 0: jiffies and
    os.times tick at different moments)."""
    wall = after.wall_s - before.wall_s
    if wall <= 0:
        return 0.0
    others = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    return max(0.0, others / wall)


@dataclass
class ThreadPolicy:
    """Cores used by others, sample after sample, -> the thread count to run with."""

    max_threads: int
    threads: int = 0  # the count in use; 0 starts at max_threads
    down_margin: float = 0.5  # a thread keeps its place while half a core is free for it
    up_margin: float = 0.25  # one is added back when three quarters are, `up_after` times
    up_after: int = 3
    _clear: int = 0  # samples in a row that had room for more threads

    def __post_init__(self) -> None:
        self.max_threads = max(1, self.max_threads)
        self.threads = min(self.max_threads, self.threads or self.max_threads)

    def fit(self, others: float, margin: float) -> int:
        """Threads that fit in the cores `others` leave free, at least one."""
        free = self.max_threads - others
        return max(1, min(self.max_threads, math.floor(free + margin)))

    def decide(self, others: float) -> int:
        """Take one measurement (cores used by others); return the thread count now."""
        fewer = self.fit(others, self.down_margin)
        if fewer < self.threads:
            self.threads, self._clear = fewer, 0
            return self.threads
        more = self.fit(others, self.up_margin)
        if more > self.threads:
            self._clear += 1
            if self._clear >= self.up_after:
                self.threads, self._clear = more, 0
        else:
            self._clear = 0
        return self.threads


@dataclass
class ThreadGovernor:
    """Samples the machine at most every `interval_s` and sets torch's thread count.

    A sample older than `stale_s` (the engine sat idle) is only a new baseline: an average
    over an idle minute would hide a competitor that started a moment ago. The first
    measurement after a baseline comes sooner (`first_interval_s`), so a request that
    starts on a newly busy machine suffers collapsed steps for a tenth of a second, not a
    quarter (with 10 ms jiffies it is coarser: at most a false "fewer", which costs less)."""

    policy: ThreadPolicy
    sample: Callable[[], CpuSample | None]  # read_cpu_sample over our CPUs
    interval_s: float = 0.25
    first_interval_s: float = 0.1
    stale_s: float = 2.0
    decisions: Counter = field(default_factory=Counter)  # "fewer" / "more" -> count
    last_others: float = 0.0
    _last: CpuSample | None = None
    _next_s: float = 0.0

    @property
    def threads(self) -> int:
        return self.policy.threads

    def between_steps(self) -> int:
        """Called before each engine step; returns the thread count in use. Costs one
        clock read unless a sample is due."""
        now = time.monotonic()
        if now < self._next_s:
            return self.policy.threads
        self._next_s = now + self.interval_s
        sample = self.sample()
        if sample is None:
            self._next_s = math.inf  # nothing to measure here: keep the count as it is
            return self.policy.threads
        before, self._last = self._last, sample
        if before is None or sample.wall_s - before.wall_s > self.stale_s:
            self._next_s = now + min(self.interval_s, self.first_interval_s)
            return self.policy.threads
        self.last_others = others_cores(before, sample)
        return self.apply(self.policy.decide(self.last_others))

    def apply(self, threads: int) -> int:
        """Set torch's threads to `threads` if they differ, counting the change."""
        import torch

        current = torch.get_num_threads()
        if threads != current:
            self.decisions["fewer" if threads < current else "more"] += 1
            torch.set_num_threads(threads)
        return threads


_lock = threading.Lock()
_governor: ThreadGovernor | None = None


def process_governor() -> ThreadGovernor:
    """The one governor of this process (torch's thread count is the process's)."""
    global _governor
    with _lock:
        if _governor is None:
            cpus = affinity_cpus()
            _governor = ThreadGovernor(
                ThreadPolicy(available_cpus()), lambda: read_cpu_sample(cpus)
            )
        return _governor
