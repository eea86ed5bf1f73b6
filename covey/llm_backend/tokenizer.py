"""The serving model's tokenizer and chat template, from the GGUF or HF folder itself.

transformers builds a fast tokenizer from GGUF metadata, which takes seconds; the result is
cached as tokenizer files keyed by the GGUF's size and mtime, so later starts are fast.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from covey.errors import InvalidRequestError, ModelLoadError
from covey.home import covey_home
from covey.llm_backend.model_source import ModelSource, resolve_model

# The roles a chat message may have. "developer", OpenAI's newer name for "system", is
# taken as "system" (as the OpenAI route does): the model's template knows only these.
CHAT_ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}


class Tokenizer:
    """A thin wrapper over a transformers fast tokenizer; `hf` is the wrapped object."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        self.eos_token_id: int | None = hf.eos_token_id
        self.bos_token_id: int | None = hf.bos_token_id
        self.vocab_size: int = len(hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added (templates add their own)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(token_ids)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render chat messages with the model's own template (from the checkpoint)."""
        if not isinstance(messages, list):
            raise InvalidRequestError(f"chat messages must be a list of dicts, got {messages!r}")
        if not messages:
            raise InvalidRequestError("chat messages must not be empty")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise InvalidRequestError(
                    f"chat message {i} must be a dict with 'role' and 'content', got {message!r}"
                )
            for key in ("role", "content"):
                if not isinstance(message[key], str):
                    raise InvalidRequestError(
                        f"chat message {i}: {key} must be a str, got {message[key]!r}"
                    )
            if ROLE_ALIASES.get(message["role"], message["role"]) not in CHAT_ROLES:
                raise InvalidRequestError(  # a template renders any role, unchecked
                    f"chat message {i}: role must be one of {', '.join(CHAT_ROLES)} "
                    f"(or developer, taken as system), got {message['role']!r}"
                )
        if any(m["role"] in ROLE_ALIASES for m in messages):
            messages = [{**m, "role": ROLE_ALIASES.get(m["role"], m["role"])} for m in messages]
        if not getattr(self.hf, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; send a raw prompt")
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def _gguf_cache_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return covey_home() / "tokenizers" / key[:24]


def _load_gguf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    cache = _gguf_cache_dir(path)
    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cache, local_files_only=True)
    try:
        hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelLoadError(f"cannot read a tokenizer from GGUF {path}: {exc}") from exc
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        hf.save_pretrained(tmp)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home only costs the next start a few seconds
    return hf


@lru_cache(maxsize=8)
def _load_cached(source: ModelSource) -> Tokenizer:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if source.format == "gguf":
        assert source.path is not None
        return Tokenizer(_load_gguf_tokenizer(source.path))
    if source.format == "hf":
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(source.path, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the tokenizer in {source.path}: {exc}") from exc
        return Tokenizer(hf)
    return load_default_tokenizer()


def load_tokenizer(model: str | Path | ModelSource | None = None) -> Tokenizer:
    """The tokenizer of `model` (see `resolve_model`); `dummy:` models use the embedded one."""
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    return _load_cached(source)


def load_default_tokenizer() -> Tokenizer:
    """The embedded SmolLM2 tokenizer: the default for chunking and for dummy models."""
    return _load_cached(resolve_model(None))
