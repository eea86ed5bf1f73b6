"""A Ray replica computes on the thread count it was given (`--replica-threads`), not on
what its environment says: built here in-process, no Ray needed."""

from __future__ import annotations

import asyncio

import pytest
import torch

from covey.server.ray_deployment import EngineReplica


# Serve's shutdown hook is an async __del__: the interpreter's own call at collection
# returns a coroutine nobody awaits. The test awaits it itself, as Serve does.
@pytest.mark.filterwarnings("ignore:coroutine 'EngineReplica.__del__' was never awaited")
def test_a_replica_keeps_its_thread_count_over_omp_num_threads(monkeypatch):
    # Ray exports OMP_NUM_THREADS=1 to an actor with a fractional num_cpus; an engine that
    # is not told its count reads that and runs one thread whatever the replica asked for.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    replica = None
    try:
        replica = EngineReplica("dummy:tiny", {"dtype": "float32"}, threads=2)  # random weights
        engine = replica.llm.engine
        # torch's thread count is per thread: ask the one that builds and steps the engine
        on_engine_thread = asyncio.run(replica.llm._call(torch.get_num_threads))
        assert engine.num_threads == 2 == on_engine_thread
        assert engine.thread_governor is None  # a count the user chose is kept as it is
    finally:
        if replica is not None:  # a failed assert must not leave its engine thread running
            asyncio.run(replica.__del__())
        torch.set_num_threads(before)
