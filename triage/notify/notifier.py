"""The notifier: sends the outward notifications the worklist owes, and retries them.

The database decides what is owed (``Notification`` rows, created by the worklist service). Each
pass claims every queued row whose ``next_attempt_at`` has come, sends it on its channel, and
records the outcome: ``done`` with ``sent_at``; ``queued`` again after an exponential backoff with
jitter (``triage.retry``, the policy every retry shares; as many attempts as a result delivery
gets); or ``failed`` with an audit event ``notification_failed``, for an answer that
retrying will not change or after ``delivery_max_attempts`` attempts.

A row is claimed by a compare-and-set to ``running`` with a lease: if the process dies mid-send
the row is due again when the lease ends. Delivery is therefore at-least-once, and receivers
deduplicate on the notification's identity (``X-Triage-Delivery``, the HL7 message control id).
A row that is ``done`` is never sent again.

A channel whose destination is not configured (empty ``webhook_url`` or ``hl7_destination``)
marks its notifications ``done`` without sending them (``sent_at`` stays empty, ``last_error``
says why): a critical finding is urgent now, so configuring a channel later must not flood it
with old findings.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from triage import history
from triage.audit import add_event
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import Notification, Study, WorklistEntry
from triage.db.session import SessionFactory, session_scope
from triage.domain import ReadingState, WorkState
from triage.errors import PermanentError, RetryableError
from triage.retry import Backoff

log = logging.getLogger(__name__)

FAILED_EVENT = "notification_failed"
# Alerts older than this are not escalated any more (e.g. after escalation was switched on).
ESCALATION_WINDOW = timedelta(days=1)
DEFAULT_TIMEOUT_SECONDS = 10.0
# A claimed row whose sender died is due again after this; far above any send's timeout.
RUNNING_LEASE = timedelta(minutes=5)
_DUE_STATES = (WorkState.QUEUED, WorkState.RUNNING)


@dataclass(frozen=True)
class Patient:
    """The patient as the study row has them at send time. Never logged: ``repr`` hides them."""

    patient_id: str | None = field(default=None, repr=False)
    name: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Outgoing:
    """One notification as a channel sends it."""

    notification_id: int
    channel: str
    dedup_key: str
    payload: Mapping[str, Any]
    created_at: datetime
    attempted_at: datetime
    attempt: int
    study_uid: str
    patient: Patient


class ChannelSender(Protocol):
    """Sends one notification, or raises RetryableError (try again later) or PermanentError."""

    def __call__(self, settings: Settings, message: Outgoing, *, timeout: float) -> None: ...


@dataclass(frozen=True)
class Channel:
    """A registered channel: its sender, and where it sends (empty: not configured)."""

    name: str
    send: ChannelSender
    destination: Callable[[Settings], str]
    escalation: bool = False  # sends escalations of unacknowledged alerts, not first alerts


_CHANNELS: dict[str, Channel] = {}


def channel(
    name: str, *, destination: Callable[[Settings], str], escalation: bool = False
) -> Callable[[ChannelSender], ChannelSender]:
    """Register the decorated function as the sender of notifications on channel ``name``
    (``escalation``: of escalations of unacknowledged alerts)."""

    def register(sender: ChannelSender) -> ChannelSender:
        if name in _CHANNELS:
            raise RuntimeError(f"a sender for channel {name!r} is already registered")
        _CHANNELS[name] = Channel(
            name=name, send=sender, destination=destination, escalation=escalation
        )
        return sender

    return register


def registered_channels(*, escalation: bool = False) -> Mapping[str, Channel]:
    """The channels first alerts go on; with ``escalation``, those escalations go on."""
    return {name: c for name, c in _CHANNELS.items() if c.escalation == escalation}


@dataclass(frozen=True)
class _Result:
    sent: bool = False
    error: str | None = None
    permanent: bool = False
    skipped: bool = False


class Notifier:
    """Sends due notifications; ``run`` polls until ``stopping`` is set.

    Parameters
    ----------
    timeout
        Seconds each send may take: to connect, and again to get the answer.
    rng
        Source of the backoff jitter (tests pass a seeded one).
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: SessionFactory,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        poll_seconds: float = 0.25,
        batch_size: int = 100,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.timeout = timeout
        self.poll_seconds = poll_seconds
        self.batch_size = batch_size
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self.backoff = Backoff.from_settings(settings)

    def send_due(self, now: datetime | None = None) -> int:
        """Send every notification due at ``now``; return how many were sent."""
        now = now or utcnow()
        sent = skipped = 0
        for notification_id in self._due(now):
            message = self._claim(notification_id, now)
            if message is None:
                continue  # another notifier took it, or it is no longer due
            result = self._attempt(message)
            self._record(message, result, now)
            sent += result.sent
            skipped += result.skipped
        if sent or skipped:
            log.info("notifications: %d sent, %d skipped (channel not configured)", sent, skipped)
        return sent

    def run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.poll_seconds):
            try:
                self.escalate_due()
                self.send_due()
            except Exception:  # keep polling: the rows are still owed, the next pass retries
                log.exception("notification pass failed")

    def escalate_due(self, now: datetime | None = None) -> int:
        """Owe an escalation for each critical alert unacknowledged past its time."""
        with session_scope(self.session_factory) as session:
            return escalate_unacknowledged(session, self.settings, now or utcnow())

    def _due(self, now: datetime) -> list[int]:
        with session_scope(self.session_factory) as session:
            return list(
                session.scalars(
                    select(Notification.id)
                    .where(
                        Notification.state.in_(_DUE_STATES),
                        Notification.next_attempt_at <= now,
                    )
                    .order_by(Notification.next_attempt_at, Notification.id)
                    .limit(self.batch_size)
                )
            )

    def _claim(self, notification_id: int, now: datetime) -> Outgoing | None:
        """Mark the row running (compare-and-set on state and attempts) and read what to send."""
        with session_scope(self.session_factory) as session:
            row = session.get(Notification, notification_id)
            if row is None or row.state not in _DUE_STATES or row.next_attempt_at > now:
                return None
            claimed = cast(
                CursorResult[Any],
                session.execute(
                    update(Notification)
                    .where(
                        Notification.id == row.id,
                        Notification.state == row.state,
                        Notification.attempts == row.attempts,
                    )
                    .values(
                        state=WorkState.RUNNING,
                        attempts=row.attempts + 1,
                        next_attempt_at=now + RUNNING_LEASE,
                    )
                    .execution_options(synchronize_session=False)
                ),
            )
            if claimed.rowcount != 1:
                return None
            study = session.get(Study, row.study_id)
            if study is None:  # cascades make this unreachable; keep the type checker honest
                return None
            return Outgoing(
                notification_id=row.id,
                channel=row.channel,
                dedup_key=row.dedup_key,
                payload=dict(row.payload),
                created_at=row.created_at,
                attempted_at=now,
                attempt=row.attempts + 1,
                study_uid=study.study_uid,
                patient=Patient(patient_id=study.patient_id, name=study.patient_name),
            )

    def _attempt(self, message: Outgoing) -> _Result:
        spec = _CHANNELS.get(message.channel)
        if spec is None:
            return _Result(error=f"no sender for channel {message.channel!r}", permanent=True)
        if not spec.destination(self.settings):
            return _Result(skipped=True, error=f"skipped: channel {spec.name} is not configured")
        try:
            spec.send(self.settings, message, timeout=self.timeout)
        except RetryableError as exc:
            return _Result(error=str(exc) or type(exc).__name__)
        except PermanentError as exc:
            return _Result(error=str(exc) or type(exc).__name__, permanent=True)
        except Exception as exc:  # a sender bug must not stop the others: retry, capped
            log.exception("notification sender raised", extra=_context(message))
            return _Result(error=f"unexpected error: {type(exc).__name__}")
        return _Result(sent=True)

    def _record(self, message: Outgoing, result: _Result, now: datetime) -> None:
        with session_scope(self.session_factory) as session:
            row = session.get(Notification, message.notification_id)
            if row is None or row.state != WorkState.RUNNING or row.attempts != message.attempt:
                return  # deleted with its study, or reclaimed after the lease ran out
            row.last_error = result.error[:2000] if result.error else None
            if result.sent or result.skipped:
                row.state = WorkState.DONE
                row.sent_at = now if result.sent else None
                if result.sent:
                    log.info("notification sent", extra=_context(message))
            elif result.permanent or row.attempts >= self.settings.delivery_max_attempts:
                row.state = WorkState.FAILED
                _audit_failure(session, message, row)
            else:
                wait = timedelta(seconds=self.backoff.delay(row.attempts, self.rng))
                row.state = WorkState.QUEUED
                row.next_attempt_at = now + wait
                log.warning(
                    "notification not sent, retry in %.0f s",
                    wait.total_seconds(),
                    extra=_context(message),
                )


def owe(
    db_session: Session,
    *,
    channel: str,
    study_id: int,
    dedup_key: str,
    payload: Mapping[str, Any],
    now: datetime,
) -> bool:
    """Owe one message on ``channel``, due ``now``, unless one with ``dedup_key`` is owed
    already (whatever its state): at most one row per key, so a pass that runs again (after a
    crash, or on the next tick) owes nothing twice. Returns whether a row was added."""
    exists = db_session.scalar(select(Notification.id).where(Notification.dedup_key == dedup_key))
    if exists is not None:
        return False
    db_session.add(
        Notification(
            channel=channel,
            study_id=study_id,
            dedup_key=dedup_key,
            payload=dict(payload),
            created_at=now,
            next_attempt_at=now,
        )
    )
    return True


def escalate_unacknowledged(db_session: Session, settings: Settings, now: datetime) -> int:
    """Critical alerts of the studies' current rounds that nobody acknowledged within
    ``alert_acknowledge_seconds`` each owe one message per escalation channel; the escalation
    is recorded in the study's priority history. Returns how many studies were escalated."""
    wait = settings.alert_acknowledge_seconds
    channels = [
        name
        for name, spec in registered_channels(escalation=True).items()
        if spec.destination(settings)
    ]
    if wait <= 0 or not channels:
        return 0
    first = tuple(registered_channels())
    cutoff = now - timedelta(seconds=wait)
    rows = db_session.execute(
        select(Notification, Study, WorklistEntry)
        .join(Study, Study.id == Notification.study_id)
        .join(WorklistEntry, WorklistEntry.study_id == Study.id)
        .where(
            Notification.channel.in_(first),
            Notification.created_at <= cutoff,
            Notification.created_at > cutoff - ESCALATION_WINDOW,
            WorklistEntry.reading_state != ReadingState.READ,
        )
        .order_by(Notification.id)
    )
    escalated: set[str] = set()
    for alert, study, entry in rows:
        round_ = alert.payload.get("round", study.analysis_round)
        if round_ != study.analysis_round:
            continue  # a re-run since: its own alerts count
        if entry.acknowledged_at is not None and entry.acknowledged_at >= alert.created_at:
            continue
        if study.study_uid in escalated:
            continue
        payload = {**alert.payload, "escalated": True, "unacknowledged_seconds": round(wait)}
        added = [  # a list, not any(...): every channel is owed its row
            owe(
                db_session,
                channel=name,
                study_id=study.id,
                dedup_key=f"{name}:{study.study_uid}:{round_}",
                payload=payload,
                now=now,
            )
            for name in channels
        ]
        if not any(added):
            continue  # escalated before (an earlier pass): nothing new owed
        reason = f"critical alert not acknowledged within {wait:g} s: escalated to " + ", ".join(
            sorted(channels)
        )
        history.note(db_session, entry, at=now, reason=reason)
        add_event(
            db_session=db_session,
            kind="alert_escalated",
            study_uid=study.study_uid,
            channels=sorted(channels),
            round=round_,
        )
        log.warning("critical alert escalated", extra={"study_uid": study.study_uid})
        escalated.add(study.study_uid)
        db_session.flush()
    return len(escalated)


def _audit_failure(session: Session, message: Outgoing, row: Notification) -> None:
    add_event(
        db_session=session,
        kind=FAILED_EVENT,
        study_uid=message.study_uid,
        notification_id=row.id,
        channel=row.channel,
        attempts=row.attempts,
        error=row.last_error,
    )
    log.error("notification failed for good", extra=_context(message))


def _context(message: Outgoing) -> dict[str, Any]:
    """Log context: identifiers and counts only."""
    return {
        "notification_id": message.notification_id,
        "channel": message.channel,
        "study_uid": message.study_uid,
        "attempt": message.attempt,
    }
