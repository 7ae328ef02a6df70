"""Who may scrape ``/metrics``: a radiologist or admin token, as for the rest of the API, and
also while the database cannot be read, so that the scrape that says the database is down
(``triage_component_up{component="database"} 0``) still answers.

Tokens live in the database: while it cannot be read, a token this process verified in the last
``REMEMBER_SECONDS`` is taken for the role it had then (none can have been revoked meanwhile:
revoking writes to the database). Any other token gets 503. Only ``/metrics`` does this.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.exc import SQLAlchemyError

from triage.api.deps import ApiCaller, authenticate, credentials
from triage.domain import TokenRole

REMEMBER_SECONDS = 3600.0
_MOST_REMEMBERED = 64
_ROLES = (TokenRole.RADIOLOGIST, TokenRole.ADMIN)


class RecentTokens:
    """Callers whose token was verified lately, by the token's SHA-256 (never the token)."""

    def __init__(self, remember_seconds: float = REMEMBER_SECONDS) -> None:
        self.remember_seconds = remember_seconds
        self._seen: dict[str, tuple[ApiCaller, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def remember(self, token: str, caller: ApiCaller) -> None:
        with self._lock:
            self._seen[self._key(token)] = (caller, time.monotonic())
            if len(self._seen) > _MOST_REMEMBERED:  # drop the least recently verified
                oldest = min(self._seen, key=lambda key: self._seen[key][1])
                del self._seen[oldest]

    def recall(self, token: str) -> ApiCaller | None:
        with self._lock:
            seen = self._seen.get(self._key(token))
        if seen is None or time.monotonic() - seen[1] > self.remember_seconds:
            return None
        return seen[0]


def _metrics_caller(request: Request) -> ApiCaller:
    recent: RecentTokens = request.app.state.metrics_tokens
    token, user = credentials(request)
    try:
        caller = authenticate(request)
    except SQLAlchemyError as exc:
        caller_then = recent.recall(token) if token else None
        if caller_then is None or (user is not None and user != caller_then.name):
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                "the database cannot be read to check the token",
            ) from exc
        caller = caller_then
    else:
        if token:
            recent.remember(token, caller)
    if caller.role not in _ROLES:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"needs role {' or '.join(_ROLES)}")
    return caller


MetricsCaller = Annotated[ApiCaller, Depends(_metrics_caller)]
"""A radiologist or admin, also while the database cannot be read (see the module)."""
