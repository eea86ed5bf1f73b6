"""One exception tree for covey, so callers can catch `CoveyError` at an edge."""

from __future__ import annotations


class CoveyError(Exception):
    """Base of every error covey raises on purpose."""


class ModelLoadError(CoveyError):
    """A checkpoint could not be found, parsed or mapped onto the model."""


class InvalidRequestError(CoveyError, ValueError):
    """A request is malformed: empty prompt, too long, bad sampling parameters."""


class EngineError(CoveyError):
    """The engine cannot serve a request (for example the KV pool can never hold it)."""


class RequestAbortedError(CoveyError):
    """A request was aborted before it finished."""


class RetrievalError(CoveyError):
    """Ingestion, embedding or index failures that the caller must see."""


class IndexNotFoundError(RetrievalError):
    """An index directory is missing or holds no index."""


class EmbedderMismatchError(RetrievalError):
    """An index was built with another embedder than the one asked for."""
