"""Optional bearer-token auth: `--api-key KEY` or the COVEY_API_KEY environment variable.

With a key set, every route needs `Authorization: Bearer KEY`, except what a load balancer
or a browser must reach without one: the liveness and readiness checks, the chat page at
`/` and its static assets, and the API docs (they describe the API; they run nothing).
`create_app` installs `require_api_key` on every route, so a router added later is covered
without remembering to ask for it. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from covey.server.errors import AuthenticationError
from covey.server.state import ServerSettings

API_KEY_ENV = "COVEY_API_KEY"
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)

_bearer = HTTPBearer(auto_error=False, description="covey's API key (--api-key/COVEY_API_KEY)")


def api_key(settings: ServerSettings) -> str | None:
    """The key callers must send: the settings' own, else the environment's, else none."""
    return settings.api_key or os.environ.get(API_KEY_ENV) or None


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def require_api_key(request: Request, credentials: Credentials) -> None:
    """A FastAPI dependency (declared through `HTTPBearer`, so the OpenAPI schema shows the
    scheme); raises `AuthenticationError` (401) for a missing or wrong key."""
    key = request.app.state.covey.api_key
    if key is None or is_open(request.url.path):
        return
    if credentials is None:
        raise AuthenticationError("this server needs an API key: send Authorization: Bearer KEY")
    if not hmac.compare_digest(credentials.credentials.encode(), key.encode()):
        raise AuthenticationError("the API key is wrong")
