"""The engine's one config: model, placement, KV pool size and batching limits."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from covey.checks import as_int, as_real
from covey.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_BYTES = 1 << 30  # 1 GiB: ~22k tokens of SmolLM2-135M in float32
DEFAULT_GPU_KV_FRACTION = 0.5  # of the memory free after loading the weights
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
CHUNK_CACHE_MODES = ("off", "exact", "blend")
QUANTIZATION_MODES = ("int8", "int4")
BLEND_SCORES = ("kv", "k", "v", "attention", "kv+attention")
BLEND_QUOTAS = ("global", "per_chunk")
PAUSE_POLICIES = ("adaptive", "preserve", "swap", "discard")


@dataclass(frozen=True)
class EngineConfig:
    """Give at most one of `kv_cache_tokens` / `kv_cache_bytes`; neither picks a default.

    Threads (`num_threads`, see cpu_threads.py): None lets the thread governor run one
    torch thread per CPU this process may run on while other processes leave them free,
    and fewer (down to one) while they do not, so that decoding slows in proportion instead
    of collapsing (a spinning team waits time slices for its descheduled member). A count
    given here or in OMP_NUM_THREADS is used as it is; with OMP_NUM_THREADS the `covey`
    command also sets OMP_WAIT_POLICY=PASSIVE before torch loads (its GOMP_SPINCOUNT=20000
    otherwise), which a program that imports torch itself can set in its environment.
    Either way the engine sets torch's thread count, which is per process, when it starts:
    a count set earlier with torch.set_num_threads is replaced, so give it here.

    `compile`: run pure decode steps (up to 32 sequences) as one torch.compile graph
    (inductor, C++ wrapper), see compiled_decode.py. None (the default) compiles on CPU
    with torch >= 2.8 unless the environment sets COVEY_COMPILE=0, and runs eagerly on
    CUDA (CUDA graphs are not built); if compiling fails there (no C++ compiler, a torch
    bug) it logs one warning and runs eagerly. True compiles wherever asked and raises if
    it cannot; False is always eager. Why on by default: single-stream decode, the speed a
    chat user feels. In the full-size benchmarks/engine.py run (results/engine.json) the
    compiled step took 9.0 ms a token against the eager 9.9 ms (llama.cpp 7.6 ms), while
    eager served 32 concurrent requests faster (352 against 327 tok/s). What it costs
    is the engine's start: the first compile of a model takes minutes (the generated code
    is then cached under covey's home), and every later start traces the model again
    (seconds); docs/performance.md has the measured figures. On a busy machine the default
    runs mostly eager steps: the graphs are compiled for torch's thread count at start, and
    a step at another count runs the plain model (recompiling while serving takes minutes,
    and dynamo's own fallback is slower than eager), while the thread governor
    (`num_threads=None`) lowers the count when other processes take the cores. So under
    load the start-up cost buys little; a fixed `num_threads` keeps every step compiled, at
    the price of the governor's protection against contention. A model given as
    `LLMEngine(config, model=...)` may be written in place after the engine starts (same
    dtypes and shapes). Replacing its weights or modules is not supported: the compiled
    graphs hold the old tensors. A cheap per-step check of a few tensors (the embedding,
    the first and last layer's qkv, the final norm) catches a model swapped as a whole and
    sends the steps back to eager, but not one replaced weight elsewhere.
    """

    model: str | Path | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"  # auto: bfloat16 on CUDA and bf16-capable CPUs, else float32
    device: str = "auto"  # auto: cuda when available, else cpu
    block_size: int = 16
    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context window
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch CPU threads; None: one per available CPU
    compile: bool | None = None  # decode steps as one compiled graph; None: on CPU (docstring)
    # Weight-only quantization (CPU, bfloat16): "int8" (per-channel) or "int4" (groups of
    # 32); both read the packed weights in decode and keep no dense copy. See
    # covey/llm_backend/quantization.py for the measured speed and perplexity of each.
    # "auto" picks by the weights and device (quantization_default.py): int4 for an already
    # 4-bit GGUF on a bf16 CPU (the embedded model), dense on CUDA or float32. None: dense.
    # With weights handed in (`LLMEngine(config, model=m)`) "auto" takes them as they are:
    # a dense model stays dense where a freshly loaded one would be int4.
    quantization: str | None = "auto"
    # Quantized weights: also keep a dense bf16 copy of each projection's (dequantized, so
    # the quantized model's math) weight for steps of DENSE_MIN_ROWS rows or more (prefill,
    # blended chunk reuse, wide eager decode), the packed weights for decode below that.
    # False (the default): no copy, as issue 14 asks of the quantized modes (their point is
    # fewer bytes). True: kept; None: kept when they cost at most DENSE_COPY_MAX_BYTES (1 GiB;
    # the embedded model's 212 MB are, a 1.7B model's ~3.4 GB are not). Ignored for dense
    # weights and for a model handed in (`LLMEngine(config, model=m)`), taken as it is
    # (quantization.keep_dense_copies).
    dense_prefill_weights: bool | None = False
    # Chunk KV reuse for prompts with Segment(kind="chunk"): "off"; "exact" (RAGCache: a
    # chunk after the same tokens as before reuses its KV losslessly); "blend" (exact first,
    # then CacheBlend: chunks seen after other tokens reuse their KV at the new positions
    # with `blend_recompute_ratio` of their tokens recomputed, chosen on the check layers).
    # "blend" with stored scores is the default: at about half full prefill's time to first
    # token on benchmarks/rag_kv.py's planted-fact questions, it answered 0.595 against full
    # prefill's 0.590 on 400 (95% [-0.038, +0.048]; 160-question runs: -0.006 and -0.031),
    # where exact reuse hits ~0.1% of the tokens (docs/engine.md).
    chunk_cache: str = "blend"
    blend_recompute_ratio: float = 0.15
    # None: one layer at about 27% of the model's depth (blend_forward.default_check_layers;
    # layer 8 of SmolLM2's 30), where the measured choice of tokens recovers full prefill's
    # accuracy; layer 1, the first default, lost 5.6 points (see that function's docstring).
    blend_check_layers: tuple[int, ...] | None = None
    # Blend: the first tokens of every reused chunk also recomputed on every layer, beyond
    # the ratio (a chunk computed elsewhere carries attention-sink KV at its head). Like the
    # ratio and check layers, it applies only with chunk_cache="blend" and is ignored (a
    # harmless knob, not an error) otherwise.
    blend_sink_tokens: int = 0
    # Blend: how the recomputed tokens are chosen on the check layers (see
    # blend_forward.BlendPolicy): "kv" (CacheBlend's K+V deviation), "k", "v", "attention"
    # (what the question after the chunks attends to) or "kv+attention"; and whether the
    # top tokens are taken over all reused chunks ("global") or per chunk ("per_chunk").
    blend_score: str = "kv"
    blend_quota: str = "global"
    # Blend: keep each chunk's check-layer scores with its KV in the chunk store, and when
    # every reused chunk of a blend has them, choose the recomputed tokens by them and run
    # no check layer (whose full pass over every reused token is most of blend's cost).
    # A blend with an unscored chunk runs the check layers and stores what they measure.
    blend_stored_scores: bool = True
    # The host tier of the chunk store, per engine (a cap: it grows with the chunks read).
    # 2 GiB holds ~466 chunks of 200 tokens of SmolLM2's KV in bf16 (4.6 MB each), half
    # that in float32; LMCache's CPU tier defaults to 5 GB, vLLM's swap space to 4 GiB.
    # 256 MiB, the first default, held 57 entries at a time on rag_kv's full size and
    # evicted 74 times in 160 requests, each a later recompute and lost scores.
    chunk_store_bytes: int = 2 << 30
    chunk_store_dir: str | None = None  # the disk tier (kept across restarts); None: none
    chunk_store_disk_bytes: int = 2 << 30
    # What a request paused for a tool call does with its KV while memory is short:
    # "adaptive" (per request and step, the least wasted memory x time of the three, from
    # the tool's duration history and this machine's measured swap and recompute costs),
    # or always "preserve" (keep it in the pool), "swap" (to host memory and back) or
    # "discard" (free it, recompute on resume). Fixed policies are there for comparison.
    pause_policy: str = "adaptive"
    pause_swap_bytes: int = 4 << 30  # host memory paused KV may be swapped to (vLLM: 4 GiB)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and (not isinstance(self.dtype, str) or self.dtype not in DTYPES):
            raise ConfigError(
                f"EngineConfig.dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}"
            )
        check_device(self.device, "EngineConfig.device")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            as_int(f"EngineConfig.{name}", getattr(self, name), ge=1, error=ConfigError)
        for name in ("kv_cache_tokens", "kv_cache_bytes", "max_model_len", "num_threads"):
            if getattr(self, name) is not None:
                as_int(f"EngineConfig.{name}", getattr(self, name), ge=1, error=ConfigError)
        if self.block_size & (self.block_size - 1):
            raise ConfigError(
                f"EngineConfig.block_size must be a power of two, got {self.block_size}"
            )
        if self.kv_cache_tokens is not None and self.kv_cache_bytes is not None:
            raise ConfigError("EngineConfig: give kv_cache_tokens or kv_cache_bytes, not both")
        if self.quantization not in (None, "auto", *QUANTIZATION_MODES):
            raise ConfigError(
                "EngineConfig.quantization must be 'auto', None, 'int8' or 'int4', "
                f"got {self.quantization!r}"
            )
        if self.quantization in QUANTIZATION_MODES and self.dtype not in ("auto", "bfloat16"):
            raise ConfigError(
                f"EngineConfig.quantization={self.quantization!r} needs dtype='bfloat16' "
                f"(its kernels are bf16), got dtype={self.dtype!r}"
            )
        if self.dense_prefill_weights is not None and not isinstance(
            self.dense_prefill_weights, bool
        ):
            raise ConfigError(
                "EngineConfig.dense_prefill_weights must be None (kept when they cost at most "
                f"1 GiB), True or False, got {self.dense_prefill_weights!r}"
            )
        if self.dense_prefill_weights and self.quantization is None:
            raise ConfigError(
                "EngineConfig.dense_prefill_weights=True keeps dense copies of quantized "
                "weights, but quantization=None keeps the weights dense already"
            )

        if self.compile is not None and not isinstance(self.compile, bool):
            raise ConfigError(
                "EngineConfig.compile must be None (compile on CPU), True or False, "
                f"got {self.compile!r}"
            )
        self._check_chunk_cache()
        as_int("EngineConfig.pause_swap_bytes", self.pause_swap_bytes, ge=0, error=ConfigError)
        if self.pause_policy not in PAUSE_POLICIES:
            raise ConfigError(
                f"EngineConfig.pause_policy must be one of {PAUSE_POLICIES}, "
                f"got {self.pause_policy!r}"
            )

    def _check_chunk_cache(self) -> None:
        if self.chunk_cache not in CHUNK_CACHE_MODES:
            raise ConfigError(
                f"EngineConfig.chunk_cache must be one of {CHUNK_CACHE_MODES}, "
                f"got {self.chunk_cache!r}"
            )
        as_real(
            "EngineConfig.blend_recompute_ratio",
            self.blend_recompute_ratio,
            ge=0.0,
            le=1.0,
            error=ConfigError,
        )
        layers = self.blend_check_layers
        if layers is None:
            pass
        elif isinstance(layers, list):
            object.__setattr__(self, "blend_check_layers", layers := tuple(layers))
        if layers is not None and (not isinstance(layers, tuple) or not layers):
            raise ConfigError(
                "EngineConfig.blend_check_layers must be a non-empty tuple of layer indices "
                f"or None (a layer chosen by the model's depth), got {layers!r}"
            )
        for layer in layers or ():
            as_int("each of EngineConfig.blend_check_layers", layer, ge=0, error=ConfigError)
        as_int("EngineConfig.blend_sink_tokens", self.blend_sink_tokens, ge=0, error=ConfigError)
        for name, value, allowed in (
            ("blend_score", self.blend_score, BLEND_SCORES),
            ("blend_quota", self.blend_quota, BLEND_QUOTAS),
        ):
            if value not in allowed:
                raise ConfigError(f"EngineConfig.{name} must be one of {allowed}, got {value!r}")
        if not isinstance(self.blend_stored_scores, bool):
            raise ConfigError(
                "EngineConfig.blend_stored_scores must be True or False, "
                f"got {self.blend_stored_scores!r}"
            )
        as_int("EngineConfig.chunk_store_bytes", self.chunk_store_bytes, ge=0, error=ConfigError)
        as_int(
            "EngineConfig.chunk_store_disk_bytes",
            self.chunk_store_disk_bytes,
            ge=1,  # the disk tier has no "none" size: chunk_store_dir=None is none
            error=ConfigError,
        )
        if self.chunk_store_dir is not None and not isinstance(self.chunk_store_dir, (str, Path)):
            raise ConfigError(
                f"EngineConfig.chunk_store_dir must be a path or None, got {self.chunk_store_dir!r}"
            )

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        """auto: bfloat16 on CUDA and on CPUs with native bf16 math, else float32."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.torch_device().type == "cuda" or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32


def check_device(device: object, field: str) -> None:
    """Refuse a device this machine does not have now, when the config is made, rather than
    as a torch RuntimeError halfway through loading the weights. `field` names the setting
    in the message (e.g. "EngineConfig.device")."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ConfigError(f"{field} must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{field} is {device!r} but CUDA is not available on this machine; "
            "use 'cpu' or 'auto'"
        )
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"{field} is {device!r} but this machine has {count} CUDA device(s) "
            f"(cuda:0 to cuda:{count - 1})"
        )


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls natively (AVX512-BF16 or AMX): ~4x fp32 there."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)
