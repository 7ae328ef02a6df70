"""Reading a study: who may claim it, give a claim back, or mark it read, and what each does.

The rules, for the API and anything else that changes a reading state:

- **Claim.** A study already read cannot be claimed. A claim held by someone else blocks a new
  one until it lapses; the holder may claim again, which extends the claim. A claim lapses
  ``claim_for`` after it was taken.
- **Release.** Only a claimed study can be given back, by the holder of the claim or by an
  admin; it is unread again.
- **Read.** Marking read takes the study off the worklist. A study claimed by someone else
  (lapsed or not) may be marked read only by an admin.

Breaking a rule raises ``ReadingConflict`` (the state does not allow it) or ``NotAllowed``
(this reader may not); the rule functions change the entry in memory and do no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage.db.models import Study, WorklistEntry
from triage.domain import ReadingState
from triage.errors import TriageError


class ReadingError(TriageError):
    """A reading-state change that cannot be made; the message says why."""


class NotOnWorklist(ReadingError):
    """No study with that UID is on the worklist."""


class ReadingConflict(ReadingError):
    """The study's reading state does not allow the change (read already, claimed by another)."""


class NotAllowed(ReadingError):
    """The study is someone else's claim and the reader is not an admin."""


@dataclass(frozen=True)
class Reader:
    """Who asks: a token's name, and whether it is an admin's."""

    name: str
    admin: bool = False


def entry_for(*, db_session: Session, study_uid: str) -> WorklistEntry:
    """The study's worklist entry. Raises NotOnWorklist."""
    entry = db_session.scalar(select(WorklistEntry).join(Study).where(Study.study_uid == study_uid))
    if entry is None:
        raise NotOnWorklist("no such study on the worklist")
    return entry


def claim(entry: WorklistEntry, *, reader: Reader, now: datetime, claim_for: timedelta) -> None:
    """Claim the study for ``reader`` until ``now + claim_for``."""
    if entry.reading_state == ReadingState.READ:
        raise ReadingConflict("already read")
    held_by_another = (
        entry.reading_state == ReadingState.CLAIMED
        and entry.claimed_by != reader.name
        and entry.claim_expires_at is not None
        and entry.claim_expires_at > now
    )
    if held_by_another:
        raise ReadingConflict(f"claimed by {entry.claimed_by}")
    entry.reading_state = ReadingState.CLAIMED
    entry.claimed_by = reader.name
    entry.claimed_at = now
    entry.claim_expires_at = now + claim_for
    entry.updated_at = now


def release(entry: WorklistEntry, *, reader: Reader, now: datetime) -> None:
    """Give the claim back: the study is unread again."""
    if entry.reading_state != ReadingState.CLAIMED:
        raise ReadingConflict("not claimed")
    if entry.claimed_by != reader.name and not reader.admin:
        raise NotAllowed(f"claimed by {entry.claimed_by}")
    entry.reading_state = ReadingState.UNREAD
    entry.claimed_by = entry.claimed_at = entry.claim_expires_at = None
    entry.updated_at = now


def mark_read(entry: WorklistEntry, *, reader: Reader, now: datetime) -> None:
    """Mark the study read; it leaves the worklist."""
    someone_else = entry.reading_state == ReadingState.CLAIMED and entry.claimed_by != reader.name
    if someone_else and not reader.admin:
        raise NotAllowed(f"claimed by {entry.claimed_by}")
    entry.reading_state = ReadingState.READ
    entry.read_at = entry.updated_at = now
