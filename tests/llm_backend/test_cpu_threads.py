"""Thread count and OpenMP wait policy (see cpu_threads.py for why a short spin with the
thread governor, and PASSIVE for a count the user fixed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import covey
from covey.llm_backend.cpu_threads import (
    apply_num_threads,
    available_cpus,
    configure_openmp_env,
    default_num_threads,
)


def test_wait_policy_is_set_unless_the_user_chose():
    env: dict[str, str] = {}
    configure_openmp_env(env)
    assert env == {"GOMP_SPINCOUNT": "20000"}  # the governor adapts the thread count
    env = {"OMP_NUM_THREADS": "2"}
    configure_openmp_env(env)
    assert env == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}  # a fixed count
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "5000"}):
        env = dict(mine)
        configure_openmp_env(env)
        assert env == mine  # never overridden


def test_thread_count_follows_affinity_unless_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_num_threads() == available_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_num_threads() == 1
    before = torch.get_num_threads()
    try:
        assert apply_num_threads(None) == 1 and torch.get_num_threads() == 1
        assert apply_num_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_covey_command_sets_the_policy_before_torch_loads():
    code = (
        "import os, sys\n"
        "from covey.cli import main\n"
        "try:\n"
        "    main.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(os.environ.get('GOMP_SPINCOUNT'))\n"
    )
    drop = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(Path(covey.__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "20000"
