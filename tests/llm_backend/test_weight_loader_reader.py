"""The GGUF file is parsed once per process: choosing the quantization and loading the
weights share one reader, and a file replaced in place is parsed again. The embedded model's
block types are dequantized in torch, to gguf's weights bit for bit."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch

from covey.errors import ModelLoadError
from covey.llm_backend.model_source import ModelSource, gguf_reader, resolve_model
from covey.llm_backend.quantization_default import auto_quantization
from covey.llm_backend.weight_loader import _dequantize, load_model


def write_gguf(path, value: float) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_down.weight", np.full((4, 32), value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_one_parse_per_file_version(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, 1.0)
    first = gguf_reader(path)
    assert gguf_reader(path) is first
    write_gguf(path, 2.0)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = gguf_reader(path)
    assert second is not first
    (tensor,) = second.tensors
    assert float(tensor.data[0, 0]) == 2.0


def test_quantization_choice_and_loading_share_the_parse(tmp_path, monkeypatch):
    parses = []
    real = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parses.append(1) or real(*a, **k))
    path = tmp_path / "shared.gguf"
    write_gguf(path, 1.0)
    source = ModelSource("gguf", "shared", path)
    assert auto_quantization(source, torch.device("cpu"), torch.bfloat16) is None  # F32
    with pytest.raises(ModelLoadError, match="lacks"):  # no hyperparameters in this file
        load_model(source, torch.bfloat16, torch.device("cpu"))
    assert parses == [1]


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_block_dequantizers_match_gguf_bit_for_bit(kind):
    """covey's torch dequantizers of the embedded model's block types give gguf's weights."""
    path = resolve_model(None).path
    tensor = next(t for t in gguf_reader(path).tensors if t.tensor_type.name == kind)
    ours = _dequantize(path, tensor)
    theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    expected = torch.from_numpy(np.asarray(theirs, dtype=np.float32)).reshape(ours.shape)
    assert torch.equal(ours, expected)


def test_a_truncated_block_tensor_is_a_clear_error(tmp_path):
    """A file cut inside a Q4_1 tensor's blocks: one line saying the file is unreadable."""
    path = tmp_path / "cut.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    blocks = np.zeros((4, 40), dtype=np.uint8)  # 4 rows of 64 weights: 2 blocks of 20 bytes
    writer.add_tensor("blk.0.ffn_down.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.truncate(path, path.stat().st_size - 7)
    with pytest.raises(ModelLoadError, match="cut.gguf is not a readable GGUF file"):
        load_model(ModelSource("gguf", "cut", path), torch.float32, torch.device("cpu"))
