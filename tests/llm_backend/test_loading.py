"""Checkpoint loading: Hugging Face folders (Llama, Qwen2), dummy presets, and bad files."""

from __future__ import annotations

import json

import pytest
import torch

from covey.errors import ModelLoadError
from covey.llm_backend.config import EngineConfig
from covey.llm_backend.llm_engine import LLMEngine
from covey.llm_backend.model_source import resolve_model
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.tokenizer import load_default_tokenizer

SMALL = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def save_random_checkpoint(folder, kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False, rope_theta=5e5))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True))
    model.eval().save_pretrained(folder, safe_serialization=True)
    load_default_tokenizer().hf.save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_folder_matches_transformers(tmp_path, kind, device):
    ref = save_random_checkpoint(tmp_path, kind).to(device)
    engine = LLMEngine(
        EngineConfig(model=str(tmp_path), dtype="float32", device=device, kv_cache_tokens=1024)
    )
    ids = engine.tokenizer.encode("Loading a checkpoint from a folder")
    engine.add_request(ids, SamplingParams(max_tokens=8, ignore_eos=True), request_id="a")
    (out,) = engine.run_to_completion(["a"])
    with torch.inference_mode():
        expected = ref.generate(
            torch.tensor([ids], device=device), max_new_tokens=8, do_sample=False, eos_token_id=None
        )
    assert out.token_ids == expected[0, len(ids) :].tolist()


def test_dummy_preset_runs_without_a_checkpoint(device):
    engine = LLMEngine(EngineConfig(model="dummy:tiny", device=device, kv_cache_tokens=256))
    rid = engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=5, ignore_eos=True))
    (out,) = engine.run_to_completion([rid])
    assert len(out.token_ids) == 5 and out.finished


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="unknown dummy preset 'huge'"):
        LLMEngine(EngineConfig(model="dummy:huge"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model(tmp_path / "weights.bin")
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(tmp_path)


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        LLMEngine(EngineConfig(model=str(bad)))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(resolve_model(None).path.read_bytes()[:4_000_000])
    with pytest.raises(ModelLoadError, match="truncated.gguf"):
        LLMEngine(EngineConfig(model=str(truncated)))


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    save_random_checkpoint(tmp_path, "llama")
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        LLMEngine(EngineConfig(model=str(tmp_path)))


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not supported"):
        LLMEngine(EngineConfig(model=str(tmp_path)))


def test_engine_config_errors_name_the_field():
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="float8")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="kv_cache_tokens or kv_cache_bytes"):
        EngineConfig(kv_cache_tokens=10, kv_cache_bytes=10)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"max_model_len \(4096\) exceeds the model's context"):
        LLMEngine(EngineConfig(model="dummy:tiny", max_model_len=4096))
