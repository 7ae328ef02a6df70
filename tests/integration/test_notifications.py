"""Outward notifications against real listeners on loopback: an HTTP server that checks the
webhook's HMAC, and an MLLP server that parses each message with python-hl7 and answers an ACK.

The study comes through the real path: DICOM files ingested, a finished job with a critical
finding, and the worklist service reprioritizing it, which is what owes the notifications.
Every listener runs on a free port and is stopped when its ``with`` block ends.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hl7
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from tests.conftest import IngestStack, StackFactory, free_port
from tests.helpers.instances import ct_study
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import AuditEvent, Finding, Job, Notification, Study
from triage.db.session import session_scope
from triage.domain import StudyStatus, WorkState
from triage.notify import Notifier
from triage.notify.hl7 import message_control_id
from triage.notify.notifier import FAILED_EVENT
from triage.worklist.policy import PolicyConfig
from triage.worklist.service import reprioritize

SECRET = "webhook-test-secret"
TIMEOUT = 5.0  # every socket in these tests gives up after this
MODEL = "ct-head-hyperdensity"
# Every HL7 delimiter, and a non-ASCII letter. A backslash cannot travel in a DICOM PN value (it
# separates values), so the test writes the name into the study row after ingest.
PATIENT_NAME = "O'BRIEN|SMITH^JOSÉ~MARIA\\&CO"
PATIENT_NAME_ER7 = "O'BRIEN\\F\\SMITH^JOSÉ\\R\\MARIA\\E\\\\T\\CO"
PATIENT_ID = "PAT|77^X"
ACCESSION = "ACC|42&7"

START_BLOCK, END_FRAME = b"\x0b", b"\x1c\x0d"


# -- listeners ------------------------------------------------------------------------------


def verify(secret: str, body: bytes, signature_header: str | None) -> bool:
    """What a receiver does: recompute the HMAC of the exact body and compare in constant time."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return signature_header is not None and hmac.compare_digest(expected, signature_header)


@dataclass
class WebhookLog:
    status: int
    headers: list[dict[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    verified: list[bool] = field(default_factory=list)


@contextmanager
def webhook_receiver(port: int, *, status: int = 200) -> Iterator[WebhookLog]:
    """An HTTP server on ``port`` that records each POST, checks its signature (401 if wrong)
    and otherwise answers ``status``."""
    seen = WebhookLog(status=status)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            good = verify(SECRET, body, self.headers.get("X-Triage-Signature"))
            seen.headers.append(dict(self.headers.items()))
            seen.bodies.append(body)
            seen.verified.append(good)
            self.send_response(seen.status if good else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with _serving(ThreadingHTTPServer(("127.0.0.1", port), Handler)):
        yield seen


@contextmanager
def _serving(server: socketserver.BaseServer) -> Iterator[None]:
    """``server`` answering from a thread until the block ends."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


@dataclass
class MllpLog:
    ack_code: str | None  # None: read the message and never answer
    raw: list[str] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)  # hl7.Message


class _MllpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    block_on_close = True  # server_close() waits for the handlers, each bounded by TIMEOUT


@contextmanager
def mllp_receiver(port: int, *, ack_code: str | None = "AA") -> Iterator[MllpLog]:
    """An MLLP server on ``port``: parses each message with python-hl7 and answers an ACK."""
    seen = MllpLog(ack_code=ack_code)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(TIMEOUT)
            received = bytearray()
            try:
                while END_FRAME not in received:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    received += chunk
                start, end = received.index(START_BLOCK), received.index(END_FRAME)
                text = received[start + 1 : end].decode("utf-8")
                message = hl7.parse(text)
                seen.raw.append(text)
                seen.messages.append(message)
                if seen.ack_code is None:
                    self.request.recv(1)  # silent until the sender gives up and closes
                    return
                ack = message.create_ack(seen.ack_code, application="RIS", facility="HOSPITAL")
                self.request.sendall(START_BLOCK + str(ack).encode() + END_FRAME)
            except (TimeoutError, ConnectionError):
                return

    with _serving(_MllpServer(("127.0.0.1", port), Handler)):
        yield seen


# -- the study and the notifier ---------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    http: int
    mllp: int


@pytest.fixture
def ports() -> Ports:
    return Ports(http=free_port(), mllp=free_port())


def configured(settings: Settings, ports: Ports, **changes: Any) -> Settings:
    return settings.model_copy(
        update={
            "webhook_url": f"http://127.0.0.1:{ports.http}/hooks/triage",
            "webhook_secret": SecretStr(SECRET),
            "hl7_destination": f"127.0.0.1:{ports.mllp}",
            "hl7_sending_facility": "RADIOLOGY",
            **changes,
        }
    )


def critical_study(stack: IngestStack, out_dir: Path) -> tuple[str, datetime]:
    """Ingest a CT study, give it a finished job with a critical finding, reprioritize it.

    Returns the study UID and the time to send from (the notifications are due then).
    """
    sent = ct_study(out_dir, 2)
    stack.ingest(*sent.paths)
    with session_scope(stack.session_factory) as session:
        study = session.scalars(select(Study).where(Study.study_uid == sent.study_uid)).one()
        study.patient_name, study.patient_id = PATIENT_NAME, PATIENT_ID
        study.accession_number = ACCESSION
        study.analysis_round, study.status = 1, StudyStatus.ANALYZED
        code = {"code_scheme": "SCT", "code_value": "1386000"}
        job = Job(study=study, model_name=MODEL, model_version="1.0", state=WorkState.DONE, round=1)
        job.findings = [
            Finding(
                ordinal=0,
                kind="score",
                label="hemorrhage",
                code_meaning="Intracranial hemorrhage",
                probability=0.97,
                positive=True,
                **code,
            ),
            Finding(
                ordinal=1,
                kind="lesion",
                label="hemorrhage",
                code_meaning="Intracranial hemorrhage",
                probability=0.97,
                positive=True,
                volume_ml=12.3,
                **code,
            ),
        ]
        session.add(job)
        session.flush()
        change = reprioritize(
            db_session=session, study=study, now=utcnow(), config=PolicyConfig(), models={}
        )
        assert change is not None
    return sent.study_uid, utcnow() + timedelta(seconds=1)


def reprioritize_again(stack: IngestStack, study_uid: str, now: datetime) -> None:
    with session_scope(stack.session_factory) as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        reprioritize(db_session=session, study=study, now=now, config=PolicyConfig(), models={})


def rows(stack: IngestStack) -> dict[str, Notification]:
    with session_scope(stack.session_factory) as session:
        found = session.scalars(select(Notification)).all()
    assert len(found) == len({n.channel for n in found}), "one notification per channel"
    return {n.channel: n for n in found}


def failure_events(stack: IngestStack) -> list[AuditEvent]:
    with session_scope(stack.session_factory) as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.kind == FAILED_EVENT)))


# -- tests ----------------------------------------------------------------------------------


def test_critical_finding_sends_one_signed_webhook_and_one_oru(
    settings: Settings, stack_factory: StackFactory, ports: Ports, tmp_path: Path
) -> None:
    settings = configured(settings, ports)
    stack = stack_factory(settings)
    study_uid, now = critical_study(stack, tmp_path / "in")
    notifier = Notifier(settings, stack.session_factory, timeout=TIMEOUT)

    with webhook_receiver(ports.http) as hook, mllp_receiver(ports.mllp) as ris:
        assert notifier.send_due(now) == 2
        for minutes in (1, 5, 30):
            later = now + timedelta(minutes=minutes)
            reprioritize_again(stack, study_uid, later)
            assert notifier.send_due(later) == 0

    assert len(hook.bodies) == 1
    assert len(ris.messages) == 1
    sent = rows(stack)
    assert {channel: row.state for channel, row in sent.items()} == {
        "webhook": WorkState.DONE,
        "hl7": WorkState.DONE,
    }
    assert all(row.sent_at == now and row.attempts == 1 for row in sent.values())

    # The webhook: signed over the exact body, identified for deduplication, no patient data.
    body, headers = hook.bodies[0], hook.headers[0]
    assert hook.verified == [True]
    assert verify(SECRET, body, headers["X-Triage-Signature"])
    assert not verify(SECRET, body.replace(b"0.97", b"0.07"), headers["X-Triage-Signature"])
    assert not verify("another-secret", body, headers["X-Triage-Signature"])
    assert headers["X-Triage-Delivery"] == str(sent["webhook"].id)
    event = json.loads(body)
    assert event["event"] == "critical_finding"
    assert event["notification_id"] == sent["webhook"].id
    assert datetime.fromisoformat(event["timestamp"]) == now
    assert event["study_uid"] == study_uid
    assert event["accession_number"] == ACCESSION
    assert event["finding"] == "Intracranial hemorrhage"
    assert (event["probability"], event["volume_ml"], event["tier"]) == (0.97, 12.3, "critical")
    assert "O'BRIEN" not in body.decode()
    assert PATIENT_ID not in body.decode()

    # The HL7 message: an ORU^R01 v2.5.1 with every value escaped.
    message, raw = ris.messages[0], ris.raw[0]
    assert message["MSH.F9.R1.C1"] == "ORU"
    assert message["MSH.F9.R1.C2"] == "R01"
    assert message["MSH.F12"] == "2.5.1"
    assert message["MSH.F3"] == "TRIAGE"
    assert message["MSH.F4"] == "RADIOLOGY"
    assert message["MSH.F5"] == settings.hl7_receiving_application
    assert message["MSH.F10"].startswith("TRIAGE")
    assert len(message["MSH.F10"]) == 20
    pid = message.segment("PID")
    assert str(pid(5)) == PATIENT_NAME_ER7
    assert message["PID.F5.R1.C1"] == "O'BRIEN|SMITH"
    assert message["PID.F5.R1.C2"] == "JOSÉ~MARIA\\&CO"
    assert str(pid(3)) == "PAT\\F\\77\\S\\X"
    assert message["PID.F3"] == PATIENT_ID
    assert message["OBR.F2"] == message["OBR.F3"] == ACCESSION
    assert str(message.segment("OBR")(3)) == "ACC\\F\\42\\T\\7"
    assert message["OBR.F5"] == "S"
    assert message["TQ1.F9.R1.C1"] == "S"
    observations = [message.unescape(str(obx(5))) for obx in message.segments("OBX")]
    assert "Intracranial hemorrhage" in observations[0]
    assert "12.3 mL" in observations[0]
    assert "critical" in " ".join(observations)
    assert study_uid in observations
    assert raw.count("\r") == len(message)
    assert "\n" not in raw


def test_a_listener_that_is_down_gets_the_message_once_it_is_up(
    settings: Settings, stack_factory: StackFactory, ports: Ports, tmp_path: Path
) -> None:
    settings = configured(settings, ports)
    stack = stack_factory(settings)
    _, now = critical_study(stack, tmp_path / "in")
    notifier = Notifier(settings, stack.session_factory, timeout=TIMEOUT)

    assert notifier.send_due(now) == 0  # nothing listens on either port
    waiting = rows(stack)
    for row in waiting.values():
        assert row.state == WorkState.QUEUED
        assert row.attempts == 1
        assert row.last_error
        assert row.next_attempt_at > now
    assert "unreachable" in (waiting["webhook"].last_error or "")
    assert "HL7" in (waiting["hl7"].last_error or "")
    assert notifier.send_due(now + timedelta(seconds=1)) == 0  # not due yet: no new attempt
    assert {row.attempts for row in rows(stack).values()} == {1}

    later = max(row.next_attempt_at for row in waiting.values())
    with webhook_receiver(ports.http) as hook, mllp_receiver(ports.mllp) as ris:
        assert notifier.send_due(later) == 2
        assert notifier.send_due(later + timedelta(minutes=20)) == 0
    assert (len(hook.bodies), len(ris.messages)) == (1, 1)
    for row in rows(stack).values():
        assert (row.state, row.attempts, row.sent_at) == (WorkState.DONE, 2, later)
    assert failure_events(stack) == []


def test_refusals_fail_at_once_with_an_audit_event(
    settings: Settings, stack_factory: StackFactory, ports: Ports, tmp_path: Path
) -> None:
    settings = configured(settings, ports)
    stack = stack_factory(settings)
    study_uid, now = critical_study(stack, tmp_path / "in")
    notifier = Notifier(settings, stack.session_factory, timeout=TIMEOUT)

    with (
        webhook_receiver(ports.http, status=400) as hook,
        mllp_receiver(ports.mllp, ack_code="AR") as ris,
    ):
        assert notifier.send_due(now) == 0
        assert notifier.send_due(now + timedelta(hours=1)) == 0  # failed rows are not retried
    assert (len(hook.bodies), len(ris.messages)) == (1, 1)

    failed = rows(stack)
    assert {row.state for row in failed.values()} == {WorkState.FAILED}
    assert "HTTP 400" in (failed["webhook"].last_error or "")
    assert "AR" in (failed["hl7"].last_error or "")
    events = failure_events(stack)
    assert {event.detail["channel"] for event in events} == {"webhook", "hl7"}
    assert {event.study_uid for event in events} == {study_uid}
    assert all(PATIENT_ID not in json.dumps(event.detail) for event in events)


def test_transient_answers_are_retried_then_sent_once(
    settings: Settings, stack_factory: StackFactory, ports: Ports, tmp_path: Path
) -> None:
    """HTTP 503 and HL7 AE are retried; so is an MLLP peer that never answers."""
    settings = configured(settings, ports)
    stack = stack_factory(settings)
    _, now = critical_study(stack, tmp_path / "in")
    notifier = Notifier(settings, stack.session_factory, timeout=0.5)

    with (
        webhook_receiver(ports.http, status=503) as hook,
        mllp_receiver(ports.mllp, ack_code="AE") as ris,
    ):
        assert notifier.send_due(now) == 0
        queued = rows(stack)
        assert {row.state for row in queued.values()} == {WorkState.QUEUED}
        assert "HTTP 503" in (queued["webhook"].last_error or "")
        assert "AE" in (queued["hl7"].last_error or "")

        ris.ack_code = None  # the RIS now reads and never answers
        second = now + timedelta(minutes=1)
        assert notifier.send_due(second) == 0
        assert "TimeoutError" in (rows(stack)["hl7"].last_error or "")

        hook.status, ris.ack_code = 204, "AA"
        third = now + timedelta(minutes=10)
        assert notifier.send_due(third) == 2
        assert notifier.send_due(third + timedelta(hours=1)) == 0
    # Three attempts each, every one the same message: the same delivery id and control id.
    assert len(hook.bodies) == len(ris.messages) == 3
    assert len({h["X-Triage-Delivery"] for h in hook.headers}) == 1
    assert len({m["MSH.F10"] for m in ris.messages}) == 1
    assert len(set(ris.raw)) == 1
    assert {(row.state, row.attempts) for row in rows(stack).values()} == {(WorkState.DONE, 3)}


def test_after_the_last_attempt_a_notification_fails(
    settings: Settings, stack_factory: StackFactory, ports: Ports, tmp_path: Path
) -> None:
    settings = configured(settings, ports, delivery_max_attempts=2)
    stack = stack_factory(settings)
    _, now = critical_study(stack, tmp_path / "in")
    notifier = Notifier(settings, stack.session_factory, timeout=TIMEOUT)

    assert notifier.send_due(now) == 0
    assert notifier.send_due(now + timedelta(hours=1)) == 0
    assert {(row.state, row.attempts) for row in rows(stack).values()} == {(WorkState.FAILED, 2)}
    assert len(failure_events(stack)) == 2


def test_unconfigured_channels_are_skipped(
    settings: Settings, stack_factory: StackFactory, ports: Ports, tmp_path: Path
) -> None:
    """With only the webhook configured, the HL7 notification is done without being sent."""
    settings = configured(settings, ports, hl7_destination="")
    stack = stack_factory(settings)
    _, now = critical_study(stack, tmp_path / "in")
    notifier = Notifier(settings, stack.session_factory, timeout=TIMEOUT)

    with webhook_receiver(ports.http) as hook:
        assert notifier.send_due(now) == 1
    assert len(hook.bodies) == 1
    done = rows(stack)
    assert done["webhook"].state == WorkState.DONE
    assert done["webhook"].sent_at == now
    assert done["hl7"].state == WorkState.DONE
    assert done["hl7"].sent_at is None
    assert "not configured" in (done["hl7"].last_error or "")


def test_run_sends_until_stopped(
    settings: Settings, stack_factory: StackFactory, ports: Ports, tmp_path: Path
) -> None:
    settings = configured(settings, ports)
    stack = stack_factory(settings)
    critical_study(stack, tmp_path / "in")
    notifier = Notifier(settings, stack.session_factory, timeout=TIMEOUT, poll_seconds=0.05)
    stopping = threading.Event()

    with webhook_receiver(ports.http) as hook, mllp_receiver(ports.mllp) as ris:
        thread = threading.Thread(target=notifier.run, args=(stopping,))
        thread.start()
        try:
            deadline = utcnow() + timedelta(seconds=TIMEOUT)
            while not (hook.bodies and ris.messages) and utcnow() < deadline:
                stopping.wait(0.05)
        finally:
            stopping.set()
            thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert (len(hook.bodies), len(ris.messages)) == (1, 1)
    assert {row.state for row in rows(stack).values()} == {WorkState.DONE}


def test_control_id_is_stable_per_notification() -> None:
    """The RIS deduplicates a resend on MSH-10: it depends only on the dedup key."""
    from triage.notify.notifier import Outgoing, Patient

    def outgoing(key: str, attempt: int) -> Outgoing:
        return Outgoing(
            notification_id=1,
            channel="hl7",
            dedup_key=key,
            payload={},
            created_at=utcnow(),
            attempted_at=utcnow(),
            attempt=attempt,
            study_uid="1.2.3",
            patient=Patient(),
        )

    first = message_control_id(outgoing("hl7:1.2.3:m:1", 1))
    assert first == message_control_id(outgoing("hl7:1.2.3:m:1", 7))
    assert first != message_control_id(outgoing("hl7:1.2.3:m:2", 1))
    assert len(first) == 20
