"""One exception tree for covey, so callers can catch `CoveyError` at an edge.

Every error a user's input or configuration can cause is a `CoveyError`, and each class
carries an `ErrorCategory`: whose fault it is and whether a retry can help. The edges map
the category, never the class: the CLI to a one-line message and an exit code, the server
to an HTTP status. A new error class only has to pick its category.
"""

from __future__ import annotations

from enum import Enum


class ErrorCategory(Enum):
    """Why a request failed, as the edges report it: (value, HTTP status, exit code)."""

    INVALID = ("invalid", 400, 2)  # the caller's input or configuration is wrong
    NOT_FOUND = ("not_found", 404, 3)  # a named model, index, app or request does not exist
    OVERLOADED = ("overloaded", 429, 4)  # no room now; the same call may succeed later
    UNAVAILABLE = ("unavailable", 503, 5)  # a part is down, closed or not built yet
    INTERNAL = ("internal", 500, 1)  # covey's own fault: a bug, or an engine failure

    def __init__(self, label: str, http_status: int, exit_code: int) -> None:
        self.label = label
        self.http_status = http_status
        self.exit_code = exit_code


class CoveyError(Exception):
    """Base of every error covey raises on purpose."""

    category: ErrorCategory = ErrorCategory.INTERNAL


class ConfigError(CoveyError, ValueError):
    """A setting is invalid: an engine option, a device that is not there, a bad path."""

    category = ErrorCategory.INVALID


class ModelLoadError(CoveyError):
    """A checkpoint could not be found, parsed or mapped onto the model."""

    category = ErrorCategory.INVALID


class ModelNotFoundError(ModelLoadError):
    """A model file, folder or preset named by the caller does not exist."""

    category = ErrorCategory.NOT_FOUND


class InvalidRequestError(CoveyError, ValueError):
    """A request is malformed: empty prompt, too long, bad sampling parameters."""

    category = ErrorCategory.INVALID


class AppInputError(InvalidRequestError, TypeError):
    """An app was called with inputs that do not fit its signature: too many positional
    arguments, a missing or unknown input, or a value of the wrong type."""


class RequestNotFoundError(InvalidRequestError):
    """A request id names no request the engine holds (unknown, or already finished)."""

    category = ErrorCategory.NOT_FOUND


class EngineError(CoveyError):
    """The engine failed while serving a request; the other requests go on."""

    category = ErrorCategory.INTERNAL


class EngineOverloadedError(EngineError):
    """The engine cannot take the request now (queue or pool full); retry later."""

    category = ErrorCategory.OVERLOADED


class EngineUnavailableError(EngineError):
    """The engine is closed, stopped or unreachable."""

    category = ErrorCategory.UNAVAILABLE


class NotSupportedError(CoveyError):
    """The engine or runtime does not offer this feature (yet); the message says which."""

    category = ErrorCategory.UNAVAILABLE


class RequestAbortedError(CoveyError):
    """A request was aborted before it finished."""

    category = ErrorCategory.UNAVAILABLE


class RetrievalError(CoveyError):
    """Ingestion, embedding or index failures that the caller must see."""

    category = ErrorCategory.INVALID


class IndexNotFoundError(RetrievalError):
    """An index directory is missing or holds no index."""

    category = ErrorCategory.NOT_FOUND


class EmbedderMismatchError(RetrievalError):
    """An index was built with another embedder than the one asked for."""


class GraphError(CoveyError):
    """An app's graph is malformed; raised while the app is defined, before anything runs."""

    category = ErrorCategory.INVALID


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


class PlanError(GraphError):
    """A plan annotation is missing, misspelt or of the wrong type (an optimizer bug)."""

    category = ErrorCategory.INTERNAL


class UnusedOutputWarning(UserWarning):
    """An output is never consumed: not by another node, not returned by the app."""


class RuntimeExecutionError(CoveyError):
    """Running an app failed: a node raised, the app timed out, or the plan needs a feature
    the runtime does not have yet."""

    category = ErrorCategory.INTERNAL


class RetrieverNotBoundError(RuntimeExecutionError):
    """An app retrieves from an index name no retriever is bound to."""

    category = ErrorCategory.INVALID


class NodeExecutionError(RuntimeExecutionError):
    """One node of an app failed; `node` names it and `__cause__` holds the original error.

    Its category is the cause's when the cause is a `CoveyError` (a bad gen option is still
    the caller's fault), else internal.
    """

    def __init__(self, message: str, node: str) -> None:
        super().__init__(message)
        self.node = node

    @property
    def category(self) -> ErrorCategory:  # type: ignore[override]
        cause = self.__cause__
        return cause.category if isinstance(cause, CoveyError) else ErrorCategory.INTERNAL


class AppTimeoutError(RuntimeExecutionError, TimeoutError):
    """An app ran past its timeout; the message names the nodes still running."""

    category = ErrorCategory.UNAVAILABLE
