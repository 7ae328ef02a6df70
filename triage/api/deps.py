"""Request dependencies: a database session per request, and bearer-token authentication."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from triage.api.tokens import verify_token
from triage.config import Settings
from triage.db.session import session_scope
from triage.domain import TokenRole

_bearer = HTTPBearer(auto_error=False)
EVENTS_PATH = "/api/events"


def db_session(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.session_factory) as session:
        yield session


def settings(request: Request) -> Settings:
    value: Settings = request.app.state.settings
    return value


DbSession = Annotated[Session, Depends(db_session)]
AppSettings = Annotated[Settings, Depends(settings)]


@dataclass(frozen=True)
class ApiCaller:
    """Who called the HTTP API: the name and role of their token."""

    name: str
    role: TokenRole


def _authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiCaller:
    token = credentials.credentials if credentials else None
    if token is None and request.url.path == EVENTS_PATH:
        token = request.query_params.get("token")  # EventSource cannot send headers
    if not token:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a bearer token is required",
            headers={"WWW-Authenticate": "Bearer"},
        )
    with session_scope(request.app.state.session_factory) as session:
        row = verify_token(db_session=session, token=token)
        if row is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "unknown or revoked token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return ApiCaller(row.name, row.role)


def require(*roles: TokenRole) -> Callable[..., ApiCaller]:
    """A dependency admitting callers whose token has one of ``roles``."""

    def check(caller: Annotated[ApiCaller, Depends(_authenticate)]) -> ApiCaller:
        if caller.role not in roles:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"needs role {' or '.join(roles)}")
        return caller

    return check


AnyCaller = Annotated[ApiCaller, Depends(require(TokenRole.RADIOLOGIST, TokenRole.ADMIN))]
AdminCaller = Annotated[ApiCaller, Depends(require(TokenRole.ADMIN))]
