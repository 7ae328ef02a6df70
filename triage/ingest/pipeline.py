"""One path for every instance, from the listener or from ``triage-admin import``:
parse the header, spool durably, commit the index rows. Success is owed only after that."""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import configure_mappers

from triage.db.base import utcnow
from triage.dicom.header import Bytes, InstanceHeader, data_set_offset, parse_header
from triage.domain import IndexOutcome
from triage.errors import DatasetMismatchError, OutOfResourcesError
from triage.ingest.index import IndexResult, SameContent, index_instance
from triage.metrics import IngestMetrics
from triage.storage.spool import IncomingFile, Spool, SpooledFile, content_digest

log = logging.getLogger(__name__)

INDEX_ATTEMPTS = 3


COMPARED_BYTES = 1 << 20
"""Two files' data sets are compared in pieces of this size (memory stays flat for any size)."""
META_BYTES = 64 << 10
"""Room to find where a file's data set starts (its File Meta Information is far shorter)."""


def same_data_set(first: BinaryIO, second: BinaryIO) -> bool:
    """Whether two DICOM files carry the same data set byte for byte, their file meta aside;
    read in pieces."""
    first_start, second_start = (data_set_offset(file.read(META_BYTES)) for file in (first, second))
    first_size = first.seek(0, io.SEEK_END) - first_start
    if first_size != second.seek(0, io.SEEK_END) - second_start:
        return False
    first.seek(first_start)
    second.seek(second_start)
    while True:
        piece = first.read(COMPARED_BYTES)
        if piece != second.read(COMPARED_BYTES):
            return False
        if not piece:
            return True


def _opened(content: Bytes | str) -> BinaryIO:
    """A DICOM file's bytes, or its path, as a file (bytes are copied: they are small)."""
    return open(content, "rb") if isinstance(content, str) else io.BytesIO(content)


@dataclass(frozen=True)
class Ingested:
    header: InstanceHeader
    result: IndexResult


class Ingestor:
    """Turns encoded instances into spool files and committed index rows.

    ``engine`` is made with ``create_db_engine(url, rebuildable=True)``: every row it commits
    has its spool file, made durable first.
    """

    def __init__(
        self,
        *,
        spool: Spool,
        engine: Engine,
        metrics: IngestMetrics,
        on_stored: Callable[[Ingested, str | None], None] | None = None,
        writers_lock: Path | None = None,
    ) -> None:
        self.spool = spool
        self.engine = engine
        # SQLite takes one writer at a time, and a connection that finds the database locked
        # sleeps 1, 2, 5, 10 ms... before it looks again. The associations of this process
        # queue on a lock instead, which hands over as soon as the writer commits, and share
        # one connection, held (no pool checkout per instance). PostgreSQL locks rows: each
        # transaction takes a connection from the pool.
        self._one_writer = engine.dialect.name == "sqlite"
        self._writer_lock = threading.Lock()
        # Receiver processes on one SQLite database queue on a lock file the same way: a
        # blocked flock() returns as soon as the holder lets go, where SQLite's busy handler
        # sleeps 1, 2, 5 ms... between looks.
        self._writers_fd = (
            os.open(writers_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            if writers_lock is not None and self._one_writer
            else None
        )
        self._writer: Connection | None = None
        self.metrics = metrics
        self.on_stored = on_stored
        # The ORM's mappers configure themselves on first use (tens of ms, GIL held): at
        # start, not inside the first C-STORE after a restart.
        configure_mappers()

    def ingest(
        self,
        data: Bytes | None,
        *,
        calling_ae: str | None,
        source: str,
        requested: tuple[str, str] | None = None,
        incoming: IncomingFile | None = None,
        header: InstanceHeader | None = None,
    ) -> Ingested:
        """Store one DICOM file's bytes (preamble and meta included).

        ``requested`` is the (SOP Class UID, SOP Instance UID) a C-STORE request named; the
        dataset must carry the same. ``incoming`` is a spool file already holding ``data``, or,
        with ``data`` None, holding the whole file (the listener writes each data set to it
        while it arrives, and never holds it whole): it is committed or discarded here, and
        the header is read from it on disk. ``header`` is ``parse_header(data)`` where the
        caller has it already. Raises DicomInputError (cannot be understood) or
        OutOfResourcesError (try later).
        """
        started = time.perf_counter()
        if incoming is None:
            if data is None:
                raise ValueError("ingest needs the data or the spool file holding it")
            incoming = self.spool.open()  # refuses below the free-space reserve, before parsing
            incoming.write(data)
        try:
            if header is None and data is None:
                with incoming.mapped() as written:
                    header = self._checked_header(written, requested, None)
            else:
                header = self._checked_header(data, requested, header)
        except BaseException:
            incoming.discard()
            raise
        spooled = incoming.commit()
        # Duplicates are found inside the index transaction; an identical re-send costs one
        # spool write that is removed again, which keeps new instances on the short path.
        content = spooled.location if data is None else data
        try:
            result = self._index(header, spooled=spooled, content=content, calling_ae=calling_ae)
        except BaseException:
            self.spool.remove(spooled.file_id)
            raise
        if result.outcome is IndexOutcome.DUPLICATE:
            self.spool.remove(spooled.file_id)
        ingested = Ingested(header, result)
        if result.outcome is IndexOutcome.DUPLICATE:
            self.metrics.duplicates.inc()
        else:
            self.metrics.instances.labels(source=source).inc()
            self.metrics.bytes.inc(spooled.size_bytes)
        self.metrics.spool_seconds.observe(time.perf_counter() - started)
        if self.on_stored is not None:
            self.on_stored(ingested, calling_ae)
        return ingested

    @staticmethod
    def _checked_header(
        data: Bytes | None, requested: tuple[str, str] | None, header: InstanceHeader | None
    ) -> InstanceHeader:
        if header is None:
            assert data is not None
            header = parse_header(data)
        if requested is not None and requested != (header.sop_class_uid, header.sop_instance_uid):
            raise DatasetMismatchError("dataset UIDs differ from the C-STORE request")
        return header

    def adopt(self, path: Path) -> Ingested:
        """Index a spool file that has no row: its writer crashed before the commit, or a
        power cut took the commit (see ``create_db_engine``). It is whole (renamed after
        fsync), so keep it; the caller is the Source AE Title its file meta names.
        Raises DicomInputError if it cannot be parsed: the caller quarantines it.
        """
        data = path.read_bytes()
        header = parse_header(data)
        spooled = SpooledFile(path.stem, str(path), len(data), content_digest(data))
        result = self._index(header, spooled=spooled, content=data, calling_ae=header.source_ae)
        if result.outcome is IndexOutcome.DUPLICATE:
            self.spool.remove(spooled.file_id)
        return Ingested(header, result)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        if not self._one_writer:
            with self.engine.begin() as connection:
                yield connection
            return
        with self._writer_lock:
            writer = self._writer
            if writer is None or writer.closed or writer.invalidated:
                writer = self._writer = self.engine.connect()
            with self._other_processes(), writer.begin():
                yield writer

    @contextlib.contextmanager
    def _other_processes(self) -> Iterator[None]:
        """The writers' lock file held, where receiver processes share the database."""
        fd = self._writers_fd
        if fd is None:
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Give back the connection held for SQLite (the engine is the caller's to dispose)."""
        with self._writer_lock:
            writer, self._writer = self._writer, None
            fd, self._writers_fd = self._writers_fd, None
        if writer is not None:
            writer.close()
        if fd is not None:
            os.close(fd)

    def _same_content(self, content: Bytes | str) -> SameContent:
        """Whether a spool file carries the data set of ``content`` (a DICOM file's bytes, or
        its path), byte for byte, whatever its file meta (a missing or unreadable file does
        not). Only a re-send asks, so nothing is worked out before."""

        def same(file_id: str) -> bool:
            try:
                with (
                    open(self.spool.location_for(file_id), "rb") as held,
                    _opened(content) as ours,
                ):
                    return same_data_set(held, ours)
            except OSError:
                return False

        return same

    def _index(
        self,
        header: InstanceHeader,
        *,
        spooled: SpooledFile,
        content: Bytes | str,
        calling_ae: str | None,
    ) -> IndexResult:
        same_content = self._same_content(content)
        for attempt in range(1, INDEX_ATTEMPTS + 1):
            try:
                with self._transaction() as connection:
                    return index_instance(
                        connection=connection,
                        header=header,
                        spooled=spooled,
                        same_content=same_content,
                        calling_ae=calling_ae,
                        now=utcnow(),
                    )
            except (IntegrityError, OperationalError) as exc:
                # Another association indexed the same study, series or version at the same
                # moment (or SQLite stayed locked): start the transaction again.
                if attempt == INDEX_ATTEMPTS:
                    raise OutOfResourcesError(f"index busy: {type(exc).__name__}") from exc
                log.info(
                    "index conflict, retrying",
                    extra={"sop_instance_uid": header.sop_instance_uid, "attempt": attempt},
                )
            except SQLAlchemyError as exc:
                raise OutOfResourcesError(f"index unavailable: {type(exc).__name__}") from exc
        raise AssertionError("unreachable")
