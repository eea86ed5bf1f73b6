"""Compiled decode steps of several models in one process: each engine runs its own model.

`CompiledDecode` drops dynamo's guards on the model's modules, parameters and buffers (the
~4000 checks a step of the 30-layer model paid), which is safe only because each instance
compiles its own copy of the step function, so that no graph traced for one model is ever
tried for another. These tests hold that: engines over models of different shapes and of
the same shape with other weights, interleaved, and a model given new weights in place.
Small random models (two or three layers): what is checked is which graph and which
weights run, not the quality of the model.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import weakref

import pytest
import torch

from covey.errors import ConfigError, EngineError, NotSupportedError
from covey.llm_backend import compiled_decode
from covey.llm_backend.compiled_decode import CompiledDecode, compile_by_default
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.llm_engine import LLMEngine
from covey.llm_backend.model import LlamaModel
from covey.llm_backend.model_args import preset
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.scheduler import ScheduledSeq

PROMPT = "The three primary colors are red, yellow and"


def tiny(seed: int, **shape) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel(preset("tiny", **shape)).to(torch.bfloat16).eval()


def compiled_engine(model: LlamaModel) -> LLMEngine:
    config = EngineConfig(
        device="cpu", dtype="bfloat16", compile=True, kv_cache_tokens=256, num_threads=1
    )
    return LLMEngine(config, model=model)


def step_both_ways(engine: LLMEngine, rid: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The next decode step of request `rid`, compiled and by the plain model, on the same
    pool and metadata (the step writes the same keys to the same slots either way)."""
    with torch.inference_mode():  # as the runner makes them: else dynamo's guards fail and
        # eager_on_recompile runs the step eagerly, and fused == plain proves nothing
        inputs = engine.runner.prepare([ScheduledSeq(engine.requests[rid], 1)])
    assert engine.runner._compiled_step(inputs)
    args = (inputs.input_ids, inputs.positions, engine.pool.kv, inputs.meta)
    with torch.inference_mode():
        fused = engine.runner.compiled.forward(*args)
        plain = engine.model(*args)
    return fused.float(), plain.float()


def assert_same_step(fused: torch.Tensor, plain: torch.Tensor) -> None:
    # The fused loops round to bfloat16 less often than the eager ops do.
    torch.testing.assert_close(fused, plain, rtol=0.05, atol=0.05)


@pytest.mark.slow  # compiles two small models' graphs (seconds each; then cached)
def test_engines_over_different_models_each_run_their_own_graph(covey_home):
    first = tiny(1)
    other_shape = tiny(2, hidden_size=96, num_heads=6, num_kv_heads=3, num_layers=3)
    same_shape = tiny(3)  # the first one's shapes, other weights: the guards cannot tell
    engines = [compiled_engine(m) for m in (first, other_shape, same_shape)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    rids = [e.add_request(PROMPT, params) for e in engines]
    for e in engines:
        e.step()  # the prompt (eager); the next steps are pure decodes
    results = []
    for _ in range(2):  # interleaved: each engine's step after the others'
        results = []
        for e, rid in zip(engines, rids, strict=True):
            fused, plain = step_both_ways(e, rid)
            assert_same_step(fused, plain)
            results.append(fused)
            e.step()
    # Same shapes, other weights: a graph shared across models would give equal results.
    assert not torch.allclose(results[0], results[2], atol=0.05)
    for e, model in zip(engines, (first, other_shape, same_shape), strict=True):
        assert e.runner.compiled.compiled_steps >= 2 and e.runner.compiled.eager_steps == 0
        # The steps above called batch 1's graph directly, and that graph holds this
        # engine's own weights: what dropping the model's guards depends on.
        assert 1 in e.runner.compiled._direct
        assert any(a is model.norm.weight for a in e.runner.compiled._direct[1].args)

    # A model given new weights in place (a reload into the same modules): the graph reads
    # its parameters as inputs, so the next step uses the new weights.
    with torch.no_grad():
        first.load_state_dict(same_shape.state_dict())
    fused, plain = step_both_ways(engines[0], rids[0])
    assert_same_step(fused, plain)

    # The direct call skips dynamo's guards on grad mode and input dtypes: misuse is an error.
    direct = engines[0].runner.compiled._direct[1]
    ids, pos = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with torch.enable_grad(), pytest.raises(EngineError, match="inference mode"):
        direct(ids, pos)
    with torch.inference_mode(), pytest.raises(EngineError, match="int64 token ids"):
        direct(ids.int(), pos)

    # A weight replaced by a new tensor (not written in place): the graphs hold the old one,
    # so the plain model runs the steps from then on.
    qkv = first.layers[0].self_attn.qkv_proj
    qkv.weight = torch.nn.Parameter(torch.randn_like(qkv.weight))
    fused, plain = step_both_ways(engines[0], rids[0])
    assert torch.equal(fused, plain) and engines[0].runner.compiled.eager_steps == 1


@pytest.mark.slow  # compiles a small model's graphs (seconds; then cached)
def test_a_dropped_compiled_engine_frees_its_model_and_pool(covey_home):
    """Dynamo keeps every backend it was given for the life of the process: a backend that
    held the engine's `CompiledDecode` kept each dropped engine's weights, KV pool and
    graphs alive."""
    engine = compiled_engine(tiny(4))
    engine.run_to_completion([engine.add_request(PROMPT, SamplingParams(max_tokens=3))])
    assert engine.runner.compiled._direct  # a graph was compiled and called
    alive = [weakref.ref(t) for t in (engine.model, engine.model.norm.weight, engine.pool.kv)]
    del engine
    gc.collect()
    assert [r() is None for r in alive] == [True, True, True]


def test_compile_on_a_torch_without_guard_filters_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(compiled_decode, "torch_supports_compile", lambda: False)
    with pytest.raises(NotSupportedError, match="compile=True needs torch >= 2.8"):
        CompiledDecode(tiny(5))


@pytest.mark.slow  # compiles a small model's graphs (seconds; cached by the tests above)
def test_a_graph_that_cannot_be_called_directly_runs_through_dynamo(
    covey_home, monkeypatch, caplog
):
    """The direct call reads dynamo internals: when they are not what it expects, the engine
    still starts and dynamo calls the graph."""

    def drifted(*_):
        raise KeyError("grapharg")

    monkeypatch.setattr(compiled_decode._DirectGraph, "_of", drifted)
    with caplog.at_level(logging.WARNING, logger=compiled_decode.__name__):
        engine = compiled_engine(tiny(6))
    assert "calling the graph directly failed" in caplog.text
    rid = engine.add_request(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    fused, plain = step_both_ways(engine, rid)
    assert_same_step(fused, plain)
    compiled = engine.runner.compiled
    assert not compiled._direct and compiled.eager_steps == 0
    assert compiled._ran is not None  # dynamo called the compiled graph (not eager_on_recompile)


def test_the_default_compiles_on_cpu_only_and_can_be_turned_off(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("COVEY_COMPILE")
    assert compile_by_default(cpu) and not compile_by_default(cuda)
    monkeypatch.setenv("COVEY_COMPILE", "1")
    assert compile_by_default(cpu)
    monkeypatch.setenv("COVEY_COMPILE", "0")
    assert not compile_by_default(cpu)
    monkeypatch.delenv("COVEY_COMPILE")
    monkeypatch.setattr(compiled_decode, "torch_supports_compile", lambda: False)
    assert not compile_by_default(cpu)  # an old torch: eager, no error (True raises, above)


@pytest.mark.parametrize("value", ["0", "false", "False", " OFF ", "no"])
def test_the_usual_false_words_turn_the_default_off(monkeypatch, value):
    monkeypatch.setenv("COVEY_COMPILE", value)
    assert not compile_by_default(torch.device("cpu"))


@pytest.mark.parametrize("value", ["true", "Yes", "on", ""])
def test_the_usual_true_words_keep_the_default(monkeypatch, value):
    monkeypatch.setenv("COVEY_COMPILE", value)
    assert compile_by_default(torch.device("cpu")) == compiled_decode.torch_supports_compile()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_covey_compile_it_cannot_read_is_an_error(monkeypatch, device):
    monkeypatch.setenv("COVEY_COMPILE", "banana")
    with pytest.raises(
        ConfigError, match="COVEY_COMPILE must be one of 0, false, no, off .*'banana'"
    ):
        compile_by_default(torch.device(device))


def test_a_bad_covey_compile_fails_before_the_model_loads(monkeypatch, tmp_path):
    """The engine reads COVEY_COMPILE first: a typo costs no model load (a missing model
    would be the error otherwise)."""
    monkeypatch.setenv("COVEY_COMPILE", "banana")
    with pytest.raises(ConfigError, match="COVEY_COMPILE must be one of"):
        LLMEngine(EngineConfig(model=str(tmp_path / "no-such-model.gguf")))


@pytest.mark.parametrize("value", ["yes", 1, "auto"])
def test_compile_is_none_true_or_false(value):
    assert EngineConfig().compile is None
    with pytest.raises(ConfigError, match="compile must be None .*, True or False"):
        EngineConfig(compile=value)


@pytest.mark.skipif(
    os.environ.get("COVEY_COMPILE") != "0", reason="this run asked for the compiled default"
)
def test_under_the_suites_covey_compile_0_the_default_engine_is_eager():
    """tests/conftest.py sets COVEY_COMPILE=0, so the suite's engines start without tracing."""
    config = EngineConfig(device="cpu", dtype="bfloat16", kv_cache_tokens=256)
    engine = LLMEngine(config, model=tiny(7))
    assert engine.runner.compiled is None
    assert engine.run_to_completion([engine.add_request(PROMPT, SamplingParams(max_tokens=2))])


def test_an_empty_torchinductor_cache_dir_is_unset_not_the_working_directory(tmp_path):
    """torch's first import of its cache module turns TORCHINDUCTOR_CACHE_DIR="" into the
    working directory; covey reads the variable first, so the cache goes under its home."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    code = (
        "import os\n"
        "from covey.llm_backend.llm_engine import LLMEngine\n"
        "from covey.llm_backend.compiled_decode import inductor_cache_dir\n"
        "os.environ['TORCHINDUCTOR_CACHE_DIR'] = inductor_cache_dir()  # as CompiledDecode does\n"
        "from torch._inductor.runtime.cache_dir_utils import cache_dir\n"
        "print(cache_dir())\n"
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": "", "COVEY_HOME": str(home)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(home / "inductor")
    assert not any(work.iterdir())  # nothing written into the working directory
