"""Weight-only int8 and int4 quantization for memory-bound decoding on CPU.

Decoding one token reads every weight once, so its speed is the memory bandwidth divided by
the bytes read: int8 reads half of bf16's, int4 a quarter. Up to KERNEL_MAX_ROWS tokens a
step runs torch's weight-only kernels, which read the packed weights directly
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`). Wider steps (prefill, large
batches) are compute-bound: there those kernels lose to a bf16 matmul, so the layer
dequantizes its weight into a temporary that lives for that one matmul. No dense copy of a
quantized weight is ever stored.

- int8: one scale per output channel, symmetric.
- int4: groups of INT4_GROUP_SIZE (32) input channels, each with a scale and a zero point
  (asymmetric min/max, as gpt-fast does), packed in the CPU kernel's layout.
- The LM head is int8 in both modes: with tied embeddings the same int8 table also serves
  the embedding lookup, so it is stored once (an int4-packed table cannot be read row by
  row). An int4 head was not measured.
Both kernels are bf16 on CPU (their float32 paths are reference loops, ~10x slower than a
float32 matmul), so quantization needs dtype='bfloat16'.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from covey.errors import ConfigError, NotSupportedError
from covey.llm_backend.config import QUANTIZATION_MODES

# Up to this many tokens in a step the weight-only kernels beat dequantize + bf16 matmul
# (measured on this project's AVX512-BF16 CPU: at 32 rows they are level, beyond it the
# matmul wins by up to 2x).
KERNEL_MAX_ROWS = 32
# The embedded GGUF is Q4_1 (min/max groups of 32): int4 in the same groups re-packs it
# almost losslessly, where groups of 64 cost +35% perplexity.
INT4_GROUP_SIZE = 32
# How far each mode's perplexity on held-out text may stray from its reference (bfloat16
# from float32, the quantized modes from bfloat16), as tests/llm_backend/test_quantization.py
# checks on the embedded model. int4 meets 1% there because that GGUF is already Q4_1 in
# groups of 32; re-quantizing a bf16 checkpoint to int4 costs more.
PERPLEXITY_TOLERANCE = {"bfloat16": 0.01, "int8": 0.01, "int4": 0.01}
_INT4_BLOCK_N = 64  # output channels per block of _convert_weight_to_int4pack_for_cpu


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one scale per output channel."""

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

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel computes with, [N, K] in the compute dtype (a temporary)."""
        return self.qweight * self.scales[:, None]  # int8 x bf16 promotes to bf16, one pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= KERNEL_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.qweight, self.scales)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.dequantized(), self.bias)


class Int4Linear(nn.Module):
    """A Linear whose weight is int4 in groups of `group_size` input channels, each group
    with its own scale and zero point: w = (q - 8) * scale + zero, q in [0, 15]."""

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

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel computes with, [N, K] in the compute dtype (a temporary)."""
        if not self.unpackable:
            raise NotSupportedError(
                "this torch build packs int4 weights in a layout covey cannot read"
            )
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        dtype = self.scale_zero.dtype
        q = _unpack(self.packed, dtype).reshape(n, k // self.group_size, self.group_size)  # q - 8
        scale, zero = self.scale_zero.transpose(0, 1).unsqueeze(-1).unbind(-2)  # [N, G, 1]
        # in place, two passes: a broadcasting addcmul is ~4x slower on CPU
        return q.mul_(scale).add_(zero).reshape(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= KERNEL_MAX_ROWS or not self.unpackable:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.contiguous(), self.packed, self.group_size, self.scale_zero
            )
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.dequantized(), self.bias)


def _unpack(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int4 values less 8 [N, K] (in [-8, 7], as `dtype`) from the kernel's layout:
    blocks of 64 output channels, within a block K rows of 32 bytes, the low nibble holding
    channel c and the high nibble channel c + 32."""
    n, k = packed.shape[0], packed.shape[1] * 2
    blocks = packed.reshape(n // _INT4_BLOCK_N, k, _INT4_BLOCK_N // 2)
    blocks = blocks.transpose(1, 2).contiguous()  # [N/64, 32, K]: transposed as bytes, cheap
    nibbles = torch.stack([blocks & 15, blocks >> 4], dim=1).view(torch.int8)
    return nibbles.sub_(8).to(dtype).reshape(n, k)


@functools.cache
def _layout_is_readable() -> bool:
    """Whether `_unpack` reads what this torch build's packing writes (checked once)."""
    q = torch.randint(0, 16, (2 * _INT4_BLOCK_N, 64), generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return torch.equal(_unpack(packed, torch.float32), q.float() - 8)


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
    (and tied embeddings) for int8, in place; the dense weights they replace are freed."""
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
    layer_type = Int8Linear if mode == "int8" else Int4Linear
    for layer in model.layers:
        for parent, name in (
            (layer.self_attn, "qkv_proj"),
            (layer.self_attn, "o_proj"),
            (layer.mlp, "gate_up_proj"),
            (layer.mlp, "down_proj"),
        ):
            linear = getattr(parent, name)
            setattr(parent, name, layer_type(linear.weight, linear.bias, dtype))
    tied = model.lm_head is None
    head = model.embed_tokens.weight if tied else model.lm_head.weight
    model.lm_head = Int8Linear(head, None, dtype)
    if tied:
        model.embed_tokens = Int8Embedding(model.lm_head)


def quantization_of(model: nn.Module) -> str | None:
    """The mode `quantize` applied to `model`, or None for dense weights."""
    proj = model.layers[0].mlp.down_proj
    if isinstance(proj, Int4Linear):
        return "int4"
    return "int8" if isinstance(proj, Int8Linear) else None
