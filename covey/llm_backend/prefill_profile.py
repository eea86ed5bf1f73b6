"""What a prefill costs on this machine: seconds(n) = a + b * n, measured once per process;
and what moving KV blocks to host memory and back costs (`swap_profile`).

The chunk store evicts by PGDSF, whose cost term is the time a recompute would take, so it
needs this machine's prefill speed for the model at hand, not a guess. Two short forward
passes (after one warm-up) into a scratch KV tensor fit the line; the pool is not touched.
The pause policy (INFERCEPT's min-waste) weighs that recompute against swapping, so the swap
copies are timed the same way, on a scratch pool with the real copy code (`kv_swap.py`).
Fits are cached per (model, device, dtype, quantization), so engines sharing a model, and
tests building many engines, measure once.

Measuring costs warm-up forwards at every start (seconds on a busy 2-core machine, in every
`covey` command), so fits are also kept on disk under covey_home()/profiles, keyed by all
they depend on: the engine's key (model file identity, device, dtype, quantization) plus the
thread count, torch version, CPU and PROFILE_VERSION (covey's own code: bump it when the
measurement or a hot path it times changes). A file is written atomically and ignored if
corrupt or unreadable, or older than PROFILE_MAX_AGE_S (a fit taken under a load that lasted
the whole measurement is not kept for good); a home that cannot be written only costs the
next start a measurement. To re-measure now: `rm -r "${COVEY_HOME:-~/.cache/covey}/profiles"`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from covey.atomic_files import replace_atomically
from covey.home import covey_home
from covey.llm_backend.attention_metadata import AttentionMetadata, PrefillRun
from covey.llm_backend.kv_pool import KVPool
from covey.llm_backend.kv_swap import KVSwap
from covey.llm_backend.model import LlamaModel
from covey.llm_backend.model_args import ModelArgs

# Short: the whole measurement stays well under a second. A quantized model's longer length
# is at least twice its kernel's row limit (`_lengths`): real prefills are long, and past
# the limit the layers dequantize and run a bf16 matmul, with another cost per token.
PROFILE_LENGTHS = (16, 64)
PROFILE_REPEATS = 2
SWAP_PROFILE_BYTES = 32 << 20  # the scratch pool's size at most: a few ms of copying
SWAP_PROFILE_REPEATS = 3  # the fastest of these: copies are noisy on a loaded machine
# Part of every stored fit's key: bump it when the measurement, or the code it times
# (attention, dequantization, the kernels' row limits, the KV copies), changes.
PROFILE_VERSION = 5
PROFILE_MAX_AGE_S = 30 * 24 * 3600  # a stored fit older than this is measured again

_profiles: dict[tuple[object, ...], PrefillProfile] = {}
_swap_profiles: dict[tuple[object, ...], SwapProfile] = {}


@dataclass(frozen=True)
class PrefillProfile:
    fixed_s: float  # per prefill, whatever its length
    per_token_s: float

    def seconds(self, num_tokens: int) -> float:
        """Estimated seconds to prefill `num_tokens` tokens from scratch."""
        return self.fixed_s + self.per_token_s * num_tokens

    def span_seconds(self, num_tokens: int) -> float:
        """What recomputing a span of `num_tokens` costs inside a larger prefill: a span is
        never prefilled alone, so no fixed cost. The chunk store's eviction cost: with the
        fixed part, small label spans would outrank the chunks per byte and outlive them."""
        return self.per_token_s * num_tokens


def prefill_profile(
    model: LlamaModel, key: tuple[object, ...], threads: int | None = None
) -> PrefillProfile:
    """The cached profile for `key` (what identifies the model's speed), measuring it on
    `model` the first time. `threads`: the thread count the engine was configured with,
    for the file's key (default: torch's count now, which the thread governor moves)."""
    profile = _profiles.get(key)
    if profile is None:
        text = _disk_key("prefill", key, model.norm.weight.device, threads)
        profile = _load(PrefillProfile, "prefill", text)
        if profile is None:
            profile = measure(model)
            _store(profile, "prefill", text)
        _profiles[key] = profile
    return profile


@torch.inference_mode()
def measure(model: LlamaModel) -> PrefillProfile:
    """Time a forward over each of `_lengths(model)` tokens and fit a line through them."""
    args = model.args
    param = model.norm.weight  # the compute dtype (embeddings may be int8)
    device = param.device
    (n0, n1) = _lengths(model)
    kv = torch.zeros(
        args.num_layers,
        2,
        args.num_kv_heads,
        n1,
        args.dim_per_head,
        dtype=param.dtype,
        device=device,
    )

    def run(n: int) -> float:
        ids = torch.zeros(n, dtype=torch.long, device=device)
        positions = torch.arange(n, device=device)
        meta = AttentionMetadata(
            slot_mapping=positions,
            num_decode=0,
            block_size=1,
            prefills=[PrefillRun(0, n, None, None)],
        )
        _sync(device)
        start = time.perf_counter()
        model(ids, positions, kv, meta)
        _sync(device)
        return time.perf_counter() - start

    run(n0)  # warm-up: first-call allocations and kernel selection
    # The fastest of a few: a loaded machine only ever adds time, and the pause policy
    # weighs this against copy times measured the same way.
    t0 = min(run(n0) for _ in range(PROFILE_REPEATS))
    t1 = min(run(n1) for _ in range(PROFILE_REPEATS))
    per_token = max(t1 - t0, 0.0) / (n1 - n0)
    if per_token == 0.0:  # timing noise: fall back to a proportional model
        per_token = t1 / n1
    return PrefillProfile(fixed_s=max(t0 - per_token * n0, 0.0), per_token_s=per_token)


def _lengths(model: LlamaModel) -> tuple[int, int]:
    """The two prefill lengths timed: PROFILE_LENGTHS, the longer one raised past twice the
    quantized layers' kernel row limit (none for dense weights)."""
    kernel_rows = getattr(model.layers[0].mlp.down_proj, "kernel_max_rows", 0)
    short, long = PROFILE_LENGTHS
    return short, max(long, 2 * kernel_rows)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class SwapProfile:
    """Seconds to copy blocks out of the pool to host memory and back: fixed + per byte."""

    out_fixed_s: float
    out_per_byte_s: float
    in_fixed_s: float
    in_per_byte_s: float


def swap_profile(
    args: ModelArgs,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    key: tuple[object, ...],
    threads: int | None = None,
) -> SwapProfile:
    """The cached swap profile for `key`, measured the first time on a scratch pool of
    the engine's shape (layers, heads, block size, dtype, device); `threads` as for
    `prefill_profile`."""
    profile = _swap_profiles.get(key)
    if profile is None:
        text = _disk_key("swap", key, device, threads)
        profile = _load(SwapProfile, "swap", text)
        if profile is None:
            profile = measure_swap(args, block_size, dtype, device)
            _store(profile, "swap", text)
        _swap_profiles[key] = profile
    return profile


def measure_swap(
    args: ModelArgs, block_size: int, dtype: torch.dtype, device: torch.device
) -> SwapProfile:
    """Time `KVSwap`'s copies of one block and of many; fit a line through each."""
    block_bytes = KVPool.bytes_per_block(args, block_size, dtype)
    many = max(2, min(16, SWAP_PROFILE_BYTES // block_bytes))
    pool = KVPool(args, many, block_size, dtype, device)
    # Written first: a CPU pool's pages are mapped in on first write (kv_pool.zeroed), and
    # reading pages never written reads one shared zero page, not memory, so the copy out
    # would be timed too fast and the pause policy would lean toward swapping.
    pool.kv.fill_(1.0)
    swap = KVSwap(pool)

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(SWAP_PROFILE_REPEATS):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - start)
        return best

    fits = []
    for direction in ("out", "in"):
        times = []
        for n in (1, many):
            ids = list(range(n))
            if direction == "out":
                times.append(timed(lambda ids=ids: swap.copy_out(ids)))
            else:
                data = swap.copy_out(ids)
                times.append(timed(lambda ids=ids, data=data: swap.copy_in(ids, data)))
        per_byte = max(times[1] - times[0], 0.0) / ((many - 1) * block_bytes)
        if per_byte == 0.0:  # timing noise: a proportional model
            per_byte = times[1] / (many * block_bytes)
        fits.append((max(times[0] - per_byte * block_bytes, 0.0), per_byte))
    (out_fixed, out_per_byte), (in_fixed, in_per_byte) = fits
    return SwapProfile(out_fixed, out_per_byte, in_fixed, in_per_byte)


def profile_dir() -> Path:
    """Where measured profiles are kept across processes."""
    return covey_home() / "profiles"


def _disk_key(
    kind: str, key: tuple[object, ...], device: torch.device, threads: int | None
) -> str:
    """Everything a measured fit depends on besides the engine's own key."""
    machine = _cpu_name()
    if device.type == "cuda":
        machine += f" / {torch.cuda.get_device_name(device)}"
    threads = threads or torch.get_num_threads()
    return repr((kind, *key, torch.__version__, threads, machine, PROFILE_VERSION))


def _path(kind: str, text: str) -> Path:
    return profile_dir() / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"


def _load(cls, kind: str, text: str):
    """The fit stored under `text` (a `_disk_key`), or None when absent, unreadable,
    corrupt or stale."""
    path = _path(kind, text)
    try:
        if time.time() - path.stat().st_mtime > PROFILE_MAX_AGE_S:
            return None  # stale: measured again and rewritten
        data = json.loads(path.read_text())
        if data["key"] != text:  # a hash collision or a hand-edited file: measure again
            return None
        fields = {f.name: float(data["fit"][f.name]) for f in dataclasses.fields(cls)}
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not all(math.isfinite(v) and v >= 0.0 for v in fields.values()):
        return None
    return cls(**fields)


def _store(profile, kind: str, text: str) -> None:
    """Write the fit under `text` atomically (a temporary file renamed over the target)."""
    path = _path(kind, text)
    body = json.dumps({"key": text, "fit": dataclasses.asdict(profile)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(
            path, lambda tmp: tmp.write_text(body), path.with_name(f"{path.name}.tmp{os.getpid()}")
        )
    except OSError:  # a read-only or full home: the next start measures again
        pass


@cache
def _cpu_name() -> str:
    """The CPU model (a profile measured on another CPU says nothing about this one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return f"{platform.processor() or 'unknown'} ({platform.machine()})"
