"""Weight-only int8 and int4 quantization for memory-bound decoding on CPU.

Decoding one token reads every weight once, so its speed is the memory bandwidth divided by
the bytes read: int8 reads half of bf16's, int4 a quarter. Up to KERNEL_MAX_ROWS tokens a
step (INT4_KERNEL_MAX_ROWS for int4) runs torch's weight-only kernels, which read the
packed weights directly (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`). Wider steps
(prefill, large batches) are compute-bound: there those kernels lose to a bf16 matmul, so
the layer dequantizes its weight into a temporary that lives for that one matmul.

Dense copies (`EngineConfig.dense_prefill_weights`, `keep_dense_copies`): a layer may also
keep its dequantized weight as a bf16 tensor, built once at load from the quantized weight
(so the math stays the quantized model's: bit-equal to dequantize + matmul), and run every
step of at least DENSE_MIN_ROWS rows (int8: INT8_DENSE_MIN_ROWS) on it. Blended chunk reuse
computes steps of ~80-270 rows, where the int4 kernel's cost grows with every row and wider
steps pay the dequantization on every call; the copy pays neither, for the bytes of a bf16
model's projections held besides the packed ones (the embedded model: 212 MB). They are off
by default (issue 14: a quantized mode keeps no second dense copy; its point is fewer
bytes) and opt-in: True keeps them, None keeps them when they cost at most
DENSE_COPY_MAX_BYTES, so a 1B-class model stays as it was. With copies, an eager decode
batch of DENSE_MIN_ROWS sequences or more runs on the copy, whose bits depend on the batch
(the int4 kernel's do not), so a seeded output can depend on what else was running.
Narrower steps, and every compiled decode step, keep the weight-only kernels: decode is
bound by the bytes it reads, a quarter (int4) or half (int8) of bf16's.
Measured on the embedded model (2026-11-30, a loaded 2-core machine, A/B interleaved in one
process, so relative figures only): on rag_kv.py --quick's requests, blend-0 reached its
first token 1.20x sooner with the copies at 1 thread (1.17x at 2) and full prefill 1.06x
(1.10x), its long steps being attention-heavy; eager batch-1 decode TPOT was unchanged
(old/new 0.99-1.00), eager batch-32 decode 1.09x faster. The compiled decode graph (up to
KERNEL_MAX_ROWS sequences) keeps the kernels: running batches of 24 and 32 eagerly on the
copies instead was level with it (0.98x and 1.02x), so nothing there would gain. Memory:
the copies add their 212 MB to the live heap (RSS after malloc_trim 1742 -> 1944 MiB), not
to the peak (~2.3 GiB either way: loading holds a dense model before quantize frees it).

The int4 dequantization is what a prefill pays over bf16, so it is written to be cheap: the
nibbles are split on contiguous words (eight at once), the weight is produced transposed
([K, N], which the kernel's packing yields in runs of 64 channels, where [N, K] needs a
byte-by-byte transpose) by two strided copies of whole words, the -8 offset is one bytewise
int8 subtraction, scale and zero are applied in one addcmul along its rows, and every
temporary lives in a per-thread workspace reused by each layer (fresh multi-megabyte
allocations page-fault on first touch, every layer, every step). The embedded model's 120
projections dequantize in 66 ms at 1 thread (fastest of 6, interleaved with the previous
version in one process on a loaded 2-core machine: 86 ms, which masked and shifted through
the strided transposed view; at 2 threads 42 against 48 ms, the load leaving a second
thread little). What is left is mostly the float half, the int8 -> bf16 copy and the
addcmul (60% of it), which ATen computes at 8 and 4.5 elements a ns whether or not the
data is in cache: fusing the whole dequantization into one loop (a torch.compile'd version
measured 2.5x faster per layer) would need the engine's compile setting, which these layers
do not see.

- int8: one scale per output channel, symmetric.
- int4: groups of INT4_GROUP_SIZE (32) input channels, each with a scale and a zero point
  (asymmetric min/max, as gpt-fast does), packed in the CPU kernel's layout.
- The LM head is int8 in both modes: with tied embeddings the same int8 table also serves
  the embedding lookup, so it is stored once. An int4 head (groups of 32, the kernel's
  smallest) was measured and lost: perplexity on 8 held-out 512-token windows 19.15
  against bf16's 18.06 (+6.0%; int4 layers with the int8 head: 18.04). The loss is in the
  logits, not the lookup (an int4 head with an int8 embedding table: 19.12), and rescoring
  the int4 head's top 128 logits from the int8 rows still leaves +1.0% (top 32: +1.6%).
  Bytes per decoded token are not where covey loses to llama.cpp either: the embedded
  GGUF's Q4_1 layers (66.4 MB) and Q8_0 token_embd, its tied output (30.1 MB), against
  int4 layers (53.1 MB packed + 13.3 MB scale/zero) and this int8 head (28.3 MB).
Both kernels are bf16 on CPU (their float32 paths are reference loops, ~10x slower than a
float32 matmul), so quantization needs dtype='bfloat16'.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from covey.errors import ConfigError, NotSupportedError
from covey.llm_backend.config import QUANTIZATION_MODES

# Up to this many tokens in a step the weight-only kernels beat dequantize + bf16 matmul
# (int8, measured on this project's AVX512-BF16 CPU: at 32 rows they are level, beyond it
# the matmul wins by up to 2x).
KERNEL_MAX_ROWS = 32
# The int4 kernel holds out longer, as its dequantization costs more. The embedded model's
# 120 projections (its shapes, random weights), kernel vs dequantize + matmul, ms, fastest
# of 5, interleaved in one process on a shared 2-core machine (load 3-4): 1 thread 82 vs
# 114 at 32 rows, 121 vs 130 at 48, 161 vs 144 at 64, 208 vs 163 at 82, 321 vs 211 at
# 128; 2 threads 44 vs 67 at 32, 62 vs 84 at 48, 83 vs 86 at 64, 108 vs 101 at 82, 123
# vs 102 at 96, 163 vs 117 at 128. The kernel's cost grows ~1.3 ms a row (2 threads).
INT4_KERNEL_MAX_ROWS = 64
# The embedded GGUF is Q4_1 (min/max groups of 32): int4 in the same groups re-packs it
# almost losslessly, where groups of 64 cost +35% perplexity.
INT4_GROUP_SIZE = 32
# How far each mode's perplexity on held-out text may stray from its reference (bfloat16
# from float32, the quantized modes from bfloat16), as tests/llm_backend/test_quantization.py
# checks on the embedded model. int4 meets 1% there because that GGUF is already Q4_1 in
# groups of 32; re-quantizing a bf16 checkpoint to int4 costs more.
PERPLEXITY_TOLERANCE = {"bfloat16": 0.01, "int8": 0.01, "int4": 0.01}
_INT4_BLOCK_N = 64  # output channels per block of _convert_weight_to_int4pack_for_cpu
# From this many rows a step runs on an int4 layer's dense copy where it keeps one (module
# docstring); below, the weight-only kernel. The embedded model's 120 projections, copy's
# speed over the kernel's (1 thread, interleaved on a loaded machine; 2 threads the same
# within noise): 0.48x at 8 rows, 0.77x at 16, level at 24, 1.16x at 32, 1.8x at 82, 2.1x
# at 128; over dequantize + matmul 1.3x at 150, 1.2x at 256 and 512 (since the faster
# dequantization, 1 thread, fastest of 4; before it 1.4x, 1.3x and 1.2x in the same run).
DENSE_MIN_ROWS = 24
# The int8 kernel is slower per row: the copy wins from about 16 (0.81x at 8 rows, 1.17x at
# 16, 1.5x at 24 and 32; over dequantize + matmul 1.2-1.6x from 64 to 512 rows).
INT8_DENSE_MIN_ROWS = 16
# The int8 kernel reads the whole weight again for every few rows, so on a layer much
# larger than the cache (the LM head: 49152 x 576, 28 MB) its cost grows ~1.4 ms a row (1
# thread). Called on slices of KERNEL_CHUNK_CHANNELS output channels, each slice is read from
# cache by every row. A helper's scratch timing, not a committed result: the head, fastest
# of 7, interleaved in one process, 1 thread (load ~2.3): 11.4 -> 9.8 ms at 8 rows,
# 17.0 -> 13.2 at 12, 28.1 -> 18.9 at 19, 46.1 -> 28.1 at 32; level at 1 row (3.5), so
# narrower steps keep one call. Bit-equal: every output channel is the same dot product.
# Steps of 2-7 rows and two threads were not measured.
KERNEL_CHUNK_CHANNELS = 8192
KERNEL_CHUNK_MIN_ROWS = 8
# The dense copies kept under the default: at most this many bytes for the whole model
# (SmolLM2-135M's projections: 212 MB in bf16; a 1.7B model's ~3.4 GB stays without).
DENSE_COPY_MAX_BYTES = 1 << 30


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one scale per output channel."""

    kernel_max_rows = KERNEL_MAX_ROWS
    dense_min_rows = INT8_DENSE_MIN_ROWS

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        w = weight.detach().float()  # [N, K]
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [N]
        qweight = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)  # [N, K]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(dtype))  # [N]
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        )
        self.register_buffer("dense", None, persistent=False)  # see keep_dense_copies
        self.has_dense = False

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel computes with, [N, K] in the compute dtype (a temporary)."""
        return self.qweight * self.scales[:, None]  # int8 x bf16 promotes to bf16, one pass

    def keep_dense(self) -> None:
        """Keep `dequantized()` for steps of INT8_DENSE_MIN_ROWS rows or more."""
        self.dense = self.dequantized()
        self.has_dense = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_dense(self, x):
            return F.linear(x, self.dense, self.bias)
        if x.shape[0] <= self.kernel_max_rows:
            out = self._kernel(x.contiguous())
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.dequantized(), self.bias)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The weight-only kernel, by slices of output channels on a wide layer and step
        (KERNEL_CHUNK_CHANNELS). The layer's width is checked first: it is static, so the
        compiled decode graph's int8 projections never compare the dynamic row count."""
        n = self.qweight.shape[0]
        if (
            n < 2 * KERNEL_CHUNK_CHANNELS
            or torch.compiler.is_compiling()
            or x.shape[0] < KERNEL_CHUNK_MIN_ROWS
        ):
            return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        slices = [
            torch.ops.aten._weight_int8pack_mm(
                x,
                self.qweight[i : i + KERNEL_CHUNK_CHANNELS],
                self.scales[i : i + KERNEL_CHUNK_CHANNELS],
            )
            for i in range(0, n, KERNEL_CHUNK_CHANNELS)
        ]
        return torch.cat(slices, dim=1)


class Int4Linear(nn.Module):
    """A Linear whose weight is int4 in groups of `group_size` input channels, each group
    with its own scale and zero point: w = (q - 8) * scale + zero, q in [0, 15]."""

    kernel_max_rows = INT4_KERNEL_MAX_ROWS
    dense_min_rows = DENSE_MIN_ROWS

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        group_size: int = INT4_GROUP_SIZE,
    ):
        super().__init__()
        n, k = weight.shape
        if k % group_size:
            raise NotSupportedError(
                f"quantization='int4' needs input sizes divisible by {group_size}; "
                f"a projection of this model has {k}: use quantization='int8'"
            )
        self.group_size = group_size
        w = weight.detach().float().reshape(n, k // group_size, group_size)
        low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scale = (high - low).clamp(min=1e-6) / 15.0  # [N, G, 1]
        q = ((w - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        zero = low + 8.0 * scale  # the kernel subtracts 8 from q before scaling
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # [G, N, 2]: (scale, zero) per group and output channel, the kernel's layout
        self.register_buffer(
            "scale_zero", torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
        )
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        )
        # The wide-step path reads the packed layout itself; where this torch build packs
        # differently from what `_unpack` expects, wide steps use the kernel too.
        self.unpackable = n % _INT4_BLOCK_N == 0 and _layout_is_readable()
        # see keep_dense_copies: [K, N], the wide path's own layout, so that F.linear runs
        # the same matmul on it as on the workspace (bit-equal results)
        self.register_buffer("dense_t", None, persistent=False)
        self.has_dense = False

    @property
    def dense(self) -> torch.Tensor | None:
        """The kept dense weight as [N, K] (a view), or None."""
        return None if self.dense_t is None else self.dense_t.t()

    def keep_dense(self) -> None:
        """Keep the dequantized weight for steps of DENSE_MIN_ROWS rows or more."""
        self.dense_t = self._dequantize_into_workspace().t().clone()
        self.has_dense = True

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel computes with, [N, K] in the compute dtype (a copy of its
        own: callers may hold several)."""
        return self._dequantize_into_workspace().clone()

    def _dequantize_into_workspace(self) -> torch.Tensor:
        """`dequantized()` without the copy, for the wide matmul: a view of this thread's
        workspace, valid only until the next int4 layer dequantizes on this thread."""
        if not self.unpackable:
            raise NotSupportedError(
                "this torch build packs int4 weights in a layout covey cannot read"
            )
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        groups = k // self.group_size
        weight_t = _unpack_transposed(self.packed, self.scale_zero.dtype)  # [K, N]: q - 8
        by_group = weight_t.view(groups, self.group_size, n)
        # [G, 1, N] each, contiguous (addcmul reads strided ones 8x slower), in one copy
        scale, zero = self.scale_zero.permute(2, 0, 1).unsqueeze(2).contiguous()
        # one pass, rounded once, as the kernel computes (12% faster than mul_ then add_)
        torch.addcmul(zero, by_group, scale, out=by_group)
        return weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Traced by torch.compile (fullgraph, dynamic batch), the kernel serves every width:
        # the wide path's per-thread workspace cannot be traced. CompiledDecode keeps wider
        # steps eager, so this only guards other compiled callers; correct, just slower.
        if _use_dense(self, x):
            return F.linear(x, self.dense, self.bias)
        if (
            x.shape[0] <= self.kernel_max_rows
            or not self.unpackable
            or torch.compiler.is_compiling()
        ):
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.contiguous(), self.packed, self.group_size, self.scale_zero
            )
            return out if self.bias is None else out + self.bias
        return F.linear(x, self._dequantize_into_workspace(), self.bias)


def _use_dense(layer: Int8Linear | Int4Linear, x: torch.Tensor) -> bool:
    """Whether this step runs on the layer's dense copy. Never inside torch.compile: the
    compiled decode graph keeps the kernels (decode reads bytes; a branch on the batch size
    inside the graph's dynamic range would also trace it again mid-serving: so the row
    count is not even compared while tracing, which would guard the graph on it). Cheap
    first: a decode step asks this of every layer (`has_dense` is a plain attribute, where
    a buffer goes through Module.__getattr__)."""
    return (
        layer.has_dense and not torch.compiler.is_compiling() and x.shape[0] >= layer.dense_min_rows
    )


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F  # the low nibble of each byte of a 64-bit word


def _unpack_transposed(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int4 values less 8, transposed: [K, N] in `dtype` (in this thread's workspace).

    The kernel's layout: blocks of 64 output channels, within a block K rows of 32 bytes,
    the low nibble holding channel c and the high nibble c + 32. So row k of the transpose
    is, per block, the 32 low nibbles of that row's bytes, then the 32 high ones: whole
    words move, no byte is transposed. Only the two copies that move them are strided
    (runs of 32 bytes, the cost of this function's integer half); every other pass runs
    over contiguous memory, where torch vectorizes it (the first version masked and shifted
    on the strided view itself: four times slower)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    blocks = n // _INT4_BLOCK_N
    high = _workspace("high", (blocks, k, 8), torch.int32)  # each byte's high nibble, low
    torch.bitwise_right_shift(packed.view(torch.int32).view(blocks, k, 8), 4, out=high)
    nibbles = _workspace("nibbles", (k, blocks, 2, 4), torch.int64)
    nibbles[:, :, 0].copy_(packed.view(torch.int64).view(blocks, k, 4).transpose(0, 1))
    nibbles[:, :, 1].copy_(high.view(torch.int64).view(blocks, k, 4).transpose(0, 1))
    nibbles.bitwise_and_(_LOW_NIBBLES)
    values = nibbles.view(torch.int8).view(k, n).sub_(8)  # bytewise: nothing borrows
    return _workspace("weight", (k, n), dtype).copy_(values)


_workspaces = threading.local()


def _workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A scratch tensor reused by every layer on this thread, grown to the largest asked
    for (a few MB for the embedded model: its largest projection, about 100 MB for a
    1B-class model) and kept for the thread's life. Per thread, because engines on
    different threads dequantize at the same time."""
    buffers = _workspaces.__dict__
    nbytes = dtype.itemsize * functools.reduce(lambda a, b: a * b, shape, 1)
    buffer = buffers.get(name)
    if buffer is None or buffer.numel() < nbytes:
        # a normal tensor, which inference mode may write too (an inference tensor could
        # not be written outside it): one buffer serves both modes
        with torch.inference_mode(False):
            buffer = buffers[name] = torch.empty(nbytes, dtype=torch.uint8)
    return buffer[:nbytes].view(dtype).view(shape)


@functools.cache
def _layout_is_readable() -> bool:
    """Whether `_unpack_transposed` reads what this torch build's packing writes (checked
    once)."""
    q = torch.randint(0, 16, (2 * _INT4_BLOCK_N, 64), generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return torch.equal(_unpack_transposed(packed, torch.float32), q.t().float() - 8)


class Int8Embedding(nn.Module):
    """Token embeddings read from a tied int8 LM head: the rows the step needs are
    dequantized, so the table exists once, in int8."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.head = head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.head.qweight[ids].to(self.head.scales.dtype)  # [T, hidden]
        return rows * self.head.scales[ids].unsqueeze(-1)


def quantize(model: nn.Module, mode: str) -> None:
    """Swap the decoder's projections for `mode` ("int8" or "int4") layers and the LM head
    (and tied embeddings) for int8, in place; the dense weights they replace are freed.
    Raises before changing anything when the model cannot be quantized so."""
    if mode not in QUANTIZATION_MODES:
        raise ConfigError(f"quantization must be one of {QUANTIZATION_MODES}, got {mode!r}")
    dtype = model.norm.weight.dtype
    if dtype != torch.bfloat16:
        raise ConfigError(
            f"quantization={mode!r} needs dtype='bfloat16' (its kernels are bf16); the model "
            f"is {str(dtype).removeprefix('torch.')}: pass dtype='bfloat16'"
        )
    if model.norm.weight.device.type != "cpu":
        raise NotSupportedError(
            f"quantization={mode!r} runs CPU kernels; the model is on "
            f"{model.norm.weight.device}: use quantization=None there"
        )
    projections = [
        (i, parent, name)
        for i, layer in enumerate(model.layers)
        for parent, name in (
            (layer.self_attn, "qkv_proj"),
            (layer.self_attn, "o_proj"),
            (layer.mlp, "gate_up_proj"),
            (layer.mlp, "down_proj"),
        )
    ]
    # Every check before any swap: a late refusal must not leave a half-quantized model.
    for i, parent, name in projections if mode == "int4" else ():
        k = getattr(parent, name).weight.shape[1]
        if k % INT4_GROUP_SIZE:
            raise NotSupportedError(
                f"quantization='int4' needs input sizes divisible by {INT4_GROUP_SIZE}; "
                f"layer {i}'s {name} has {k}: use quantization='int8'"
            )
    layer_type = Int8Linear if mode == "int8" else Int4Linear
    for _, parent, name in projections:
        linear = getattr(parent, name)
        setattr(parent, name, layer_type(linear.weight, linear.bias, dtype))
    tied = model.lm_head is None
    head = model.embed_tokens.weight if tied else model.lm_head.weight
    model.lm_head = Int8Linear(head, None, dtype)
    if tied:
        model.embed_tokens = Int8Embedding(model.lm_head)


def keep_dense_copies(
    model: nn.Module, wanted: bool | None, max_bytes: int = DENSE_COPY_MAX_BYTES
) -> int:
    """Give each quantized projection of `model` a dense copy of its weight (module
    docstring) when `wanted`, or under None when all of them together cost at most
    `max_bytes`; returns the bytes the copies hold (0: none kept). A dense model is left
    as it is. The LM head keeps none: steps compute logits for a few rows only."""
    layers = [
        m
        for m in model.layers.modules()
        if isinstance(m, Int8Linear) or (isinstance(m, Int4Linear) and m.unpackable)
    ]
    nbytes = sum(_dense_bytes(m) for m in layers)
    if not layers or wanted is False or (wanted is None and nbytes > max_bytes):
        return 0
    with torch.no_grad():
        for layer in layers:
            layer.keep_dense()
    return nbytes


def dense_copy_bytes(model: nn.Module) -> int:
    """The bytes `keep_dense_copies` holds in `model` now."""
    return sum(
        m.dense.numel() * m.dense.element_size()
        for m in model.modules()
        if isinstance(m, (Int8Linear, Int4Linear)) and m.dense is not None
    )


def _dense_bytes(layer: Int8Linear | Int4Linear) -> int:
    """What `layer.keep_dense()` would hold: its [N, K] weight in the compute dtype."""
    if isinstance(layer, Int8Linear):
        (n, k), itemsize = layer.qweight.shape, layer.scales.element_size()
    else:
        n, k = layer.packed.shape[0], layer.packed.shape[1] * 2
        itemsize = layer.scale_zero.element_size()
    return n * k * itemsize


def quantization_of(model: nn.Module) -> str | None:
    """The mode `quantize` applied to `model`, or None for dense weights."""
    proj = model.layers[0].mlp.down_proj
    if isinstance(proj, Int4Linear):
        return "int4"
    return "int8" if isinstance(proj, Int8Linear) else None
