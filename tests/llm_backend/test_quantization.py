"""Weight-only int8: both kernels compute the same function, and the model still answers."""

from __future__ import annotations

import pytest
import torch

from covey.llm_backend.config import EngineConfig
from covey.llm_backend.llm_engine import LLMEngine
from covey.llm_backend.quantization import INT8_MAX_ROWS, Int8Linear
from covey.llm_backend.sampling_params import SamplingParams


def test_int8_kernel_and_bf16_copy_agree():
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    layer = Int8Linear(weight, bias, torch.bfloat16)
    x = torch.randn(INT8_MAX_ROWS + 8, 64).bfloat16()
    small = layer(x[:INT8_MAX_ROWS])  # int8 kernel
    large = layer(x)  # bf16 copy of the same quantized weights
    torch.testing.assert_close(small, large[:INT8_MAX_ROWS], atol=0.15, rtol=0.02)
    exact = x.float() @ weight.t() + bias
    assert (large.float() - exact).abs().max() < 0.05 * exact.abs().max()


def test_int8_engine_keeps_the_models_answers():
    bf16 = LLMEngine(EngineConfig(dtype="bfloat16", device="cpu", kv_cache_tokens=1024))
    int8 = LLMEngine(
        EngineConfig(dtype="bfloat16", device="cpu", kv_cache_tokens=1024, quantization="int8")
    )
    prompts = ["The capital of France is", "def add(a, b):\n    return"]
    params = SamplingParams(max_tokens=4)
    for engine in (bf16, int8):
        for p in prompts:
            engine.add_request(p, params, request_id=p)
    texts = {}
    for name, engine in (("bf16", bf16), ("int8", int8)):
        for out in engine.run_to_completion(prompts):
            texts[name, out.request_id] = out.text
    assert "Paris" in texts["int8", prompts[0]]
    assert texts["int8", prompts[1]].split()[0] == texts["bf16", prompts[1]].split()[0]


def test_int8_needs_bfloat16():
    with pytest.raises(ValueError, match="needs dtype='bfloat16'"):
        LLMEngine(EngineConfig(model="dummy:tiny", dtype="float32", quantization="int8"))
    with pytest.raises(ValueError, match="quantization must be None or 'int8'"):
        EngineConfig(quantization="int4")
