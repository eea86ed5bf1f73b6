"""Dense copies of quantized weights (EngineConfig.dense_prefill_weights): wide steps on the
copy compute exactly what dequantize + matmul computed, narrow ones keep the kernels, the
default keeps copies only under the byte cap, and the knob's mistakes are clear errors."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from covey.errors import ConfigError
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.model import LlamaModel
from covey.llm_backend.model_args import ModelArgs
from covey.llm_backend.model_source import resolve_model
from covey.llm_backend.perplexity import model_logits
from covey.llm_backend.quantization import (
    KERNEL_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    dense_copy_bytes,
    keep_dense_copies,
    quantize,
)
from covey.llm_backend.weight_loader import load_model

LAYERS = {"int8": Int8Linear, "int4": Int4Linear}


def _pair(mode: str, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same quantized layer twice: without a dense copy and with one."""
    torch.manual_seed(seed)
    plain = LAYERS[mode](torch.randn(192, 128) * 0.05, torch.randn(192), torch.bfloat16)
    dense = copy.deepcopy(plain)
    dense.keep_dense()
    return plain, dense


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_wide_steps_on_the_copy_are_bit_equal_to_dequantize_and_matmul(mode):
    plain, dense = _pair(mode, 0)
    assert dense.dense is not None and plain.dense is None
    assert torch.equal(dense.dense, plain.dequantized())  # the quantized weight, exactly
    rows = plain.kernel_max_rows + 33  # past where the old path dequantized per call
    x = torch.randn(rows, 128).bfloat16()
    with torch.inference_mode():
        assert torch.equal(dense(x), plain(x))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_steps_between_the_thresholds_use_the_copy_and_stay_close_to_the_kernel(mode):
    plain, dense = _pair(mode, 1)
    x = torch.randn(plain.dense_min_rows, 128).bfloat16()
    with torch.inference_mode():
        kernel, ours = plain(x).float(), dense(x).float()
        matmul = torch.nn.functional.linear(x, plain.dequantized(), plain.bias).float()
    assert torch.equal(ours, matmul)  # it took the dense path
    assert (ours - kernel).abs().max() < 0.02 * kernel.abs().max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_decode_steps_below_the_threshold_keep_the_kernel(mode):
    plain, dense = _pair(mode, 2)
    for rows in (1, plain.dense_min_rows - 1):
        x = torch.randn(rows, 128).bfloat16()
        with torch.inference_mode():
            assert torch.equal(dense(x), plain(x))


def test_compiled_steps_keep_the_kernel():
    """CompiledDecode's graph (up to KERNEL_MAX_ROWS sequences) reads the packed weights:
    traced with a copy present, a step wider than DENSE_MIN_ROWS gives the kernel's bits, and
    the one graph serves batches on both sides of it (no guard on the row count)."""
    plain, dense = _pair("int4", 3)
    compiled = torch.compile(lambda x: dense(x), backend="eager", dynamic=True, fullgraph=True)
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (KERNEL_MAX_ROWS, dense.dense_min_rows - 1, 2):
            x = torch.randn(rows, 128).bfloat16()
            assert torch.equal(compiled(x), plain(x))


def _tiny_model(mode: str) -> tuple[LlamaModel, int]:
    """A small random model quantized to `mode`, and the bf16 bytes of its projections."""
    torch.manual_seed(4)
    args = ModelArgs(256, 64, 2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    model = LlamaModel(args).to(torch.bfloat16)
    linears = [m for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(m.weight.numel() * 2 for m in linears)  # the LM head keeps none
    quantize(model, mode)
    return model, nbytes


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_default_keeps_copies_only_under_the_byte_cap(mode):
    model, expected = _tiny_model(mode)
    assert keep_dense_copies(model, None, max_bytes=expected - 1) == 0  # over the cap: off
    assert dense_copy_bytes(model) == 0
    assert keep_dense_copies(model, None, max_bytes=expected) == expected
    assert dense_copy_bytes(model) == expected
    assert model.lm_head.dense is None

    model, _ = _tiny_model(mode)
    assert keep_dense_copies(model, True, max_bytes=1) == expected  # asked for: kept
    model, _ = _tiny_model(mode)
    assert keep_dense_copies(model, False) == 0 and dense_copy_bytes(model) == 0


def test_a_dense_model_gets_no_copies():
    torch.manual_seed(5)
    args = ModelArgs(256, 64, 2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    model = LlamaModel(args).to(torch.bfloat16)
    assert keep_dense_copies(model, True) == 0


def test_the_knob_is_validated():
    assert EngineConfig().dense_prefill_weights is False  # opt-in: issue 14 keeps no copy
    with pytest.raises(ConfigError, match="dense_prefill_weights must be None.*got 'yes'"):
        EngineConfig(dense_prefill_weights="yes")
    with pytest.raises(ConfigError, match="quantization=None keeps the weights dense"):
        EngineConfig(quantization=None, dense_prefill_weights=True)
    EngineConfig(quantization=None, dense_prefill_weights=False)  # harmless


def test_the_embedded_models_logits_are_bit_equal_with_copies():
    """A 160-token prompt (one wide step) on the embedded int4 model: the copies change
    its speed, not its logits; and they cost about a bf16 model's projections."""
    model = load_model(resolve_model(None), torch.bfloat16, torch.device("cpu"))
    model.layers = nn.ModuleList(model.layers[:2])  # the real weights; 2 layers keep it fast
    model.args = dataclasses.replace(model.args, num_layers=2)
    quantize(model, "int4")
    ids = list(range(1000, 1160))
    before = model_logits(model, ids)
    nbytes = keep_dense_copies(model, None)
    assert 13e6 < nbytes < 15e6  # 7.1 MB a layer: the 30 layers' 212 MB
    assert torch.equal(model_logits(model, ids), before)
