"""API tokens: random secrets shown once; only their SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage.db.base import utcnow
from triage.db.models import ApiToken
from triage.domain import TokenRole

LAST_USED_STEP = timedelta(minutes=1)
TOKEN_PREFIX = "trg_"  # noqa: S105 - a label that makes leaked tokens easy to spot


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(*, db_session: Session, name: str, role: TokenRole | str) -> str:
    """A new token for ``name``; the caller shows it once, it cannot be recovered."""
    if db_session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise ValueError(f"a token named {name!r} exists; revoke it first")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    db_session.add(ApiToken(name=name, token_hash=hash_token(token), role=TokenRole(role)))
    return token


def revoke_token(*, db_session: Session, name: str) -> bool:
    row = db_session.scalar(
        select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
    )
    if row is None:
        return False
    row.revoked_at = utcnow()
    row.name = f"{name}@revoked-{row.id}"  # the name can be used again
    return True


def verify_token(*, db_session: Session, token: str) -> ApiToken | None:
    """The live token row for ``token``, or None."""
    row = db_session.scalar(
        select(ApiToken).where(
            ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None)
        )
    )
    now = utcnow()
    if row is not None and (row.last_used_at is None or now - row.last_used_at > LAST_USED_STEP):
        row.last_used_at = now  # coarse on purpose: no write on every request
    return row
