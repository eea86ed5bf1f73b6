"""Shapes of a Llama-family decoder, read from a checkpoint or taken from a named preset."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from covey.errors import ConfigError, ModelLoadError, ModelNotFoundError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling; `factor == 1` means none."""

    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    head_dim: int | None = None
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "max_position",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ModelArgs.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"ModelArgs.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError("ModelArgs.hidden_size must be divisible by num_heads")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.dim_per_head * dtype_bytes

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Read a Hugging Face config.json of a Llama, Mistral, Qwen2 or SmolLM checkpoint."""
        model_type = config.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ModelLoadError(
                f"model_type {model_type!r} is not supported; covey runs llama, mistral and qwen2"
            )
        window = config.get("sliding_window")
        if window and config.get("use_sliding_window", model_type == "mistral"):
            raise ModelLoadError("sliding-window attention is not supported yet")
        try:
            return cls(
                vocab_size=config["vocab_size"],
                hidden_size=config["hidden_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=config["num_attention_heads"],
                num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                intermediate_size=config["intermediate_size"],
                max_position=config.get("max_position_embeddings", 8192),
                rope_theta=float(config.get("rope_theta", 10000.0)),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
                head_dim=config.get("head_dim"),
                rope_scaling=_rope_scaling(config.get("rope_scaling")),
            )
        except KeyError as exc:
            raise ModelLoadError(f"config.json lacks the field {exc.args[0]!r}") from exc
        except (ConfigError, TypeError, ValueError) as exc:  # a field of the wrong type or size
            raise ModelLoadError(f"config.json does not describe a valid model: {exc}") from exc


def _rope_scaling(raw: dict[str, Any] | None) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelLoadError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position=int(raw.get("original_max_position_embeddings", 8192)),
    )


PRESETS: dict[str, ModelArgs] = {
    "smollm2-135m": ModelArgs(
        vocab_size=49152,
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        intermediate_size=1536,
        rope_theta=100000.0,
    ),
    "smollm2-360m": ModelArgs(
        vocab_size=49152,
        hidden_size=960,
        num_layers=32,
        num_heads=15,
        num_kv_heads=5,
        intermediate_size=2560,
        rope_theta=100000.0,
    ),
    "smollm2-1.7b": ModelArgs(
        vocab_size=49152,
        hidden_size=2048,
        num_layers=24,
        num_heads=32,
        num_kv_heads=32,
        intermediate_size=8192,
        rope_theta=130000.0,
    ),
    "llama-1b": ModelArgs(
        vocab_size=49152,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        rope_theta=500000.0,
    ),
    "tiny": ModelArgs(
        vocab_size=49152,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position=2048,
    ),
}


def preset(name: str, **overrides: Any) -> ModelArgs:
    """A named shape for `dummy:` weights; vocab stays SmolLM2's so its tokenizer fits."""
    if name not in PRESETS:
        raise ModelNotFoundError(f"unknown dummy preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
