"""Load checkpoints onto `LlamaModel`: GGUF (dequantized), Hugging Face safetensors, or dummy.

Every loader yields (our parameter name, tensor) pairs; q/k/v and gate/up are fused here
so the model runs one matmul for each.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from covey.errors import ConfigError, ModelLoadError
from covey.llm_backend.model import LlamaModel
from covey.llm_backend.model_args import ModelArgs, preset
from covey.llm_backend.model_source import ModelSource, gguf_reader

_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_HF_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device) -> LlamaModel:
    """Build the model for `source` on `device`; raise ModelLoadError on any bad checkpoint."""
    if source.format == "dummy":
        assert source.preset is not None
        args = preset(source.preset)
        torch.manual_seed(0)
        with torch.device(device):
            return LlamaModel(args).to(dtype).eval()
    if source.format == "gguf":
        assert source.path is not None
        args, tensors = _read_gguf(source.path)
    else:
        assert source.path is not None
        args, tensors = _read_hf(source.path)
    # Cast on the meta device, then allocate: the weights' memory is made once, in `dtype`
    # (allocating float32 and casting it wrote a bfloat16 copy of uninitialized memory).
    with torch.device("meta"):
        model = LlamaModel(args).to(dtype)
    model = model.to_empty(device=device)
    state = dict(tensors)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint {source.path} does not fit a {args.num_layers}-layer Llama: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for name, param in model.state_dict().items():
        if param.shape != state[name].shape:
            raise ModelLoadError(
                f"checkpoint tensor {name} has shape {tuple(state[name].shape)}, "
                f"the config implies {tuple(param.shape)}"
            )
        param.copy_(state[name])
    model.rotary = type(model.rotary)(
        args.dim_per_head, args.max_position, args.rope_theta, args.rope_scaling
    ).to(device)
    return model.eval()


def _read_gguf(path: Path) -> tuple[ModelArgs, Iterator[tuple[str, torch.Tensor]]]:
    try:
        reader = gguf_reader(path)
    except Exception as exc:  # the reader raises ValueError, struct errors, mmap errors...
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from exc
    fields = {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("tokenizer.ggml.")
    }
    arch = fields.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (llama, qwen2)")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ModelLoadError(
            "GGUF files with rope_freqs (Llama 3.1 rope scaling) are not "
            "supported yet; use the Hugging Face folder of that model"
        )
    try:
        args = ModelArgs(
            vocab_size=int(tensors["token_embd.weight"].shape[-1]),
            hidden_size=int(fields[f"{arch}.embedding_length"]),
            num_layers=int(fields[f"{arch}.block_count"]),
            num_heads=int(fields[f"{arch}.attention.head_count"]),
            num_kv_heads=int(
                fields.get(f"{arch}.attention.head_count_kv")
                or fields[f"{arch}.attention.head_count"]
            ),
            intermediate_size=int(fields[f"{arch}.feed_forward_length"]),
            max_position=int(fields.get(f"{arch}.context_length", 8192)),
            rope_theta=float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(fields[f"{arch}.attention.layer_norm_rms_epsilon"]),
            tie_embeddings="output.weight" not in tensors,
            qkv_bias="blk.0.attn_q.bias" in tensors,
        )
    except KeyError as exc:
        raise ModelLoadError(f"GGUF {path} lacks {exc.args[0]!r}") from exc
    except (ConfigError, TypeError, ValueError) as exc:  # a field of the wrong type or size
        raise ModelLoadError(f"GGUF {path} does not describe a valid model: {exc}") from exc
    return args, _gguf_tensors(path, tensors, args, unpermute=arch == "llama")


def _dequantize(path: Path, tensor) -> torch.Tensor:
    import gguf

    shape = tuple(int(s) for s in reversed(tensor.shape))
    kind = tensor.tensor_type.name
    if kind in _BLOCK_DEQUANTIZERS:
        return _BLOCK_DEQUANTIZERS[kind](_raw_blocks(tensor, _BLOCK_BYTES[kind]), shape)
    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot dequantize {tensor.name}: {exc}") from exc
    return torch.from_numpy(np.array(data, dtype=np.float32, copy=True).reshape(shape))


# The block types of the embedded model, dequantized in torch: gguf's numpy code is a
# second or more of every start (a Python loop over row groups, single-threaded). Same
# float32 arithmetic as gguf's (d * q + m), so the same weights bit for bit.
_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # per block of 32 weights


def _raw_blocks(tensor, block_bytes: int) -> torch.Tensor:
    """The tensor's blocks as a [blocks, block_bytes] uint8 tensor (a copy of the file's).
    Always whole blocks: the reader sizes `tensor.data` from the shape and fails on a file
    cut short, which loading reports as a ModelLoadError."""
    data = np.array(tensor.data, dtype=np.uint8, copy=True).reshape(-1)
    return torch.from_numpy(data).view(-1, block_bytes)


def _dequantize_q4_1(blocks: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Q4_1: a float16 scale d and minimum m, then 16 bytes: weight j is the low nibble of
    byte j, weight j + 16 its high nibble; w = d * q + m."""
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    qs = blocks[:, 4:]
    q = torch.cat([qs & 15, qs >> 4], dim=1).float()  # [blocks, 32]
    return (d * q + m).reshape(shape)


def _dequantize_q8_0(blocks: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Q8_0: a float16 scale d, then 32 signed bytes; w = d * q."""
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return (d * q).reshape(shape)


_BLOCK_DEQUANTIZERS = {"Q4_1": _dequantize_q4_1, "Q8_0": _dequantize_q8_0}


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaved-RoPE row order so the half-split rotation applies."""
    rows = w.shape[0]
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def _gguf_tensors(
    path: Path, tensors: dict, args: ModelArgs, unpermute: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ModelLoadError(f"GGUF {path} lacks tensor {name}")
        return _dequantize(path, tensors[name])

    yield "embed_tokens.weight", get("token_embd.weight")
    yield "norm.weight", get("output_norm.weight")
    if not args.tie_embeddings:
        yield "lm_head.weight", get("output.weight")
    for i in range(args.num_layers):
        blk, ours = f"blk.{i}.", f"layers.{i}."
        for theirs, mine in _GGUF_LAYER.items():
            yield ours + mine, get(blk + theirs)
        q, k = get(blk + "attn_q.weight"), get(blk + "attn_k.weight")
        if unpermute:
            q, k = _unpermute(q, args.num_heads), _unpermute(k, args.num_kv_heads)
        yield ours + "self_attn.qkv_proj.weight", torch.cat([q, k, get(blk + "attn_v.weight")])
        if args.qkv_bias:
            yield (
                ours + "self_attn.qkv_proj.bias",
                torch.cat([get(blk + f"attn_{x}.bias") for x in "qkv"]),
            )
        yield (
            ours + "mlp.gate_up_proj.weight",
            torch.cat([get(blk + "ffn_gate.weight"), get(blk + "ffn_up.weight")]),
        )


def _read_hf(folder: Path) -> tuple[ModelArgs, Iterator[tuple[str, torch.Tensor]]]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{folder}/config.json is not valid JSON: {exc}") from exc
    args = ModelArgs.from_hf_config(config)
    return args, _hf_tensors(folder, args)


def _hf_tensors(folder: Path, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    raw: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    raw[name.removeprefix("model.")] = f.get_tensor(name).float()
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelLoadError(f"{file} is not a readable safetensors file: {exc}") from exc

    def get(name: str) -> torch.Tensor:
        if name not in raw:
            raise ModelLoadError(f"{folder} lacks tensor {name}")
        return raw[name]

    yield "embed_tokens.weight", get("embed_tokens.weight")
    yield "norm.weight", get("norm.weight")
    if not args.tie_embeddings:
        yield "lm_head.weight", get("lm_head.weight")
    for i in range(args.num_layers):
        p = f"layers.{i}."
        for theirs, mine in _HF_LAYER.items():
            yield p + mine, get(p + theirs)
        yield (
            p + "self_attn.qkv_proj.weight",
            torch.cat([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
        )
        if args.qkv_bias:
            yield (
                p + "self_attn.qkv_proj.bias",
                torch.cat([get(p + f"self_attn.{x}_proj.bias") for x in "qkv"]),
            )
        yield (
            p + "mlp.gate_up_proj.weight",
            torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
        )
