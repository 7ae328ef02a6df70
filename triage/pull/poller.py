"""Pulling from archives that cannot push (``triage-admin sources add``).

Every ``pull_poll_seconds`` each enabled source is searched (QIDO-RS, or C-FIND for a DIMSE
source: see ``triage.pull.dimse``) for studies
whose StudyDate is from its ``search_from`` to today (and of its modalities, if it has any);
each study not retrieved from it before is retrieved by WADO-RS, streamed part by part into
the spool through the STOW-RS path (so never held in memory, and checked, stored and indexed
as any instance is), recorded as pulled, and handed to study completion as an association's
end would be. After a search that went through, ``search_from`` moves to
``pull_lookback_days`` before the day it started: a restart resumes from there, nothing in
between is skipped, and what was retrieved already is not retrieved again. A source that
fails (down, slow, refusing) is searched again after the retry backoff, doubled each time,
its error kept for ``triage-admin sources list``.

Studies without a StudyDate, or whose StudyDate is older than the window when they reach the
archive, are not found by the search.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

import httpx
from sqlalchemy import select

from triage.config import DicomWebDestination, Settings
from triage.db.base import utcnow
from triage.db.models import PulledStudy, Source
from triage.db.session import SessionFactory, session_scope
from triage.dicomweb.stow import StowRequest, media_type
from triage.domain import PeerKind
from triage.errors import PermanentError, RetryableError
from triage.ingest.pipeline import Ingestor
from triage.pull.dimse import find_studies, move_study
from triage.results.senders.stow import http_client, redacted_url
from triage.retry import Backoff

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
"""How often the poller looks for a source whose time has come."""
PAGE = 500
"""Studies asked for per QIDO-RS request."""
TIMEOUT = 120.0
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class SourceError(RetryableError):
    """The source could not be searched or read this time."""


@dataclass
class PollReport:
    source: str
    found: int = 0
    pulled: list[str] = field(default_factory=list)
    error: str | None = None


def source_endpoint(source: Source) -> DicomWebDestination:
    """The source as a DICOMweb endpoint (URL, credentials, CA file) for ``http_client``."""
    return DicomWebDestination(name=source.name, url=str(source.url), **source.options)


class Puller:
    def __init__(
        self,
        settings: Settings,
        session_factory: SessionFactory,
        ingestor: Ingestor,
        *,
        on_pulled: Callable[[set[str]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.ingestor = ingestor
        self.on_pulled = on_pulled
        self.backoff = Backoff.from_settings(settings)

    def run(self, stopping: threading.Event) -> None:
        """Poll due sources until ``stopping`` is set (a thread of ``triage serve``)."""
        while not stopping.wait(TICK_SECONDS):
            try:
                self.poll_due()
            except Exception:  # a broken poll must not end the thread
                log.exception("source polling failed")

    def poll_due(self, now: datetime | None = None) -> list[PollReport]:
        now = now or utcnow()
        with session_scope(self.session_factory) as session:
            due = session.scalars(
                select(Source.id).where(Source.enabled.is_(True), Source.next_poll_at <= now)
            ).all()
        return [self.poll(source_id) for source_id in due]

    def poll(self, source_id: int) -> PollReport:
        """Search one source and retrieve what is new; its state updated either way."""
        started = utcnow()
        with session_scope(self.session_factory) as session:
            source = session.get(Source, source_id)
            if source is None:
                return PollReport(source=f"#{source_id}", error="no such source")
            name, search_from = source.name, source.search_from
            study_dates = f"{search_from}-{started:%Y%m%d}"
            modalities = source.modalities
            dimse = (
                (str(source.ae_title), str(source.host), int(source.port or 0))
                if source.kind == PeerKind.DIMSE
                else None
            )
            endpoint = None if dimse else source_endpoint(source)
            held = set(
                session.scalars(
                    select(PulledStudy.study_uid).where(PulledStudy.source_id == source_id)
                )
            )
        report = PollReport(source=name)
        try:
            with contextlib.ExitStack() as stack:
                search: Callable[[], list[str]]
                retrieve: Callable[[str], int]
                if dimse is not None:
                    # C-MOVE to our own listener, whose association end completes the study.
                    search = partial(
                        find_studies,
                        self.settings,
                        *dimse,
                        study_dates=study_dates,
                        modalities=modalities,
                    )
                    retrieve = partial(move_study, self.settings, *dimse)
                    completes_itself = True
                else:
                    assert endpoint is not None
                    client = stack.enter_context(http_client(endpoint, timeout=TIMEOUT))
                    search = partial(self._search, client, endpoint.url, study_dates, modalities)
                    retrieve = partial(self._retrieve, client, endpoint.url, name=name)
                    completes_itself = False
                found = search()
                report.found = len(found)
                for study_uid in found:
                    if study_uid in held:
                        continue
                    stored = retrieve(study_uid)
                    with session_scope(self.session_factory) as session:
                        session.add(
                            PulledStudy(source_id=source_id, study_uid=study_uid, instances=stored)
                        )
                    report.pulled.append(study_uid)
                    if self.on_pulled is not None and not completes_itself:
                        self.on_pulled({study_uid})
        except (httpx.HTTPError, RetryableError, PermanentError, ValueError, OSError) as exc:
            report.error = _describe(exc)
        self._settle(source_id, started, report)
        return report

    def _search(
        self, client: httpx.Client, base: str, study_dates: str, modalities: str | None
    ) -> list[str]:
        params = {"StudyDate": study_dates, "limit": str(PAGE)}
        if modalities:
            params["ModalitiesInStudy"] = modalities.replace("\\", ",")
        found: list[str] = []
        offset = 0
        while True:
            reply = client.get(
                f"{base.rstrip('/')}/studies",
                params={**params, "offset": str(offset), "includefield": "0020000D"},
                headers={"Accept": "application/dicom+json"},
            )
            if reply.status_code == 204:
                break
            if reply.status_code != 200:
                raise SourceError(f"QIDO-RS answered HTTP {reply.status_code}")
            page = reply.json() or []
            for study in page:
                uid = study.get("0020000D", {}).get("Value", [None])[0]
                if uid and uid not in found:
                    found.append(str(uid))
            if len(page) < PAGE:
                break
            offset += len(page)
        return found

    def _retrieve(self, client: httpx.Client, base: str, study_uid: str, *, name: str) -> int:
        """Retrieve one study into the spool, part by part; the instances stored."""
        url = f"{base.rstrip('/')}/studies/{study_uid}"
        with client.stream("GET", url, headers={"Accept": AS_STORED}) as reply:
            if reply.status_code != 200:
                raise SourceError(f"WADO-RS of a study answered HTTP {reply.status_code}")
            _, params = media_type(reply.headers.get("content-type", ""))
            stow = StowRequest(
                ingestor=self.ingestor,
                session_factory=self.session_factory,
                boundary=params.get("boundary", ""),
                study_uid=study_uid,
                caller=f"source {name}",
                address=None,
            )
            try:
                for piece in reply.iter_bytes():
                    stow.feed(piece)
            except BaseException:
                stow.abort()
                raise
            result = stow.finish()
        if result.syntax_error is not None and not result.stored:
            raise SourceError(f"the study could not be read: {result.syntax_error}")
        log.info(
            "study pulled",
            extra={
                "source": name,
                "study_uid": study_uid,
                "stored": len(result.stored),
                "failed": len(result.failed),
            },
        )
        return len(result.stored)

    def _settle(self, source_id: int, started: datetime, report: PollReport) -> None:
        with session_scope(self.session_factory) as session:
            source = session.get(Source, source_id)
            if source is None:
                return
            source.last_polled_at = utcnow()
            if report.error is None:
                lookback = timedelta(days=self.settings.pull_lookback_days)
                source.search_from = max(source.search_from, f"{started - lookback:%Y%m%d}")
                source.failures = 0
                source.last_error = None
                source.next_poll_at = started + timedelta(seconds=self.settings.pull_poll_seconds)
                return
            source.failures += 1
            source.last_error = report.error[:500]
            wait = self.backoff.delay(source.failures)
            source.next_poll_at = utcnow() + timedelta(seconds=wait)
            log.warning(
                "source poll failed: %s",
                report.error,
                extra={
                    "source": source.name,
                    "failures": source.failures,
                    "retry_in": round(wait, 1),
                    "url": redacted_url(str(source.url))
                    if source.kind == PeerKind.DICOMWEB
                    else f"{source.ae_title}@{source.host}:{source.port}",
                },
            )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPError):
        return f"cannot reach the source: {type(exc).__name__}"
    return str(exc) or type(exc).__name__
