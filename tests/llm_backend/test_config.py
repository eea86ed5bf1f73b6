"""EngineConfig, ModelArgs and model resolution refuse bad settings with a CoveyError that
names the field, when the setting is made, not as a torch error later."""

from __future__ import annotations

import pytest
import torch

from covey.errors import (
    ConfigError,
    ErrorCategory,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
)
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.kv_pool import KVPool
from covey.llm_backend.model_args import ModelArgs, preset
from covey.llm_backend.model_source import resolve_model
from covey.llm_backend.quantization import quantize
from tests.llm_backend.test_loading import SMALL


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_config_error(no_cuda, device):
    with pytest.raises(ConfigError, match=f"device is '{device}' but CUDA is not available"):
        EngineConfig(device=device)


def test_cuda_index_past_the_devices_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    EngineConfig(device="cuda:1")
    with pytest.raises(ConfigError, match=r"'cuda:2' but this machine has 2 CUDA device\(s\)"):
        EngineConfig(device="cuda:2")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:", "CPU", "", None, 0])
def test_unknown_device_is_a_config_error(device):
    with pytest.raises(ConfigError, match="device must be 'auto', 'cpu' or 'cuda\\[:N\\]'"):
        EngineConfig(device=device)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("block_size", "16"),
        ("block_size", 0),
        ("max_num_seqs", True),
        ("max_num_batched_tokens", -1),
        ("kv_cache_tokens", 1.5),
        ("kv_cache_bytes", 0),
        ("max_model_len", "4096"),
        ("num_threads", 0),
        ("chunk_store_disk_bytes", 0),
    ],
)
def test_bad_numbers_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"EngineConfig.{field} must be a positive integer"):
        EngineConfig(**{field: value})


def test_config_errors_are_the_callers_fault():
    with pytest.raises(ConfigError) as info:
        EngineConfig(dtype=["float32"])
    assert info.value.category is ErrorCategory.INVALID
    assert isinstance(info.value, ValueError)  # callers that caught ValueError still do


def test_int8_with_an_explicit_float_dtype_fails_at_config_time():
    with pytest.raises(ConfigError, match="quantization='int8' needs dtype='bfloat16'"):
        EngineConfig(quantization="int8", dtype="float16")
    EngineConfig(quantization="int8", dtype="auto")  # resolved per machine; checked at load


def test_int8_on_a_float32_model_is_a_config_error():
    model = torch.nn.Module()
    model.norm = torch.nn.LayerNorm(4)
    with pytest.raises(ConfigError, match="pass dtype='bfloat16'"):
        quantize(model, "int8")


def test_missing_models_are_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        resolve_model(tmp_path / "nope.gguf")
    assert info.value.category is ErrorCategory.NOT_FOUND
    with pytest.raises(ModelNotFoundError, match="unknown dummy preset 'huge'"):
        resolve_model("dummy:huge")
    with pytest.raises(ModelNotFoundError, match="unknown dummy preset"):
        preset("huge")


def test_a_path_that_is_no_model_is_a_load_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file") as info:
        resolve_model(tmp_path / "weights.bin")
    assert not isinstance(info.value, ModelNotFoundError)
    assert info.value.category is ErrorCategory.INVALID


def test_model_args_errors_are_config_errors():
    with pytest.raises(ConfigError, match="ModelArgs.num_heads .* multiple of num_kv_heads"):
        ModelArgs(49152, 64, 2, num_heads=4, num_kv_heads=3, intermediate_size=128)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_attention_heads": 0}, "ModelArgs.num_heads must be > 0"),
        ({"hidden_size": "64"}, "does not describe a valid model"),
        ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ],
)
def test_bad_hf_config_values_are_load_errors(change, message):
    with pytest.raises(ModelLoadError, match=message):
        ModelArgs.from_hf_config({**SMALL, **change})


def test_importing_kv_of_the_wrong_shape_is_an_invalid_request():
    pool = KVPool(preset("tiny"), 4, 16, torch.float32, torch.device("cpu"))
    with pytest.raises(InvalidRequestError, match="KV data has shape"):
        pool.import_blocks([0], torch.zeros(1, 2, 3))


def test_blend_check_layers_default_sits_at_the_measured_depth():
    """None (the default) resolves per model: layer 8 of a 30-layer model, where the probe of
    issue 9 measured the check layer that kept full prefill's accuracy; never past the last
    layer of a shallow model."""
    from covey.llm_backend.blend_forward import default_check_layers

    assert EngineConfig().blend_check_layers is None
    assert default_check_layers(30) == (8,)
    assert default_check_layers(2) == (1,)
    assert default_check_layers(1) == (0,)
    assert EngineConfig(blend_check_layers=[3]).blend_check_layers == (3,)
    with pytest.raises(ConfigError, match="or None"):
        EngineConfig(blend_check_layers=())
