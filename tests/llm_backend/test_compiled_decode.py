"""The compiled decode step (EngineConfig.compile) computes what the eager model does, with
the default configuration's weights (int4, bfloat16).

The model is the embedded SmolLM2's first two layers (its real weights, embeddings and
head): compiling the graph of all 30 takes minutes on a cold cache, two take seconds, and
the graph is the same per layer. benchmarks/engine.py runs the whole model compiled
(`covey`, the default configuration).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from covey.errors import EngineError
from covey.llm_backend.attention_metadata import AttentionMetadata, DecodeGroup, PrefillRun
from covey.llm_backend.compiled_decode import inductor_cache_dir
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.decode_attention_op import StepAttention, decode_attention
from covey.llm_backend.llm_engine import LLMEngine
from covey.llm_backend.model_source import resolve_model
from covey.llm_backend.paged_attention import paged_attention, store_kv
from covey.llm_backend.perplexity import model_logits
from covey.llm_backend.quantization import quantize
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.scheduler import ScheduledSeq
from covey.llm_backend.weight_loader import load_model

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPTS = ["The three primary colors are", "Python is a programming language that " * 8]


LAYERS = 2


@pytest.fixture(scope="module")
def first_layers():
    """The embedded model cut to its first LAYERS layers, int4 like the default."""
    model = load_model(resolve_model(None), torch.bfloat16, torch.device("cpu"))
    model.layers = nn.ModuleList(model.layers[:LAYERS])
    model.args = dataclasses.replace(model.args, num_layers=LAYERS)
    quantize(model, "int4")
    return model


@pytest.mark.slow  # the first compile of the step takes tens of seconds (then it is cached)
def test_compiled_and_eager_decode_agree(first_layers, covey_home):
    # A fixed thread count: the governor would change it under load, and a graph compiled
    # for one count is not used at another (those steps run eagerly).
    config = EngineConfig(
        device="cpu",
        dtype="bfloat16",
        quantization="int4",
        compile=True,
        kv_cache_tokens=4096,
        num_threads=1,
    )
    engine = LLMEngine(config, model=first_layers)
    assert inductor_cache_dir().startswith(covey_home)  # cached under covey's home
    compiled = engine.runner.compiled
    rids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.step()  # prefill both (eager): the next steps are pure decodes
    engine.step()
    # One decode step both ways, on the same pool and metadata, batch 2 and batch 1 (its
    # own graph). The step writes the same K/V to the same slots: running it twice changes
    # nothing.
    seqs = [engine.requests[r] for r in rids]
    prompt_ids = [s.token_ids[: s.num_prompt_tokens] for s in seqs]
    # The warm-up's steps went through dynamo's guards, so these batch sizes call their
    # graphs directly: what is compared below is the graph, not dynamo's eager fallback.
    assert set(compiled._direct) == {1, 2}
    for batch in (seqs, seqs[:1]):
        with torch.inference_mode():  # as the runner makes them
            inputs = engine.runner.prepare([ScheduledSeq(s, 1) for s in batch])
        assert engine.runner._compiled_step(inputs)
        args = (inputs.input_ids, inputs.positions, engine.pool.kv, inputs.meta)
        with torch.inference_mode():
            eager = engine.model.compute_logits(engine.model(*args)).float()
            fused = engine.model.compute_logits(compiled.forward(*args)).float()
        # The fused loops keep float32 between ops where eager rounds each op's result to
        # bfloat16: a few logits move by a few bf16 steps, the distributions barely, and
        # the pick is eager's or within a step of it (a two-layer model has exact ties).
        torch.testing.assert_close(fused.softmax(-1), eager.softmax(-1), rtol=0, atol=0.03)
        picked = eager.gather(1, fused.argmax(-1, keepdim=True)).squeeze(1)
        assert bool((eager.max(-1).values - picked <= 0.25).all())

    # End to end: every greedy token of the compiled run is what the eager model picks on
    # the same path, or a near tie there. (Comparing two free-running greedy runs fails on
    # a near tie, which a two-layer model has often: one bf16 step flips it and the runs
    # part.)
    # At a thread count the graphs were not warmed at (the governor moved it), the plain
    # model runs the step, and says so.
    compiled.threads = torch.get_num_threads() + 1
    with torch.inference_mode():
        plain = engine.model(*args)
    assert torch.equal(compiled.forward(*args), plain) and compiled.eager_steps == 1
    compiled.threads, compiled.eager_steps = torch.get_num_threads(), 0

    before = compiled.compiled_steps
    outs = [o.token_ids for o in engine.run_to_completion(rids)]
    assert compiled.compiled_steps > before and compiled.eager_steps == 0  # the graph ran
    with torch.inference_mode():
        for prompt, generated in zip(prompt_ids, outs, strict=True):
            ids = prompt + list(generated)
            logits = model_logits(engine.model, ids[:-1]).float()
            path = logits[-len(generated) :]  # the logits that chose each generated token
            chosen = path.gather(1, torch.tensor(generated)[:, None]).squeeze(1)
            margin = path.max(dim=-1).values - chosen
            assert bool((margin <= 0.25).all()), (generated, margin.tolist())


def test_decode_attention_outside_a_compiled_step_is_a_clear_error():
    q = torch.zeros(1, 9, 64)
    kv = torch.zeros(3, 1, 64)
    with pytest.raises(EngineError, match="only inside CompiledDecode.forward"):
        decode_attention(q, kv, kv, 0)


def _pool_and_step(seqs: int, stretches: bool = False):
    """A random 2-layer pool and the metadata of one decode step over `seqs` sequences:
    one reads its keys in pool order (slots 32..68), or with `stretches` in two stretches
    (block 5, then 21 keys of block 1..2); two gather blocks and pad one row."""
    torch.manual_seed(7)
    bs, kvh, dh = 16, 3, 64
    pool = torch.randn(2, 2, kvh, 8 * bs, dh).bfloat16()
    if seqs == 1 and stretches:
        group = DecodeGroup(0, 1, None, 37, None, spans=((5 * bs, 6 * bs), (bs, bs + 21)))
        slots = torch.tensor([bs + 20])
    elif seqs == 1:
        group = DecodeGroup(0, 1, None, 37, None, 2 * bs)
        slots = torch.tensor([2 * bs + 36])
    else:
        blocks = torch.tensor([[5, 1, 6], [3, 0, 0]])
        padding = (torch.arange(40)[None, :] >= torch.tensor([40, 20])[:, None])[None, :, None]
        group = DecodeGroup(0, 2, blocks, 40, padding)
        slots = torch.tensor([6 * bs + 7, 3 * bs + 3])
    meta = AttentionMetadata(slots, seqs, bs, [], [group])
    q = torch.randn(seqs, 3 * kvh, dh).bfloat16()
    k, v = torch.randn(2, seqs, kvh, dh).bfloat16()
    return pool, meta, q, k, v


@pytest.mark.parametrize(("seqs", "stretches"), [(1, False), (1, True), (2, False)])
def test_the_steps_attention_is_paged_attentions_bit_for_bit(seqs, stretches):
    """`covey::decode_attention`'s kernel (its single-stream paths at batch 1, keys in pool
    order or in stretches of it, the general one otherwise) stores and attends exactly as
    `store_kv` and `paged_attention` do; the stretches as `paged_attention` gathers the
    same blocks."""
    pool, meta, q, k, v = _pool_and_step(seqs, stretches)
    expected_pool = pool.clone()
    store_kv(expected_pool[1], k, v, meta.slot_mapping)
    gathered = DecodeGroup(0, 1, torch.tensor([[5, 1, 2]]), 37, None)  # the stretches' blocks
    by_blocks = dataclasses.replace(meta, decode_groups=[gathered]) if stretches else meta
    expected = paged_attention(q, k, v, expected_pool[1], by_blocks)
    attn = StepAttention(pool, (pool[:, 0].unbind(0), pool[:, 1].unbind(0)), meta)
    assert (attn.span is not None) == (seqs == 1 and not stretches)
    assert (attn.spans is not None) == stretches
    got = attn.attend(q, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(), 1)
    assert torch.equal(got, expected)
    assert torch.equal(pool, expected_pool)


def test_the_single_stream_path_is_taken_only_by_a_pure_decode_step():
    """A step with one decode and a prefill has more than one query row: the general path."""
    pool, meta, q, k, v = _pool_and_step(1)
    meta = dataclasses.replace(meta, prefills=[PrefillRun(1, 4, None)])
    attn = StepAttention(pool, (pool[:, 0].unbind(0), pool[:, 1].unbind(0)), meta)
    assert attn.span is None and attn.spans is None


@pytest.mark.slow  # traces the two layers again (their code is cached by the test above)
def test_the_default_configuration_compiles_the_decode_step_on_cpu(first_layers, monkeypatch):
    """EngineConfig.compile=None, the default, compiles on CPU: the suite turns it off
    (COVEY_COMPILE=0, tests/conftest.py), so this test unsets that. The thread count is the
    default's too (the governor): a step runs the graph exactly when torch's count is the
    one the graphs were warmed at; on an idle machine that is every step, on a busy one the
    governor may lower the count and those steps run eagerly (docs/performance.md)."""
    monkeypatch.delenv("COVEY_COMPILE")
    config = EngineConfig(device="cpu", dtype="bfloat16", kv_cache_tokens=4096)
    assert config.compile is None and config.num_threads is None
    engine = LLMEngine(config, model=first_layers)
    assert engine.thread_governor is not None  # the default's thread policy
    compiled = engine.runner.compiled
    assert compiled is not None and set(compiled._direct) == {1, 2}  # warmed up
    counts: list[int] = []  # torch's thread count at each step the compiled forward got
    forward = compiled.forward

    def counting(*args):
        counts.append(torch.get_num_threads())
        return forward(*args)

    monkeypatch.setattr(compiled, "forward", counting)
    engine.run_to_completion([engine.add_request(PROMPTS[0], GREEDY)])
    warm = sum(n == compiled.threads for n in counts)
    assert len(counts) == GREEDY.max_tokens - 1  # every decode step came to it
    assert compiled.compiled_steps == warm and compiled.eager_steps == len(counts) - warm
    # What benchmarks/engine.py records: the decode steps, and those that ran the graph.
    assert engine.runner.decode_steps == len(counts)
    assert engine.runner.compiled_steps == compiled.compiled_steps
