"""The reading rules (claim, release, read) on a worklist entry, without a database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from triage.db.models import WorklistEntry
from triage.domain import ReadingState
from triage.worklist.reading import (
    NotAllowed,
    Reader,
    ReadingConflict,
    claim,
    mark_read,
    release,
)

NOW = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
HALF_HOUR = timedelta(minutes=30)
ALICE, BOB, ADMIN = Reader("dr.alice"), Reader("dr.bob"), Reader("it.admin", admin=True)


def unread() -> WorklistEntry:
    return WorklistEntry(reading_state=ReadingState.UNREAD)


def claimed_by(name: str, *, expires: datetime) -> WorklistEntry:
    return WorklistEntry(
        reading_state=ReadingState.CLAIMED,
        claimed_by=name,
        claimed_at=expires - HALF_HOUR,
        claim_expires_at=expires,
    )


def test_a_claim_is_the_readers_until_it_lapses() -> None:
    entry = unread()
    claim(entry, reader=ALICE, now=NOW, claim_for=HALF_HOUR)
    assert entry.reading_state == ReadingState.CLAIMED
    assert entry.claimed_by == "dr.alice"
    assert entry.claimed_at == NOW
    assert entry.claim_expires_at == NOW + HALF_HOUR


def test_a_live_claim_blocks_another_reader_and_an_admin() -> None:
    for reader in (BOB, ADMIN):
        entry = claimed_by("dr.alice", expires=NOW + timedelta(minutes=1))
        with pytest.raises(ReadingConflict, match=r"claimed by dr\.alice"):
            claim(entry, reader=reader, now=NOW, claim_for=HALF_HOUR)
        assert entry.claimed_by == "dr.alice"


def test_a_lapsed_claim_can_be_taken() -> None:
    entry = claimed_by("dr.alice", expires=NOW)  # lapses at this very moment
    claim(entry, reader=BOB, now=NOW, claim_for=HALF_HOUR)
    assert entry.claimed_by == "dr.bob"


def test_claiming_again_extends_ones_own_claim() -> None:
    entry = claimed_by("dr.alice", expires=NOW + timedelta(minutes=5))
    claim(entry, reader=ALICE, now=NOW, claim_for=HALF_HOUR)
    assert entry.claim_expires_at == NOW + HALF_HOUR


def test_a_read_study_cannot_be_claimed() -> None:
    entry = WorklistEntry(reading_state=ReadingState.READ)
    with pytest.raises(ReadingConflict, match="already read"):
        claim(entry, reader=ADMIN, now=NOW, claim_for=HALF_HOUR)


def test_only_the_holder_or_an_admin_releases_a_claim() -> None:
    entry = claimed_by("dr.alice", expires=NOW + HALF_HOUR)
    with pytest.raises(NotAllowed, match=r"claimed by dr\.alice"):
        release(entry, reader=BOB, now=NOW)
    release(entry, reader=ADMIN, now=NOW)
    assert entry.reading_state == ReadingState.UNREAD
    assert (entry.claimed_by, entry.claimed_at, entry.claim_expires_at) == (None, None, None)
    again = claimed_by("dr.alice", expires=NOW + HALF_HOUR)
    release(again, reader=ALICE, now=NOW)
    assert again.reading_state == ReadingState.UNREAD


def test_only_a_claimed_study_is_released() -> None:
    with pytest.raises(ReadingConflict, match="not claimed"):
        release(unread(), reader=ALICE, now=NOW)


def test_anyone_marks_an_unread_study_read() -> None:
    entry = unread()
    mark_read(entry, reader=BOB, now=NOW)
    assert entry.reading_state == ReadingState.READ
    assert entry.read_at == NOW


def test_someone_elses_claim_even_lapsed_is_read_only_by_an_admin() -> None:
    entry = claimed_by("dr.alice", expires=NOW - timedelta(hours=1))
    with pytest.raises(NotAllowed):
        mark_read(entry, reader=BOB, now=NOW)
    mark_read(entry, reader=ADMIN, now=NOW)
    assert entry.reading_state == ReadingState.READ
