"""The tool pool: its own bounded threads, per-tool timeouts, process workers, return checks.

A hung sync tool must never starve `@function` nodes or other tools (the reliability probe
of issue 12), nor keep the interpreter from exiting.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import covey.graph as cg
from covey.errors import NodeExecutionError
from covey.graph.tools import ToolReturnError
from covey.runtime import Runtime
from covey.runtime.tool_pool import (
    ToolFailedError,
    ToolPool,
    ToolPoolExhaustedError,
    ToolTimeoutError,
)
from tests.runtime import decorated_tools, process_tools

RELEASE = threading.Event()


@cg.tool(timeout=0.2)
def hang(x: int) -> int:
    RELEASE.wait(60)
    return x


@cg.tool
def quick(x: int) -> int:
    return x + 1


@cg.tool
def boom(x: int) -> int:
    raise ValueError(f"bad x {x}")


@cg.tool
def returns_none(x: int) -> str:
    return None  # type: ignore[return-value]


@cg.tool(timeout=0.2)
async def slow_async(x: int) -> int:
    await asyncio.sleep(30)
    return x


pid_tool = cg.tool(executor="process")(process_tools.worker_pid)
sleep_tool = cg.tool(executor="process", timeout=0.5)(process_tools.sleep_for)
crash_tool = cg.tool(executor="process")(process_tools.crash)


async def test_hung_tools_time_out_and_never_starve_the_pool():
    RELEASE.clear()
    pool = ToolPool(threads=2, max_hung=16)
    try:
        for i in range(8):  # one after the other: each starts on a thread, and hangs
            with pytest.raises(ToolTimeoutError, match="tool 'hang' timed out after 0.2s"):
                await pool.call(hang.op.spec, {"x": i})
        assert pool.hung_threads == 8  # written off; fresh threads took their places
        assert await pool.call(quick.op.spec, {"x": 1}) == 2
        RELEASE.set()  # the hung calls return now; their threads leave
        for _ in range(100):
            if pool.hung_threads == 0:
                break
            await asyncio.sleep(0.02)
        assert pool.hung_threads == 0
    finally:
        RELEASE.set()
        pool.close()


async def test_too_many_hung_calls_fail_fast():
    RELEASE.clear()
    pool = ToolPool(threads=1, max_hung=2)
    try:
        for _ in range(2):
            with pytest.raises(ToolTimeoutError):
                await pool.call(hang.op.spec, {"x": 0})
        with pytest.raises(ToolPoolExhaustedError, match="2 tool calls are hung"):
            await pool.call(quick.op.spec, {"x": 0})
    finally:
        RELEASE.set()
        pool.close()


async def test_failures_name_the_tool():
    pool = ToolPool()
    try:
        with pytest.raises(ToolFailedError, match="tool 'boom' failed: ValueError: bad x 3"):
            await pool.call(boom.op.spec, {"x": 3})
        with pytest.raises(ToolReturnError, match=r"tool 'returns_none' returned None"):
            await pool.call(returns_none.op.spec, {"x": 3})
        with pytest.raises(ToolTimeoutError, match="tool 'slow_async' timed out"):
            await pool.call(slow_async.op.spec, {"x": 3})
    finally:
        pool.close()


async def test_process_tools_run_in_a_worker_that_is_killed_when_it_hangs():
    pool = ToolPool(processes=1, default_timeout_s=60)
    try:
        pid = await pool.call(pid_tool.op.spec, {})
        assert pid != os.getpid()
        assert await pool.call(pid_tool.op.spec, {}) == pid  # the worker is reused
        with pytest.raises(ToolTimeoutError, match="tool 'sleep_for' timed out after 0.5s"):
            await pool.call(sleep_tool.op.spec, {"seconds": 30})
        alive = [p for p in multiprocessing.active_children() if p.pid == pid]
        assert not alive  # killed, not left running
        assert await pool.call(sleep_tool.op.spec, {"seconds": 0}) == "slept"
        with pytest.raises(ToolFailedError, match="tool 'crash' failed: its worker process died"):
            await pool.call(crash_tool.op.spec, {"code": 3})
        assert await pool.call(pid_tool.op.spec, {}) not in (pid, os.getpid())
        square, worker = await pool.call(decorated_tools.pid_squared.op.spec, {"x": 7})
        assert square == 49 and worker != os.getpid()
    finally:
        pool.close()


def test_a_hung_tool_never_blocks_interpreter_exit(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, time
            import covey.graph as cg
            from covey.runtime.tool_pool import ToolPool, ToolTimeoutError

            @cg.tool(timeout=0.1)
            def stuck(x: int) -> int:
                time.sleep(3600)
                return x

            async def main():
                try:
                    await ToolPool().call(stuck.op.spec, {"x": 1})
                except ToolTimeoutError as e:
                    print("timed out:", e, flush=True)

            asyncio.run(main())
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "timed out: tool 'stuck' timed out after 0.1s" in done.stdout


async def test_tool_nodes_use_the_pool_and_function_nodes_keep_running(real_llm):
    """Six hung tool nodes (asyncio's default pool has about that many threads here) and
    a plain @function still runs; a tool's bad return fails its node by name."""
    RELEASE.clear()

    @cg.function
    def double(x: int) -> int:
        return 2 * x

    @cg.app
    def hung_app(x: int):
        return {f"h{i}": hang(x) for i in range(6)}

    @cg.app
    def plain(x: int):
        return double(x)

    @cg.app
    def bad(x: int):
        return returns_none(x)

    runtime = Runtime(real_llm, tools=ToolPool(threads=2))
    try:
        with pytest.raises(NodeExecutionError, match="tool 'hang' timed out"):
            await runtime.run(hung_app, x=1)
        started = time.perf_counter()
        assert await runtime.run(plain, x=4) == {"result": 8}
        assert time.perf_counter() - started < 30
        with pytest.raises(NodeExecutionError, match="tool 'returns_none' returned None"):
            await runtime.run(bad, x=1)
    finally:
        RELEASE.set()
        runtime.tools.close()
