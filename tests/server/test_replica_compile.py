"""A Ray replica's compiled decode step: the front's COVEY_COMPILE goes to the replicas
(a cluster joined with --address does not inherit the front's environment), and a
replica whose compile fell back to eager says so to the front (Ray does not forward the
replicas' logs). Built here in-process, no Ray needed."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch._inductor.config

from covey.server.ray_deployment import EngineReplica, replica_runtime_env


def test_the_fronts_covey_compile_is_passed_to_the_replicas(monkeypatch):
    monkeypatch.setenv("COVEY_COMPILE", "0")
    assert replica_runtime_env() == {"runtime_env": {"env_vars": {"COVEY_COMPILE": "0"}}}
    monkeypatch.delenv("COVEY_COMPILE")
    assert replica_runtime_env() == {}  # unset: the replica's own environment decides


# Serve's shutdown hook is an async __del__: the interpreter's own call at collection
# returns a coroutine nobody awaits. The test awaits it itself, as Serve does.
@pytest.mark.filterwarnings("ignore:coroutine 'EngineReplica.__del__' was never awaited")
def test_a_replica_whose_compile_fell_back_to_eager_reports_the_warning(
    monkeypatch, tmp_path
):
    # A machine without a C++ compiler, for real: inductor's CPU code generation needs one,
    # and an empty cache has nothing compiled before to load instead.
    monkeypatch.delenv("COVEY_COMPILE")  # the default: compile on CPU
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (str(tmp_path / "no-such-g++"),))
    before = torch.get_num_threads()
    replica = None
    try:
        replica = EngineReplica("dummy:tiny", {"dtype": "float32"}, threads=1)
        assert replica.llm.engine.runner.compiled is None  # it serves, eagerly
        (line,) = asyncio.run(replica.compile_warning_lines())
        assert "compiling the decode step failed, so it runs eagerly" in line
    finally:
        if replica is not None:
            asyncio.run(replica.__del__())
        torch.set_num_threads(before)
