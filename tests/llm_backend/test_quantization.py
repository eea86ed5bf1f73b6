"""Weight-only int8 and int4: the kernels compute the quantized weight's function, the
quantized model keeps no dense copy, and each mode stays within its stated tolerance of the
reference on held-out text."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from covey.errors import ConfigError, NotSupportedError
from covey.llm_backend import quantization
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.llm_engine import LLMEngine
from covey.llm_backend.model_source import ModelSource, resolve_model
from covey.llm_backend.perplexity import heldout_windows, model_logits, perplexity_of
from covey.llm_backend.quantization import (
    INT4_GROUP_SIZE,
    INT4_KERNEL_MAX_ROWS,
    PERPLEXITY_TOLERANCE,
    Int4Linear,
    Int8Linear,
    quantization_of,
    quantize,
)
from covey.llm_backend.quantization_default import auto_quantization
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.weight_loader import load_model

LAYERS = {"int8": Int8Linear, "int4": Int4Linear}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_kernel_and_wide_path_compute_the_quantized_weight(mode):
    torch.manual_seed(0)
    weight, bias = torch.randn(128, 96), torch.randn(128)
    layer = LAYERS[mode](weight, bias, torch.bfloat16)
    deq = layer.dequantized().float()
    # Rounding error of the weight itself: half a step of its channel's (int8) or group's
    # (int4) range.
    if mode == "int8":
        step = weight.abs().amax(dim=1, keepdim=True) / 127
    else:
        groups = weight.reshape(128, -1, INT4_GROUP_SIZE)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(INT4_GROUP_SIZE, 1)
    assert ((deq - weight).abs() <= step * 0.5 + 0.02 * weight.abs() + 1e-3).all()

    rows = layer.kernel_max_rows
    x = torch.randn(rows + 16, 96).bfloat16()
    reference = x.float() @ deq.t() + bias
    narrow = layer(x[:rows]).float()  # the weight-only kernel
    wide = layer(x).float()  # dequantize into a temporary, then a bf16 matmul
    scale = reference.abs().max()
    assert (narrow - reference[:rows]).abs().max() < 0.02 * scale
    assert (wide - reference).abs().max() < 0.02 * scale
    single = layer(x[:1]).float()  # one decode token
    assert (single - reference[:1]).abs().max() < 0.02 * scale


class _CountInt8Kernel(TorchDispatchMode):
    """Counts calls of the int8 weight-only kernel."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.aten._weight_int8pack_mm.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows", [1, 7, 8, 19, 32])
def test_a_wide_int8_layer_runs_the_kernel_by_slices_bit_equal(monkeypatch, rows):
    monkeypatch.setattr(quantization, "KERNEL_CHUNK_CHANNELS", 64)
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(200, 96), None, torch.bfloat16)  # 4 slices, the last short
    x = torch.randn(rows, 96).to(torch.bfloat16)
    whole = torch.ops.aten._weight_int8pack_mm(x, layer.qweight, layer.scales)
    with _CountInt8Kernel() as count:
        out = layer(x)
    assert torch.equal(out, whole)
    assert count.calls == (4 if rows >= quantization.KERNEL_CHUNK_MIN_ROWS else 1)


def test_a_narrow_int8_layer_runs_the_kernel_once(monkeypatch):
    monkeypatch.setattr(quantization, "KERNEL_CHUNK_CHANNELS", 128)
    layer = Int8Linear(torch.randn(200, 96), None, torch.bfloat16)  # under two slices
    with _CountInt8Kernel() as count:
        layer(torch.randn(19, 96).to(torch.bfloat16))
    assert count.calls == 1


def test_int4_reads_the_kernels_packed_layout():
    torch.manual_seed(1)
    layer = Int4Linear(torch.randn(192, 64), None, torch.bfloat16)
    assert layer.unpackable  # otherwise wide steps silently fall back to the kernel
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == 192 * 64 // 2


def test_int4_wide_path_reads_the_weights_the_kernel_computes_with():
    """The dequantized weight is the kernel's own: the kernel applied to the identity gives
    W^T (both compute (q - 8) * scale + zero in float and round once to bf16, up to one bf16
    step apart where the kernel's accumulation order differs). Layers of different sizes
    share the thread's workspace, so one layer's dequantization must not leave anything in
    another's."""
    torch.manual_seed(2)
    layers = [
        Int4Linear(torch.randn(n, k) * 0.05, None, torch.bfloat16)
        for n, k in ((192, 64), (64, 128), (128, 96))
    ]
    for _ in range(2):  # the second round reuses buffers grown by the first
        for layer in layers:
            n, k = layer.packed.shape[0], layer.packed.shape[1] * 2
            eye = torch.eye(k, dtype=torch.bfloat16)
            by_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(
                eye, layer.packed, INT4_GROUP_SIZE, layer.scale_zero
            ).t()
            deq = layer._dequantize_into_workspace()
            assert deq.shape == (n, k)
            # one bf16 step of the group's largest weight (a misread layout moves whole
            # values, tens of steps)
            groups = by_kernel.float().abs().reshape(n, -1, INT4_GROUP_SIZE)
            step = (groups.amax(-1, keepdim=True) * 2**-7).expand_as(groups).reshape(n, k)
            assert ((deq.float() - by_kernel.float()).abs() <= step).all()


def test_int4_dequantization_is_exactly_the_formula_rounded_once():
    """Bit for bit, the wide path's weight is (q - 8) * scale + zero computed in float32 and
    rounded once to bf16 (what F.linear then multiplies by, and what the dense copies hold),
    with q recomputed here from the float weight as Int4Linear quantizes it: however the
    unpacking is written, this pins its result. Several blocks of 64 channels and groups,
    and groups whose zero lands near 0 (where an offset folded into the zero would round
    differently)."""
    torch.manual_seed(7)
    for n, k in ((192, 96), (64, 32), (128, 256)):
        weight = torch.randn(n, k) * 0.05
        weight[:, :32] -= weight[:, :32].mean(dim=1, keepdim=True)
        layer = Int4Linear(weight, None, torch.bfloat16)
        groups = weight.reshape(n, k // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        q = ((groups - low) / ((high - low).clamp(min=1e-6) / 15.0)).round().clamp(0, 15)
        scale, zero = layer.scale_zero.float().transpose(0, 1).unsqueeze(-1).unbind(-2)
        expected = ((q - 8) * scale + zero).reshape(n, k).bfloat16()
        assert torch.equal(layer.dequantized(), expected)


def test_int4_dequantizes_in_and_out_of_inference_mode_and_on_any_thread():
    import threading

    torch.manual_seed(3)
    layer = Int4Linear(torch.randn(128, 64), None, torch.bfloat16)
    expected = layer.dequantized()
    with torch.inference_mode():
        assert torch.equal(layer.dequantized(), expected)
    assert torch.equal(layer.dequantized(), expected)
    # one workspace per name serves both modes (not one copy each)
    assert sorted(quantization._workspaces.__dict__) == ["high", "nibbles", "weight"]
    # Two threads at once, each on a layer of its own size: each thread's workspace is its
    # own, so neither ever reads the other's weights.
    layers = [Int4Linear(torch.randn(n, k), None, torch.bfloat16) for n, k in ((192, 96), (64, 32))]
    wanted = [other.dequantized() for other in layers]
    start = threading.Barrier(2)
    wrong = []

    def dequantize_often(index: int) -> None:
        start.wait()
        for _ in range(200):
            got = layers[index]._dequantize_into_workspace()
            if not torch.equal(got, wanted[index]):
                wrong.append(index)

    threads = [threading.Thread(target=dequantize_often, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_step_wider_than_the_kernel_compiles_in_one_graph(mode):
    """CompiledDecode traces the projections with fullgraph=True and dynamic shapes: a decode
    batch past kernel_max_rows recompiles the wide branch, which must trace."""
    torch.manual_seed(4)
    layer = LAYERS[mode](torch.randn(128, 96), torch.randn(128), torch.bfloat16)
    x = torch.randn(layer.kernel_max_rows + 1, 96).bfloat16()
    compiled = torch.compile(lambda x: layer(x), backend="eager", dynamic=True, fullgraph=True)
    with torch.inference_mode():
        reference = layer(x).float()
        traced = compiled(x).float()
    assert (traced - reference).abs().max() < 0.02 * reference.abs().max()


def test_a_compiled_int4_layer_half_traces_past_the_kernels_row_limit():
    """The decode step's MLP half, as CompiledDecode writes it, on a batch one wider than
    the int4 kernel's limit: one graph (fullgraph) and the eager layer's result."""
    from covey.llm_backend.compiled_decode import _post_attention

    torch.manual_seed(6)
    model = load_model(resolve_model("dummy:tiny"), torch.bfloat16, torch.device("cpu"))
    quantize(model, "int4")
    args, layer = model.args, model.layers[0]
    rows = INT4_KERNEL_MAX_ROWS + 1
    x = torch.randn(rows, args.hidden_size).bfloat16()
    out = torch.randn(rows, args.num_heads, args.dim_per_head).bfloat16()
    compiled = torch.compile(_post_attention, backend="eager", dynamic=True, fullgraph=True)
    with torch.inference_mode():
        reference = _post_attention(layer, x, out).float()
        traced = compiled(layer, x, out).float()
    assert (traced - reference).abs().max() < 0.02 * reference.abs().max()


def test_int4_dequantized_weights_can_be_held_side_by_side():
    torch.manual_seed(5)
    first, second = (Int4Linear(torch.randn(128, 64), None, torch.bfloat16) for _ in range(2))
    held = first.dequantized()
    expected = held.clone()
    other = second.dequantized()  # same shape: the same workspace on this thread
    assert torch.equal(held, expected)
    assert not torch.equal(held, other)


def test_int4_needs_input_sizes_divisible_by_the_group():
    with pytest.raises(NotSupportedError, match="divisible by 32.*use quantization='int8'"):
        Int4Linear(torch.randn(64, 48), None, torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_model():
    return load_model(resolve_model(None), torch.bfloat16, torch.device("cpu"))


@pytest.fixture(scope="module")
def quantized(bf16_model):
    models = {}
    for mode in ("int8", "int4"):
        models[mode] = copy.deepcopy(bf16_model)
        quantize(models[mode], mode)
    return models


def _unique_bytes(model: torch.nn.Module) -> int:
    seen: dict[int, int] = {}
    for tensor in model.state_dict().values():
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("mode, max_fraction", [("int8", 0.52), ("int4", 0.36)])
def test_quantized_model_keeps_no_dense_copy(bf16_model, quantized, mode, max_fraction):
    model = quantized[mode]
    assert quantization_of(model) == mode
    hidden = model.args.hidden_size
    dense = [
        name
        for name, t in model.state_dict().items()
        if t.is_floating_point() and t.numel() >= hidden * hidden
    ]
    assert dense == []  # the smallest projection is hidden x hidden
    assert _unique_bytes(model) < max_fraction * _unique_bytes(bf16_model)


@pytest.fixture(scope="module")
def windows(bf16_model):
    """Four held-out windows of 128 tokens: on one, the int4 model's two computations (the
    kernel, dequantize + matmul) landed 0.5% and 1.0% from bf16, on eight 0.4% and 0.1%."""
    tokenizer = LLMEngine(
        EngineConfig(dtype="bfloat16", kv_cache_tokens=256, chunk_cache="off"), model=bf16_model
    ).tokenizer
    return heldout_windows(tokenizer.encode, 4, 128)


@pytest.fixture(scope="module")
def bf16_logits(bf16_model, windows):
    return [model_logits(bf16_model, ids) for ids in windows]


def _perplexity(logits: list[torch.Tensor], windows: list[list[int]]) -> float:
    by_window = iter(logits)
    return perplexity_of(lambda _: next(by_window), windows)


@pytest.mark.parametrize("mode,kernel", [("int8", False), ("int4", False), ("int4", True)])
def test_each_mode_stays_within_its_perplexity_tolerance_of_bf16(
    quantized, windows, bf16_logits, mode, kernel
):
    """int4 both ways: 128-token windows are past INT4_KERNEL_MAX_ROWS, so they run the
    wide path (dequantize + matmul); `kernel` raises the layers' limit so that the same
    windows run the weight-only kernel, which decode and short steps use."""
    layers = [m for m in quantized[mode].modules() if isinstance(m, Int4Linear)]
    for layer in layers if kernel else []:
        layer.kernel_max_rows = 128
    try:
        logits = [model_logits(quantized[mode], ids) for ids in windows]
    finally:
        for layer in layers:
            layer.__dict__.pop("kernel_max_rows", None)
    ours, reference = _perplexity(logits, windows), _perplexity(bf16_logits, windows)
    assert abs(ours / reference - 1) <= PERPLEXITY_TOLERANCE[mode], (ours, reference)
    # and the models agree on most next tokens, not only on average
    agree = torch.cat(logits).argmax(-1) == torch.cat(bf16_logits).argmax(-1)
    assert agree.float().mean() >= 0.9


def test_bf16_stays_within_its_tolerance_of_float32(windows, bf16_logits):
    from .conftest import embedded_model

    float32 = [model_logits(embedded_model("cpu"), ids) for ids in windows]
    reference = _perplexity(float32, windows)
    ours = _perplexity(bf16_logits, windows)
    assert abs(ours / reference - 1) <= PERPLEXITY_TOLERANCE["bfloat16"], (ours, reference)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_engine_keeps_the_models_answers(bf16_model, quantized, mode):
    config = dict(dtype="bfloat16", device="cpu", kv_cache_tokens=1024, chunk_cache="off")
    dense = LLMEngine(EngineConfig(**config), model=bf16_model)
    quant = LLMEngine(EngineConfig(**config, quantization=mode), model=quantized[mode])
    prompts = ["The capital of France is", "def add(a, b):\n    return"]
    texts = {}
    for name, engine in (("bf16", dense), (mode, quant)):
        for p in prompts:
            engine.add_request(p, SamplingParams(max_tokens=3), request_id=p)
        for out in engine.run_to_completion(prompts):
            texts[name, out.request_id] = out.text
    assert "Paris" in texts[mode, prompts[0]]
    assert texts[mode, prompts[1]].split()[0] == texts["bf16", prompts[1]].split()[0]


def test_mode_errors_are_clear(bf16_model, quantized):
    with pytest.raises(ConfigError, match="quantization='int4' needs dtype='bfloat16'"):
        EngineConfig(quantization="int4", dtype="float32")
    with pytest.raises(ConfigError, match="must be 'auto', None, 'int8' or 'int4'"):
        EngineConfig(quantization="int2")
    with pytest.raises(ConfigError, match="needs dtype='bfloat16'"):
        LLMEngine(EngineConfig(model="dummy:tiny", dtype="float32", quantization="int8"))
    with pytest.raises(ConfigError, match="does not match the given model's weights"):
        LLMEngine(
            EngineConfig(dtype="bfloat16", kv_cache_tokens=256, quantization="int8"),
            model=quantized["int4"],
        )


def test_auto_quantization_is_int4_for_the_4_bit_embedded_gguf_on_a_bf16_cpu_only():
    """The default by measurement: int4 re-packs the embedded Q4_1 weights almost exactly;
    float32 compute, CUDA and a dense checkpoint keep dense weights."""
    embedded = resolve_model(None)
    cpu = torch.device("cpu")
    assert auto_quantization(embedded, cpu, torch.bfloat16) == "int4"
    assert auto_quantization(embedded, cpu, torch.float32) is None
    assert auto_quantization(embedded, torch.device("cuda"), torch.bfloat16) is None
    dummy = ModelSource("dummy", "tiny", preset="tiny")
    assert auto_quantization(dummy, cpu, torch.bfloat16) is None


def test_a_model_int4_cannot_take_is_refused_before_any_layer_changes():
    from covey.llm_backend.model import LlamaModel
    from covey.llm_backend.model_args import ModelArgs

    # A small random model: only the MLP's down projection (input 48) is not int4-sized,
    # and it comes after three projections int4 could take.
    args = ModelArgs(256, 64, 2, num_heads=4, num_kv_heads=2, intermediate_size=48)
    model = LlamaModel(args).to(torch.bfloat16)
    with pytest.raises(NotSupportedError, match="divisible by 32.*has 48.*'int8'"):
        quantize(model, "int4")
    assert quantization_of(model) is None
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * args.num_layers  # every projection still dense
    assert isinstance(model.embed_tokens, torch.nn.Embedding) and model.lm_head is None
    quantize(model, "int8")  # int8 has no such constraint
    assert quantization_of(model) == "int8"
