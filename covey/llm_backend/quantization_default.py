"""Which weight quantization `quantization="auto"` (the default) picks, by measurement.

Measured on the embedded SmolLM2-135M (benchmarks/engine.py, one run, CPU, bf16 compute):
int4 decodes about 2x faster than bf16 and int8 1.5x, and both stay within 1% of bf16's
perplexity on held-out Python-docs text. int4 is nearly lossless there because the GGUF's
own weights are already 4-bit in groups of 32, which int4 re-packs almost exactly; from a
checkpoint with denser weights int4 would lose more, so "auto" takes int4 only when the file
is already 4-bit, int8 from other GGUF quantizations, and dense weights otherwise (a bf16 or
float32 checkpoint is the user's choice of precision). The kernels are CPU-only and bf16:
on CUDA, or with float32 compute, "auto" is dense.
"""

from __future__ import annotations

import torch

from covey.llm_backend.model_source import ModelSource, gguf_reader

FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS")
DENSE = ("F32", "F16", "BF16")


def auto_quantization(source: ModelSource, device: torch.device, dtype: torch.dtype) -> str | None:
    """The mode "auto" means for these weights on this device and compute dtype."""
    if device.type != "cpu" or dtype != torch.bfloat16 or source.format != "gguf":
        return None
    kinds = _projection_types(source)
    if kinds and all(k.startswith(FOUR_BIT) for k in kinds):
        return "int4"
    if kinds and not any(k in DENSE for k in kinds):
        return "int8"
    return None


def _projection_types(source: ModelSource) -> set[str]:
    """The GGUF tensor types of the decoder's 2-D projection weights (header only)."""
    try:
        reader = gguf_reader(source.path)
    except Exception:  # unreadable here: the loader reports it with its own message
        return set()
    return {
        t.tensor_type.name
        for t in reader.tensors
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2
    }
