"""Shared plumbing for every benchmark: the command line, the environment record and the
JSON object described in shared/BENCHMARKS.md. Generic on purpose: no benchmark logic."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
INSTALL_HINT = 'run `make bench` or `pip install -e ".[bench]"`'
# Bench extras every benchmark needs for its own output (the plot). A missing peer
# (llama-cpp-python) is not here: shared/BENCHMARKS.md records it as null with a reason.
REQUIRED_EXTRAS = ("matplotlib",)
OPENMP_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def require_extras(name: str) -> None:
    """Stop now, before minutes of measuring, if a required bench extra cannot be
    imported; the message names the install command."""
    missing = []
    for module in REQUIRED_EXTRAS:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        sys.exit(f"benchmarks/{name}.py needs {', '.join(missing)}, not installed: {INSTALL_HINT}")


def parse_args(name: str, description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """`--quick`, `--json PATH`, `--plot PATH` with defaults under benchmarks/results/.

    Then checks the required bench extras: after parsing, so `--help` works without them."""
    parser = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    parser.add_argument(
        "--quick", action="store_true", help="reduced size, < 3 minutes on 2 CPU cores"
    )
    parser.add_argument(
        "--json", type=Path, default=RESULTS_DIR / f"{name}.json", help="results file"
    )
    parser.add_argument("--plot", type=Path, default=RESULTS_DIR / f"{name}.png", help="PNG")
    args = parser.parse_args(argv)
    require_extras(name)
    return args


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(device: str) -> dict[str, Any]:
    """Versions and hardware a reader needs to compare two runs."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": device,
        # Other processes on a small machine move latencies a lot: record how busy it was.
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        # OpenMP's thread and wait settings in the environment (None: unset, OpenMP's
        # default): with other processes on the cores, a spinning team's steps collapse.
        "openmp_env": {k: os.environ.get(k) for k in OPENMP_VARS},
        "torch": None,
        "threads": None,
        "gpu": None,
    }
    try:
        import torch
    except ImportError:
        return info
    info["torch"] = torch.__version__
    info["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_load(sample_s: float = 1.0) -> dict[str, float | None]:
    """How busy the machine is now: the 1-minute load average (which lags a minute and
    counts this process's own recent work) and the cores other processes keep busy over
    `sample_s` seconds (/proc/stat less this process's CPU time, as the thread governor
    measures it; None where /proc/stat cannot be read). Call it while this process idles:
    on a shared 2-core machine this is what moved latencies between two runs."""
    from covey.llm_backend.cpu_threads import affinity_cpus
    from covey.llm_backend.thread_governor import others_cores, read_cpu_sample

    cpus = affinity_cpus()
    before = read_cpu_sample(cpus)
    time.sleep(sample_s)
    after = read_cpu_sample(cpus)
    others = None if before is None or after is None else others_cores(before, after)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "load_average_1m": None if load is None else round(load, 2),
        "others_cores": None if others is None else round(others, 2),
    }


class StepThreads:
    """Counts an engine's steps and their seconds by the torch thread count each ran on.

    Why: the thread governor moves the count between steps, so torch's count at the end of
    a run (the environment record) says little about the run. Wraps `engine.step` (callers
    look it up per call, as AsyncLLM does); the governor sets `engine.num_threads` before
    the step's model call, so the value after the step is the count it ran on."""

    def __init__(self, engine: Any) -> None:
        self.steps: Counter[int] = Counter()
        self.seconds: Counter[int] = Counter()
        step = engine.step

        def counted_step() -> Any:
            start = time.perf_counter()
            try:
                return step()
            finally:
                threads = engine.num_threads
                self.steps[threads] += 1
                self.seconds[threads] += time.perf_counter() - start

        engine.step = counted_step

    def snapshot(self) -> tuple[Counter[int], Counter[int]]:
        return Counter(self.steps), Counter(self.seconds)

    def since(self, snap: tuple[Counter[int], Counter[int]] | None = None) -> dict[str, Any]:
        """Steps and step seconds per thread count (JSON keys are strings) since `snap`
        (a `snapshot()`), or since the wrap."""
        steps, seconds = Counter(self.steps), Counter(self.seconds)
        if snap is not None:
            steps.subtract(snap[0])
            seconds.subtract(snap[1])
        used = sorted(t for t, n in steps.items() if n > 0)
        return {
            "steps": {str(t): steps[t] for t in used},
            "step_seconds": {str(t): round(seconds[t], 3) for t in used},
        }


def record(
    workload: str,
    system: str,
    metric: str,
    value: float | None,
    params: dict[str, Any],
    reason: str | None = None,
) -> dict[str, Any]:
    """One result; a peer that could not run has value None and must say why."""
    if value is None and not reason:
        raise ValueError("reason must say why value is None")
    out: dict[str, Any] = {
        "workload": workload,
        "system": system,
        "metric": metric,
        "value": None if value is None else float(value),
        "params": params,
    }
    if reason:
        out["reason"] = reason
    return out


def write_results(
    args: argparse.Namespace,
    name: str,
    results: list[dict[str, Any]],
    device: str,
    model: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the benchmark's JSON object to `args.json` and return it; benchmarks call this
    before plotting, so a failed plot never loses the measurements. `extra`: more top-level
    fields (a benchmark's own records, e.g. per system); the shared ones cannot be
    replaced."""
    data = {
        "benchmark": name,
        "quick": bool(args.quick),
        "device": device,
        "model": model,
        "environment": environment_info(device),
        "results": results,
    }
    clash = sorted(set(extra or {}) & set(data))
    if clash:
        raise ValueError(f"extra fields {clash} would replace the shared ones")
    data.update(extra or {})
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data
