"""Request dependencies: a database session per request, and token authentication (bearer,
or HTTP Basic with the token as password)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session

from triage.api.tokens import verify_token
from triage.config import Settings
from triage.db.session import session_scope
from triage.domain import TokenRole

EVENTS_PATH = "/api/events"


def db_session(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.session_factory) as session:
        yield session


def settings(request: Request) -> Settings:
    value: Settings = request.app.state.settings
    return value


# scope="function": the session commits before the response is sent, so a client that reads
# right after a change sees it.
DbSession = Annotated[Session, Depends(db_session, scope="function")]
AppSettings = Annotated[Settings, Depends(settings)]


@dataclass(frozen=True)
class ApiCaller:
    """Who called the HTTP API: the name and role of their token."""

    name: str
    role: TokenRole


def credentials(request: Request) -> tuple[str | None, str | None]:
    """(token, the user name it came with) from ``Authorization``: Bearer, or Basic for
    archives that only do Basic (the token's name as user, the token as password)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value, None
    if scheme.lower() == "basic" and value:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        return password or None, user
    return None, None


def authenticate(request: Request) -> ApiCaller:
    """The caller whose live token the request carries; 401 otherwise. Raises SQLAlchemyError
    when the database cannot be read (``metrics_auth`` answers a scrape then)."""
    token, user = credentials(request)
    if token is None and request.url.path == EVENTS_PATH:
        token = request.query_params.get("token")  # EventSource cannot send headers
    challenge = {"WWW-Authenticate": 'Bearer, Basic realm="triage"'}
    if not token:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a bearer token (or HTTP Basic: token name and token) is required",
            headers=challenge,
        )
    with session_scope(request.app.state.session_factory) as session:
        row = verify_token(db_session=session, token=token)
        if row is None or (user is not None and user != row.name):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "unknown or revoked token", headers=challenge
            )
        return ApiCaller(row.name, row.role)


def require(*roles: TokenRole) -> Callable[..., ApiCaller]:
    """A dependency admitting callers whose token has one of ``roles``."""

    def check(caller: Annotated[ApiCaller, Depends(authenticate)]) -> ApiCaller:
        if caller.role not in roles:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"needs role {' or '.join(roles)}")
        return caller

    return check


AnyCaller = Annotated[ApiCaller, Depends(require(TokenRole.RADIOLOGIST, TokenRole.ADMIN))]
AdminCaller = Annotated[ApiCaller, Depends(require(TokenRole.ADMIN))]
StoreCaller = Annotated[ApiCaller, Depends(require(TokenRole.SENDER, TokenRole.ADMIN))]
ReadCaller = Annotated[
    ApiCaller, Depends(require(TokenRole.RADIOLOGIST, TokenRole.ADMIN, TokenRole.WORKER))
]
"""Who may read images over DICOMweb (QIDO-RS, WADO-RS)."""
WorkerCaller = Annotated[ApiCaller, Depends(require(TokenRole.WORKER, TokenRole.ADMIN))]
"""A worker handing back or fetching result files."""
