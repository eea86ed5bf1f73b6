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


class GraphError(CoveyError):
    """An app's graph is malformed; raised while the app is defined, before anything runs."""


class TemplateError(GraphError, ValueError):
    """A semantic function's template cannot be parsed (bad placeholder, unknown gen option)."""


class UnboundPlaceholderError(TemplateError):
    """A template placeholder names no parameter of its semantic function."""


class WiringError(GraphError, TypeError):
    """A node was called with missing, unknown or foreign arguments."""


class TypeMismatchError(WiringError):
    """A variable's type does not fit the input it is connected to."""


class CycleError(GraphError):
    """The app's graph has a cycle, so no order can run it."""


class UnusedOutputWarning(UserWarning):
    """An output is never consumed: not by another node, not returned by the app."""


class RuntimeExecutionError(CoveyError):
    """Running an app failed: a node raised, the app timed out, or the plan needs a feature
    the runtime does not have yet."""


class NodeExecutionError(RuntimeExecutionError):
    """One node of an app failed; `node` names it and `__cause__` holds the original error."""

    def __init__(self, message: str, node: str) -> None:
        super().__init__(message)
        self.node = node


class AppTimeoutError(RuntimeExecutionError, TimeoutError):
    """An app ran past its timeout; the message names the nodes still running."""
