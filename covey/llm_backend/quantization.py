"""Weight-only int8 quantization for memory-bound decoding on CPU.

Decoding one token reads every weight once, so its speed is the memory bandwidth divided
by the bytes read: the int8 kernel reads half of bf16's. Small batches (decode steps) use
it; large ones (prefill, wide batches) are compute-bound and run a bf16 copy of the same
quantized weights. Memory is therefore ~1.5x bf16's, and the two kernels agree to bf16
rounding (not bit for bit), so a greedy output can differ when a batch crosses
INT8_MAX_ROWS tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from covey.errors import ConfigError

INT8_MAX_ROWS = 16  # up to this many tokens the int8 kernel beats bf16 (measured on AVX512)


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        w = weight.detach().float()  # [N, K]
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [N]
        qweight = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)  # [N, K]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("weight", (qweight.float() * scales[:, None]).to(dtype))
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[0] <= INT8_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.qweight, self.scales)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)


def quantize_int8(model: nn.Module) -> None:
    """Swap the decoder's projections (and the LM head) for Int8Linear, in place."""
    dtype = model.embed_tokens.weight.dtype
    if dtype != torch.bfloat16:
        raise ConfigError(
            f"quantization='int8' needs dtype='bfloat16' (its kernel is bf16); the model is "
            f"{str(dtype).removeprefix('torch.')}: pass dtype='bfloat16'"
        )
    for layer in model.layers:
        for parent, name in (
            (layer.self_attn, "qkv_proj"),
            (layer.self_attn, "o_proj"),
            (layer.mlp, "gate_up_proj"),
            (layer.mlp, "down_proj"),
        ):
            linear = getattr(parent, name)
            setattr(parent, name, Int8Linear(linear.weight, linear.bias, dtype))
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.lm_head = Int8Linear(head, None, dtype)
