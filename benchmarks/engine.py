"""Engine benchmark: covey against transformers and llama.cpp on the same model.

Workloads (see the engine issue):
- throughput: N concurrent requests, 256 prompt tokens of real text, fixed output length
  (ignore_eos): output tokens per second, for covey, transformers (batched generate) and
  llama.cpp (llama-cpp-python on the same GGUF, one request at a time: it has no batching);
- latency: one request, 512 prompt tokens, 64 output tokens: TTFT and TPOT for all three;
- prefix: requests sharing a 1024-token system prompt with different 64-token questions:
  TTFT with the prefix cache on (`covey`) and off (`covey-no-prefix-cache`);
- throughput and latency again for every other weight mode (`covey-<mode>`: float32, bf16,
  int8, int4 weights; `covey` is the default configuration, whose decode step is compiled
  on CPU, and so is each mode's), with a decode profile each, and `covey-eager`: the
  default with the decode step eager (EngineConfig(compile=False), `--no-compile`);
- quality: perplexity on held-out Python docs of every mode and of transformers;
- contention: single-stream TPOT alone and with a competing CPU-bound process (a torch
  matmul loop on every core, OpenMP defaults), and contention-heavy with three of them, for
  covey (its default: the thread governor), the default before it (`covey-passive`: passive
  OpenMP wait, one thread per CPU), OpenMP's own spin-wait on one thread per CPU
  (`covey-omp-default`) and llama.cpp; each in a fresh process, as a user runs it.
On CUDA, a throughput run on dummy weights of a 1B-class Llama is added.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_common import parse_args, record, write_results  # noqa: E402

from covey.llm_backend.config import EngineConfig  # noqa: E402
from covey.llm_backend.cpu_threads import available_cpus, configure_openmp_env  # noqa: E402
from covey.llm_backend.llm_engine import LLMEngine  # noqa: E402
from covey.llm_backend.model_source import EMBEDDED_NAME, resolve_model  # noqa: E402
from covey.llm_backend.perplexity import (  # noqa: E402
    heldout_windows,
    model_perplexity,
    perplexity_of,
)
from covey.llm_backend.quantization import quantization_of  # noqa: E402
from covey.llm_backend.sampling_params import SamplingParams  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def real_text_prompts(tokenizer, count: int, length: int, offset: int = 0) -> list[list[int]]:
    """`count` windows of `length` tokens from CPython's own documentation topics."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text)
    stride = max(length, (len(ids) - length) // max(count, 1))
    out = [ids[offset + i * stride : offset + i * stride + length] for i in range(count)]
    if any(len(p) != length for p in out):
        raise RuntimeError("the documentation corpus is too short for this workload")
    return out


def run_engine(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams):
    """Submit all prompts at once and step to the end; return (outputs, seconds)."""
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    outs = engine.run_to_completion(ids)
    return outs, time.perf_counter() - start


def median_of(repeats: int, fn):
    """Run a measurement `repeats` times; the median (element-wise for tuples) damps noise."""
    import statistics

    runs = [fn() for _ in range(repeats)]
    if isinstance(runs[0], tuple):
        return tuple(statistics.median(r[i] for r in runs) for i in range(len(runs[0])))
    return statistics.median(runs)


def measure_system(results, name, repeats, throughput, latency, tp, lat):
    """Record one system's throughput, TTFT and TPOT (zero-argument measuring callables)."""
    value = median_of(repeats, throughput)
    ttft, tpot = median_of(repeats, latency)
    results.append(record("throughput", name, "output_tokens_per_s", value, tp))
    results.append(record("latency", name, "ttft_s", ttft, lat))
    results.append(record("latency", name, "tpot_s", tpot, lat))
    print(f"{name}: {value:.1f} tok/s, ttft {ttft:.3f}s, tpot {tpot * 1e3:.1f} ms", flush=True)


def step_counts(engine) -> tuple[int, int]:
    """(pure decode steps, those that ran the compiled graph) the engine has run so far."""
    return engine.runner.decode_steps, engine.runner.compiled_steps


def counting_steps(engine, params: dict, measure):
    """`measure`, adding to `params` how many decode steps its calls ran and how many of them
    ran the compiled graph: a compiled step that exists need not run (wider batches, or the
    thread governor's count differs from the warm-up's), so the label comes from the count.
    The counters are read outside the timed window."""

    def run():
        before = step_counts(engine)
        out = measure()
        after = step_counts(engine)
        params["decode_steps"] = params.get("decode_steps", 0) + after[0] - before[0]
        params["compiled_steps"] = params.get("compiled_steps", 0) + after[1] - before[1]
        params["compiled_share"] = round(
            params["compiled_steps"] / max(params["decode_steps"], 1), 3
        )
        return out

    return run


def covey_throughput(engine, prompts, out_tokens):
    params = SamplingParams(max_tokens=out_tokens, ignore_eos=True)
    run_engine(engine, prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm up
    outs, secs = run_engine(engine, prompts, params)
    return sum(len(o.token_ids) for o in outs) / secs


def covey_latency(engine, prompt, out_tokens):
    run_engine(engine, [prompt[:64]], SamplingParams(max_tokens=4, ignore_eos=True))
    (out,), _ = run_engine(engine, [prompt], SamplingParams(max_tokens=out_tokens, ignore_eos=True))
    return out.metrics.ttft, out.metrics.tpot


def covey_prefix_ttft(engine, system, questions):
    """Mean TTFT of requests sent one after another, after one warm-up with the prefix."""
    run_engine(engine, [system + questions[0]], SamplingParams(max_tokens=1))
    ttfts = []
    for q in questions:
        (out,), _ = run_engine(engine, [system + q], SamplingParams(max_tokens=1))
        ttfts.append(out.metrics.ttft)
    return sum(ttfts) / len(ttfts)


LINEAR_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::_weight_int8pack_mm",
    "aten::_weight_int4pack_mm_for_cpu",
    "aten::linear",
)
# The LM head is a linear op like the decoder's projections; it is told apart by its
# vocabulary-wide weight (recorded input shapes), so its bytes can be weighed against the
# 30 layers' in every mode.
PROFILE_GROUPS = {
    "lm_head_s": LINEAR_OPS,
    "linear_s": LINEAR_OPS,
    "attention_matmul_s": ("aten::bmm", "aten::matmul", "aten::_softmax", "aten::masked_fill_"),
    "rms_norm_s": ("aten::_fused_rms_norm", "aten::rms_norm"),
    "kv_gather_store_s": ("aten::index_select", "aten::index_copy_"),
    # Compiled steps: the attention op's own Python and dispatch (its ATen ops are in the
    # groups above), and dynamo's and the compiled graph's wrappers around the graph.
    "decode_attention_op_s": ("covey::decode_attention",),
    "compiled_call_s": ("Torch-Compiled Region", "CompiledFunction", "## Call CompiledFxGraph"),
}


def decode_profile(engine, prompt, steps, layout: dict | None = None):
    """Where the time of one decode step goes: torch.profiler self CPU time per step, in
    groups, plus the wall time of a step without the profiler, and of that the time outside
    the model's forward (scheduling, step inputs, LM head, sampling, outputs).

    With `layout`, also fills it with how the request's keys lay: `cached_tokens`, its
    prefix-cache hit, and `decode_stretches`, the distinct counts of stretches of pool order
    the profiled steps read them in (1: one slice; "gathered": by block)."""
    from torch.profiler import ProfilerActivity, profile

    rid = engine.add_request(prompt, SamplingParams(max_tokens=steps * 3, ignore_eos=True))
    for _ in range(steps):
        engine.step()  # prefill and warm-up
    cached = engine.requests[rid].num_cached_tokens
    with _timed_forward(engine) as in_forward:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - start) / steps
    with (
        profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof,
        _decode_reads(engine) as reads,
    ):
        for _ in range(steps):
            engine.step()
    if layout is not None:
        layout["cached_tokens"] = cached
        layout["decode_stretches"] = sorted(set(reads), key=str)
    for rid in list(engine.requests):
        engine.abort_request(rid)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6 / steps
    out = {"step_s": wall, "outside_forward_s": wall - in_forward[0] / steps}
    out["profiled_total_s"] = total
    vocab = engine.model.args.vocab_size
    for group, names in PROFILE_GROUPS.items():
        head = group == "lm_head_s"
        out[group] = (
            sum(
                e.self_cpu_time_total
                for e in events
                if e.key.startswith(names) and _reads_vocab_rows(e, vocab) == head
            )
            / 1e6
            / steps
        )
    out["other_ops_s"] = total - sum(out[g] for g in PROFILE_GROUPS)
    return out


def decode_profile_long(results, engines, prompt, steps):
    """`decode_profile_long` records: `decode_profile` of one long prompt on each engine
    (name -> engine), each with the request's prefix-cache hit and the stretches of pool
    order its decode steps read its keys in, as the runner's decode groups had them."""
    for name, engine in engines.items():
        layout: dict = {}
        metrics = decode_profile(engine, prompt, steps, layout)
        params = {
            "prompt_tokens": len(prompt),
            "cached_prefix_tokens": layout["cached_tokens"],
            "decode_stretches": layout["decode_stretches"],
            "steps": steps,
            "what": "one decode step, 1 request, after a shared prefix",
        }
        for metric, value in metrics.items():
            results.append(record("decode_profile_long", name, metric, value, params))


@contextlib.contextmanager
def _decode_reads(engine):
    """Collects, while the block runs, how each step's decode groups read their keys: the
    number of stretches of pool order (1: one slice), or "gathered" (block by block)."""
    reads: list = []
    runner = engine.runner
    prepare = runner.prepare

    def recording(scheduled):
        inputs = prepare(scheduled)
        for g in inputs.meta.decode_groups:
            if g.blocks is not None:
                reads.append("gathered")
            else:
                reads.append(1 if g.spans is None else len(g.spans))
        return inputs

    runner.prepare = recording
    try:
        yield reads
    finally:
        del runner.prepare  # the class's method again


@contextlib.contextmanager
def _timed_forward(engine):
    """Adds the wall time of the model's forward passes (compiled or not) to a one-item
    list while the block runs; the runner calls the forward it picks as a plain method."""
    spent = [0.0]
    depth = [0]  # the compiled forward's eager fallback calls the model's: count it once
    targets = [engine.model] + ([engine.runner.compiled] if engine.runner.compiled else [])

    def timed(forward):
        def run(*args, **kwargs):
            if depth[0]:
                return forward(*args, **kwargs)
            depth[0] += 1
            start = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                depth[0] -= 1
                spent[0] += time.perf_counter() - start

        return run

    for target in targets:
        target.forward = timed(target.forward)
    try:
        yield spent
    finally:
        for target in targets:
            del target.forward  # the class's method again


def _reads_vocab_rows(event, vocab: int) -> bool:
    """Whether a profiled linear op multiplies by the LM head (a vocab-wide weight)."""
    return any(vocab in shape for shape in event.input_shapes if shape)


def load_transformers(model, dtype):
    """transformers' Llama with covey's dequantized weights: a dense peer in the same dtype.

    (transformers 5 keeps GGUF weights packed and dequantizes them in every matmul, which
    would make it a needlessly weak peer.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    config = LlamaConfig(
        vocab_size=a.vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads,
        max_position_embeddings=a.max_position,
        rope_theta=a.rope_theta,
        rms_norm_eps=a.rms_norm_eps,
        tie_word_embeddings=a.tie_embeddings,
    )
    hf = LlamaForCausalLM(config)
    q, kv = a.num_heads * a.dim_per_head, a.num_kv_heads * a.dim_per_head
    state = {
        "model.embed_tokens.weight": model.embed_tokens.weight,
        "model.norm.weight": model.norm.weight,
    }
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer.self_attn.qkv_proj.weight.split([q, kv, kv])
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
        state |= {
            p + "self_attn.q_proj.weight": wq,
            p + "self_attn.k_proj.weight": wk,
            p + "self_attn.v_proj.weight": wv,
            p + "self_attn.o_proj.weight": layer.self_attn.o_proj.weight,
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
            p + "input_layernorm.weight": layer.input_layernorm.weight,
            p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
        }
    hf.load_state_dict({k: v.detach().float() for k, v in state.items()}, strict=False)
    return hf.to(dtype).eval()


@torch.inference_mode()
def hf_throughput(model, prompts, out_tokens, device):
    batch = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
    kw = dict(do_sample=False, max_new_tokens=out_tokens, min_new_tokens=out_tokens)
    model.generate(batch[:2, :16], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
    start = time.perf_counter()
    out = model.generate(batch, **kw)
    secs = time.perf_counter() - start
    return (out.shape[1] - batch.shape[1]) * batch.shape[0] / secs


@torch.inference_mode()
def hf_latency(model, prompt, out_tokens, device):
    ids = torch.tensor([prompt], device=device)
    model.generate(ids[:, :64], do_sample=False, max_new_tokens=4)
    start = time.perf_counter()
    model.generate(ids, do_sample=False, max_new_tokens=1, min_new_tokens=1)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, do_sample=False, max_new_tokens=out_tokens, min_new_tokens=out_tokens)
    total = time.perf_counter() - start
    return ttft, (total - ttft) / (out_tokens - 1)


def load_llama_cpp():
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(
        model_path=str(resolve_model(None).path),
        n_ctx=2048,
        n_batch=512,
        n_threads=torch.get_num_threads(),
        verbose=False,
    )


def llama_cpp_generate(llm, prompt, out_tokens):
    """(ttft, seconds for all tokens) of one greedy request that ignores EOS."""
    llm.reset()
    start = time.perf_counter()
    first = None
    for n, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), start=1):
        if first is None:
            first = time.perf_counter()
        if n == out_tokens:
            break
    return first - start, time.perf_counter() - start


def llama_cpp_throughput(llm, prompts, out_tokens):
    llama_cpp_generate(llm, prompts[0][:16], 4)
    start = time.perf_counter()
    for p in prompts:
        llama_cpp_generate(llm, p, out_tokens)
    return len(prompts) * out_tokens / (time.perf_counter() - start)


def llama_cpp_latency(llm, prompt, out_tokens):
    llama_cpp_generate(llm, prompt[:64], 4)
    ttft, total = llama_cpp_generate(llm, prompt, out_tokens)
    return ttft, (total - ttft) / (out_tokens - 1)


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return dict(
            repeats=1,
            requests=8,
            prompt=256,
            output=32,
            lat_prompt=512,
            lat_output=16,
            prefix_requests=4,
            prefix=1024,
            question=64,
            ppl_windows=2,
            ppl_tokens=256,
            contention_output=16,
        )
    return dict(
        repeats=3,
        requests=32,
        prompt=256,
        output=128,
        lat_prompt=512,
        lat_output=64,
        prefix_requests=16,
        prefix=1024,
        question=64,
        ppl_windows=8,
        ppl_tokens=512,
        contention_output=64,
    )


def cpu_suite(s, results, device):
    # Throughput and latency repeat the same prompts, so the prefix cache is off for them:
    # every repeat computes everything. The prefix workload measures the cache on its own.
    engine = LLMEngine(EngineConfig(device=device, max_num_seqs=64, enable_prefix_caching=False))
    dtype = engine.dtype
    tok = engine.tokenizer
    prompts = real_text_prompts(tok, s["requests"], s["prompt"])
    (lat_prompt,) = real_text_prompts(tok, 1, s["lat_prompt"], offset=7)
    tp = {
        "requests": s["requests"],
        "prompt_tokens": s["prompt"],
        "output_tokens": s["output"],
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": s["repeats"],
        "statistic": "median",
    }
    lat = {
        "prompt_tokens": s["lat_prompt"],
        "output_tokens": s["lat_output"],
        "dtype": tp["dtype"],
        "repeats": s["repeats"],
        "statistic": "median",
    }
    own_tp, own_lat = dict(tp), dict(lat)
    measure_system(
        results,
        "covey",
        s["repeats"],
        counting_steps(engine, own_tp, lambda: covey_throughput(engine, prompts, s["output"])),
        counting_steps(engine, own_lat, lambda: covey_latency(engine, lat_prompt, s["lat_output"])),
        own_tp,
        own_lat,
    )

    system = real_text_prompts(tok, 1, s["prefix"], offset=3)[0]
    questions = real_text_prompts(tok, s["prefix_requests"], s["question"], offset=11)
    pp = {
        "requests": s["prefix_requests"],
        "shared_prefix_tokens": s["prefix"],
        "question_tokens": s["question"],
        "sent": "one after another, after one warm-up",
    }
    on_engine = LLMEngine(EngineConfig(device=device), model=engine.model)
    on = covey_prefix_ttft(on_engine, system, questions)
    off = covey_prefix_ttft(engine, system, questions)
    results.append(record("prefix", "covey", "ttft_s", on, pp))
    results.append(record("prefix", "covey-no-prefix-cache", "ttft_s", off, pp))
    print(f"prefix ttft: {on:.3f}s cached vs {off:.3f}s uncached ({off / on:.1f}x)", flush=True)
    # One decode step after a RAG-shaped prompt: the shared prefix, cached by the requests
    # above, then a question none of them sent (a window of the corpus at another offset),
    # so only the prefix is a hit. Its blocks lie in stretches (the cached prefix's, then
    # its own): this profiles the single-stream read of `attend_spans`, at ~1100 keys, not
    # 512; its peer is the same prompt on the engine without the cache (one slice).
    (unsent,) = real_text_prompts(tok, 1, s["question"], offset=5)
    engines = {"covey": on_engine, "covey-no-prefix-cache": engine}
    decode_profile_long(results, engines, system + unsent, 20)
    del on_engine, engines

    prof = {"prompt_tokens": s["lat_prompt"], "steps": 20, "what": "one decode step, 1 request"}
    for metric, value in decode_profile(engine, lat_prompt, 20).items():
        results.append(record("decode_profile", "covey", metric, value, prof))
    print("covey decode profile recorded", flush=True)
    models = {"covey": engine.model}
    for name, config in mode_systems(engine).items():
        models[name] = measure_mode(results, s, name, config, device, prompts, lat_prompt, tp, lat)
    for name, config in EAGER.items():
        measure_mode(results, s, name, config, device, prompts, lat_prompt, tp, lat)
    quality_suite(s, results, tok, models)

    hf = load_transformers(dense_model(models, dtype), dtype)
    measure_system(
        results,
        "transformers",
        s["repeats"],
        lambda: hf_throughput(hf, prompts, s["output"], device),
        lambda: hf_latency(hf, lat_prompt, s["lat_output"], device),
        tp,
        lat,
    )

    llm = load_llama_cpp()
    names = [
        ("throughput", "output_tokens_per_s", tp),
        ("latency", "ttft_s", lat),
        ("latency", "tpot_s", lat),
    ]
    if llm is None:
        why = "llama-cpp-python is not installed (make bench installs it)"
        results.extend(record(w, "llama.cpp", m, None, p, why) for w, m, p in names)
        return
    cpp = {"gguf": "Q4_1 (as shipped)", "sequential": True}
    measure_system(
        results,
        "llama.cpp",
        s["repeats"],
        lambda: llama_cpp_throughput(llm, prompts, s["output"]),
        lambda: llama_cpp_latency(llm, lat_prompt, s["lat_output"]),
        {**tp, **cpp},
        {**lat, **cpp},
    )


# Weight modes: EngineConfig overrides. The one matching the default configuration is
# measured as `covey`; the others as `covey-<mode>`.
WEIGHT_MODES = {
    "float32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16", quantization=None),
    "int8": dict(dtype="bfloat16", quantization="int8"),
    "int4": dict(dtype="bfloat16", quantization="int4"),
}
# The default weights with the decode step eager (EngineConfig(compile=False)): the default
# compiles it on CPU, and this is the speed it has without. Its weights and perplexity are
# the default's. (`covey-compiled`, compile=True, was dropped: it is now `covey`.)
EAGER = {"covey-eager": dict(compile=False)}


def mode_of(engine: LLMEngine) -> str:
    """The WEIGHT_MODES name of an engine (its "auto" quantization resolved)."""
    if engine.quantization:
        return engine.quantization
    return "bf16" if engine.dtype == torch.bfloat16 else str(engine.dtype).removeprefix("torch.")


def dense_model(models: dict, dtype: torch.dtype):
    """A model among `models` with dense weights in `dtype` (transformers copies them)."""
    return next(
        m for m in models.values() if quantization_of(m) is None and m.norm.weight.dtype == dtype
    )


def mode_systems(default_engine: LLMEngine) -> dict[str, dict]:
    """`covey-<mode>` -> config overrides, for every mode but the default engine's."""
    default = mode_of(default_engine)
    return {f"covey-{m}": c for m, c in WEIGHT_MODES.items() if m != default}


def measure_mode(results, s, name, overrides, device, prompts, lat_prompt, tp, lat):
    """Throughput, latency and the decode profile of one weight mode; returns its model."""
    engine = LLMEngine(EngineConfig(device=device, enable_prefix_caching=False, **overrides))
    mode = mode_of(engine)
    params = {"dtype": str(engine.dtype).removeprefix("torch."), "weights": mode}
    mode_tp, mode_lat = {**tp, **params}, {**lat, **params}
    measure_system(
        results,
        name,
        s["repeats"],
        counting_steps(engine, mode_tp, lambda: covey_throughput(engine, prompts, s["output"])),
        counting_steps(
            engine, mode_lat, lambda: covey_latency(engine, lat_prompt, s["lat_output"])
        ),
        mode_tp,
        mode_lat,
    )
    prof = {"prompt_tokens": s["lat_prompt"], "steps": 20, "what": "one decode step, 1 request"}
    for metric, value in decode_profile(engine, lat_prompt, 20).items():
        results.append(record("decode_profile", name, metric, value, {**prof, **params}))
    return engine.model


@torch.inference_mode()
def quality_suite(s, results, tokenizer, models):
    """Perplexity on held-out Python docs (the end of the topic list; the prompts above
    come from its start) for every covey mode and for transformers (float32)."""
    windows = heldout_windows(tokenizer.encode, s["ppl_windows"], s["ppl_tokens"])
    params = {"windows": len(windows), "window_tokens": s["ppl_tokens"], "text": "pydoc topics"}
    for name, model in models.items():
        value = model_perplexity(model, windows)
        results.append(record("quality", name, "perplexity", value, params))
        print(f"{name}: perplexity {value:.4f}", flush=True)
    # transformers in float32, on the float32 weights covey loads: the reference.
    hf = load_transformers(dense_model(models, torch.float32), torch.float32)
    value = perplexity_of(lambda ids: hf(torch.tensor([ids])).logits[0], windows)
    results.append(record("quality", "transformers", "perplexity", value, params))
    print(f"transformers: perplexity {value:.4f}", flush=True)


def gpu_suite(s, results):
    """Throughput on CUDA with dummy weights of a 1B-class Llama (no package ships one)."""
    engine = LLMEngine(EngineConfig(model="dummy:llama-1b", device="cuda", max_num_seqs=256))
    count = s["requests"] * 4
    prompts = [[(7 * i + j) % 49000 + 100 for j in range(s["prompt"])] for i in range(count)]
    params = {
        "requests": count,
        "prompt_tokens": s["prompt"],
        "output_tokens": s["output"],
        "model": "dummy:llama-1b",
        "dtype": "bfloat16",
    }
    value = median_of(s["repeats"], lambda: covey_throughput(engine, prompts, s["output"]))
    results.append(record("throughput-gpu", "covey", "output_tokens_per_s", value, params))
    why = "llama.cpp (CPU build) and transformers are not run on the dummy GPU model here"
    results.append(
        record("throughput-gpu", "transformers", "output_tokens_per_s", None, params, why)
    )
    print(f"covey on GPU: {value:.1f} tok/s", flush=True)


COMPETITOR = """
import sys, torch
a = torch.randn(1024, 1024)
print("ready", flush=True)
while True:
    a @ a
"""

# Competitors per contention workload: one other ML job, or three (a busy shared machine).
CONTENTION_RIVALS = {"contention": 1, "contention-heavy": 3}

CONTENTION_SYSTEMS = ("covey", "covey-passive", "covey-omp-default", "llama.cpp")


def contention_child(system: str, prompt_tokens: int, out_tokens: int) -> None:
    """Run in a fresh interpreter: print the TPOT of one request, and the threads covey's
    steps ran on at the end, as JSON."""
    import json

    threads = steps = None
    if system == "llama.cpp":
        llm = load_llama_cpp()
        prompt = list(range(1000, 1000 + prompt_tokens))
        tpot = None if llm is None else llama_cpp_latency(llm, prompt, out_tokens)[1]
    else:
        config = EngineConfig(device="cpu", enable_prefix_caching=False)
        if system != "covey":  # the fixed count of the old default, no thread governor
            config = EngineConfig(
                device="cpu", enable_prefix_caching=False, num_threads=available_cpus()
            )
        engine = LLMEngine(config)
        (prompt,) = real_text_prompts(engine.tokenizer, 1, prompt_tokens, offset=7)
        before = step_counts(engine)
        tpot = covey_latency(engine, prompt, out_tokens)[1]
        threads = engine.stats().num_threads
        steps = [a - b for a, b in zip(step_counts(engine), before, strict=True)]
    print("TPOT " + json.dumps({"tpot": tpot, "threads": threads, "steps": steps}), flush=True)


def _run_child(system: str, s) -> dict:
    import json
    import subprocess

    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
        f"import engine; engine.contention_child({system!r}, {s['lat_prompt']}, "
        f"{s['contention_output']})"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if system == "covey":  # what the `covey` command sets before torch loads
        configure_openmp_env(env)
    elif system == "covey-passive":  # the default before the thread governor
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("TPOT ")]
    if not lines:
        raise RuntimeError(f"contention run of {system} failed: {out.stderr[-2000:]}")
    return json.loads(lines[-1][5:])


def _contended(system: str, s, rivals: int) -> dict:
    """A child's run while `rivals` competitor processes spin."""
    import subprocess

    procs = [
        subprocess.Popen([sys.executable, "-c", COMPETITOR], stdout=subprocess.PIPE, text=True)
        for _ in range(rivals)
    ]
    try:
        for p in procs:
            p.stdout.readline()  # "ready": torch is loaded and the loop starts
        return _run_child(system, s)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _steps_params(when: str, run: dict) -> dict:
    """A child's decode steps and how many ran the compiled graph (covey systems only): the
    governor's `covey` can drop to eager steps under contention while the fixed-thread
    systems stay compiled, so the comparison says which steps each ran."""
    if run.get("steps") is None:
        return {}
    decode, compiled = run["steps"]
    return {f"decode_steps_{when}": decode, f"compiled_steps_{when}": compiled}


def contention_suite(s, results, systems=CONTENTION_SYSTEMS):
    """TPOT without and with competing CPU-bound processes; the ratio is the slowdown.

    Each competitor runs matmuls on every core with its own OpenMP team (default threads
    and spin), like another ML job on a shared machine: one in `contention`, three in
    `contention-heavy`. `covey` is the default (the `covey` command's OpenMP settings and
    the thread governor), `covey-passive` the default before the governor (passive wait,
    one thread per CPU), `covey-omp-default` OpenMP's own spin-wait on one thread per CPU.
    Runs alternate (alone, contended, heavy) per system so drifting background load hits
    all alike."""
    for system in systems:
        alone = _run_child(system, s)
        if alone["tpot"] is None:
            why = "llama-cpp-python is not installed (make bench installs it)"
            for workload in CONTENTION_RIVALS:
                for metric in ("tpot_s_alone", "tpot_s_contended", "slowdown"):
                    results.append(record(workload, system, metric, None, {}, why))
            continue
        for workload, rivals in CONTENTION_RIVALS.items():
            params = {
                "prompt_tokens": s["lat_prompt"],
                "output_tokens": s["contention_output"],
                "competitor": f"{rivals} process(es): torch matmul loop, default threads "
                "and OpenMP settings",
                "cpu_count": os.cpu_count(),
                "threads_alone": alone["threads"],
                **_steps_params("alone", alone),
            }
            run = _contended(system, s, rivals)
            params["threads_contended"] = run["threads"]
            params.update(_steps_params("contended", run))
            contended = run["tpot"]
            results.append(record(workload, system, "tpot_s_alone", alone["tpot"], params))
            results.append(record(workload, system, "tpot_s_contended", contended, params))
            results.append(
                record(workload, system, "slowdown", contended / alone["tpot"], params)
            )
            print(
                f"{workload} {system}: tpot {alone['tpot'] * 1e3:.1f} ms alone, "
                f"{contended * 1e3:.1f} ms with {rivals} competitor(s) "
                f"({contended / alone['tpot']:.1f}x; threads {alone['threads']} -> "
                f"{run['threads']})",
                flush=True,
            )


def _plot_profile(ax, results):
    """Stacked bars: where the milliseconds of one decode step go."""
    rows = [r for r in results if r["workload"] == "decode_profile"]
    systems = sorted({r["system"] for r in rows})
    groups = [*PROFILE_GROUPS, "other_ops_s"]
    bottom = [0.0] * len(systems)
    for group in groups:
        ms = [
            next((r["value"] * 1e3 for r in rows if r["system"] == s and r["metric"] == group), 0.0)
            for s in systems
        ]
        ax.bar(systems, ms, bottom=bottom, label=group.removesuffix("_s"))
        bottom = [b + m for b, m in zip(bottom, ms)]
    ax.set_title("one decode step, ms (torch.profiler self time)", fontsize=9)
    ax.legend(fontsize=7)


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("throughput", "output_tokens_per_s", "output tokens/s (higher is better)"),
        ("latency", "ttft_s", "TTFT s, 512-token prompt"),
        ("latency", "tpot_s", "TPOT s (lower is better)"),
        ("prefix", "ttft_s", "TTFT s with a shared 1024-token prefix"),
        ("quality", "perplexity", "perplexity, held-out docs (lower is better)"),
        ("contention", "slowdown", "TPOT with a CPU-bound competitor / alone"),
        ("contention-heavy", "slowdown", "TPOT with 3 CPU-bound competitors / alone"),
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 4))
    _plot_profile(axes[-1], data["results"])
    for ax, (workload, metric, title) in zip(axes, panels):
        rows = [r for r in data["results"] if r["workload"] == workload and r["metric"] == metric]
        names = [r["system"] for r in rows]
        values = [r["value"] or 0.0 for r in rows]
        bars = ax.bar(
            names, values, color=["#2a6f97", "#a9a9a9", "#e9a03b", "#6a994e"][: len(rows)]
        )
        for bar, r in zip(bars, rows):
            label = "n/a" if r["value"] is None else f"{r['value']:.3g}"
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(
        f"covey engine, {data['model']} on {data['environment']['cpu']}"
        f"{' (quick)' if data['quick'] else ''}",
        fontsize=9,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args("engine", __doc__.splitlines()[0], argv)
    s = sizes(args.quick)
    results: list[dict] = []
    cpu_suite(s, results, "cpu")
    contention_suite(s, results)
    if torch.cuda.is_available():
        gpu_suite(s, results)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = write_results(args, "engine", results, device, EMBEDDED_NAME)
    plot(data, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
