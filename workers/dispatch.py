"""``dispatch_result``'s work: deliver one result object to one destination, at least once.

A destination that keeps failing is paused for a while (its deliveries wait, others flow); a
delivery that runs out of attempts becomes a failure an administrator can list and retry.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage.audit import add_event
from triage.db.base import utcnow
from triage.db.models import Delivery, DestinationState
from triage.db.session import session_scope
from triage.destinations import destinations
from triage.domain import WorkState
from triage.errors import PermanentError, RetryableError
from triage.results.senders import send_files
from triage.retry import Backoff
from workers.context import WorkerContext

log = logging.getLogger(__name__)


class DeliveryOutcome(enum.StrEnum):
    """How one run of ``dispatch_result`` ended."""

    DONE = "done"
    RETRYING = "retrying"  # failed, may succeed later: queued again after a backoff
    PAUSED = "paused"  # the destination is paused: not attempted, queued again for its end
    FAILED = "failed"  # for good: listed by `triage-admin failures`
    MISSING = "missing"  # no such delivery (deleted with its study)
    ALREADY_DONE = "already done"
    ALREADY_FAILED = "already failed"


_SETTLED = {
    WorkState.DONE: DeliveryOutcome.ALREADY_DONE,
    WorkState.FAILED: DeliveryOutcome.ALREADY_FAILED,
}


@dataclass(frozen=True)
class Outcome:
    """What happened, and when to try again (None: nothing more to do)."""

    state: DeliveryOutcome
    retry_in: float | None = None


def _state(db_session: Session, name: str) -> DestinationState:
    state = db_session.scalar(select(DestinationState).where(DestinationState.name == name))
    if state is None:
        state = DestinationState(name=name, consecutive_failures=0)
        db_session.add(state)
        db_session.flush()
    return state


def _paused_for(db_session: Session, name: str, now: datetime) -> float | None:
    state = db_session.scalar(select(DestinationState).where(DestinationState.name == name))
    if state is None or state.paused_until is None or state.paused_until <= now:
        return None
    return (state.paused_until - now).total_seconds()


def dispatch(context: WorkerContext, delivery_id: int) -> Outcome:
    settings = context.settings
    now = utcnow()
    with session_scope(context.session_factory) as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return Outcome(DeliveryOutcome.MISSING)
        if (settled := _SETTLED.get(delivery.state)) is not None:
            return Outcome(settled)
        destination = destinations(settings, db_session=session).get(delivery.destination)
        if destination is None:
            _give_up(session, delivery, "destination is no longer configured")
            return Outcome(DeliveryOutcome.FAILED)
        if (wait := _paused_for(session, delivery.destination, now)) is not None:
            delivery.next_attempt_at = delivery.touched_at = now + timedelta(seconds=wait)
            return Outcome(DeliveryOutcome.PAUSED, wait)
        delivery.state = WorkState.RUNNING
        delivery.attempts += 1
        delivery.touched_at = now
        file_id = delivery.result.file_id
        study_uid = delivery.result.job.study.study_uid
        attempt = delivery.attempts
    try:
        with context.images.result_path(file_id) as path:
            send_files(destination, [path], calling_ae=settings.ae_title)
    except RetryableError as exc:  # the destination, or triage serve (worker_images = dicomweb)
        return _after_failure(context, delivery_id, str(exc), attempt, retryable=True)
    except (PermanentError, OSError) as exc:
        return _after_failure(context, delivery_id, str(exc), attempt, retryable=False)
    with session_scope(context.session_factory) as session:
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        delivery.state = WorkState.DONE
        delivery.delivered_at = delivery.touched_at = utcnow()
        delivery.last_error = None
        state = _state(session, delivery.destination)
        state.consecutive_failures = 0
        state.paused_until = None
        state.last_success_at = delivery.delivered_at
    log.info(
        "result delivered",
        extra={"study_uid": study_uid, "destination": delivery.destination, "attempt": attempt},
    )
    return Outcome(DeliveryOutcome.DONE)


def _give_up(db_session: Session, delivery: Delivery, reason: str) -> None:
    delivery.state = WorkState.FAILED
    delivery.last_error = reason[:2000]
    delivery.touched_at = utcnow()
    add_event(
        db_session=db_session,
        kind="delivery_failed",
        study_uid=delivery.result.job.study.study_uid,
        delivery_id=delivery.id,
        destination=delivery.destination,
        reason=reason[:500],
    )


def _after_failure(
    context: WorkerContext, delivery_id: int, reason: str, attempt: int, *, retryable: bool
) -> Outcome:
    settings = context.settings
    now = utcnow()
    with session_scope(context.session_factory) as session:
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        state = _state(session, delivery.destination)
        state.last_error = reason[:2000]
        if retryable:
            state.consecutive_failures += 1
            if state.consecutive_failures >= settings.destination_pause_after_failures:
                state.paused_until = now + timedelta(seconds=settings.destination_pause_seconds)
        log.warning(
            "delivery failed: %s",
            reason,
            extra={"destination": delivery.destination, "attempt": attempt, "retry": retryable},
        )
        if not retryable or attempt >= settings.delivery_max_attempts:
            _give_up(session, delivery, reason)
            return Outcome(DeliveryOutcome.FAILED)
        wait = Backoff.from_settings(settings).delay(attempt)
        if state.paused_until is not None:
            wait = max(wait, (state.paused_until - now).total_seconds())
        delivery.state = WorkState.QUEUED
        delivery.last_error = reason[:2000]
        delivery.next_attempt_at = delivery.touched_at = now + timedelta(seconds=wait)
        return Outcome(DeliveryOutcome.RETRYING, wait)
