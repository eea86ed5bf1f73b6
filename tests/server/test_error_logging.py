"""What the server logs for a failure: a caller's mistake is answered, not logged; a failure
inside covey is logged with its traceback."""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError

from covey.errors import EngineError
from covey.server.errors import http_error, log_failure


def test_a_body_that_fails_validation_is_answered_422_and_not_logged(caplog):
    missing = {"type": "missing", "loc": ("question",), "msg": "Field required"}
    exc = RequestValidationError([missing])
    error = http_error(exc)
    with caplog.at_level(logging.DEBUG, logger="covey.server.errors"):
        log_failure("POST /apps/x/invoke", exc, error)
    assert error.status == 422
    assert caplog.records == []


def test_a_failure_inside_covey_is_logged_with_its_traceback(caplog):
    exc = EngineError("the engine broke")
    with caplog.at_level(logging.DEBUG, logger="covey.server.errors"):
        log_failure("POST /apps/x/invoke", exc, http_error(exc))
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
