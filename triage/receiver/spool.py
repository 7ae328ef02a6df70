"""The durable spool: each received instance as one file named by our own id.

A file is written to ``tmp/``, fsynced, renamed into ``objects/``, and the directory fsynced,
so after a crash a file in ``objects/`` is whole. Names never come from the wire.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from triage.config import Settings
from triage.errors import OutOfResourcesError


@dataclass(frozen=True)
class SpooledFile:
    file_id: str
    path: Path
    size_bytes: int
    sha256: str


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(final: Path, data: bytes, *, temporary: Path) -> None:
    """Write ``data`` to ``temporary``, fsync, rename onto ``final``, fsync the directory."""
    writer = DurableWriter(final, temporary=temporary)
    try:
        writer.write(data)
    except BaseException:
        writer.discard()
        raise
    writer.commit()


class DurableWriter:
    """A file written piece by piece into ``temporary`` and, on ``commit()``, fsynced and
    renamed onto ``final`` (directory fsynced too). Until then ``final`` does not exist.

    Pieces are hashed (SHA-256) as they are written. Raises OSError as the system does.
    """

    def __init__(self, final: Path, *, temporary: Path) -> None:
        self.final = final
        self.temporary = temporary
        self.size = 0
        self._hash = hashlib.sha256()
        self._fd: int | None = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640
        )

    def write(self, piece: bytes | bytearray | memoryview) -> None:
        if self._fd is None:
            raise ValueError("writer already committed or discarded")
        view = memoryview(piece)
        self._hash.update(view)
        self.size += len(view)
        while view:
            view = view[os.write(self._fd, view) :]

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self) -> None:
        if self._fd is None:
            raise ValueError("writer already committed or discarded")
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.temporary.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            try:
                os.replace(self.temporary, self.final)
            except FileNotFoundError:
                self.final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.temporary, self.final)
            _fsync_dir(self.final.parent)
        except BaseException:
            self.temporary.unlink(missing_ok=True)
            raise

    def discard(self) -> None:
        """Forget the file (nothing happens after a commit)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            self.temporary.unlink(missing_ok=True)


class IncomingFile:
    """A spool file being written; ``commit()`` makes it durable, ``discard()`` drops it.

    Every OSError (a full disk above all) comes out as OutOfResourcesError, and a failed
    file is discarded.
    """

    def __init__(self, spool: Spool, file_id: str) -> None:
        self.spool = spool
        self.file_id = file_id
        try:
            self._writer = DurableWriter(
                spool.path_for(file_id), temporary=spool.tmp / f"{file_id}.part"
            )
        except OSError as exc:
            raise spool._failed(exc) from exc

    def write(self, piece: bytes | bytearray | memoryview) -> None:
        try:
            self._writer.write(piece)
        except OSError as exc:
            self._writer.discard()
            raise self.spool._failed(exc) from exc

    def commit(self) -> SpooledFile:
        try:
            self._writer.commit()
        except OSError as exc:
            raise self.spool._failed(exc) from exc
        return SpooledFile(self.file_id, self._writer.final, self._writer.size, self._writer.sha256)

    def discard(self) -> None:
        self._writer.discard()


class Spool:
    """Files under ``root``: ``objects/ab/<id>.dcm``, ``tmp/``, ``quarantine/``."""

    FREE_SPACE_CHECK_SECONDS = 1.0

    def __init__(self, root: Path, *, min_free_bytes: int) -> None:
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.quarantine_dir = root / "quarantine"
        self.min_free_bytes = min_free_bytes
        for directory in (self.objects, self.tmp, self.quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for prefix in range(256):  # every objects/<xx>/ now, not on the first C-STORE to each
            (self.objects / f"{prefix:02x}").mkdir(exist_ok=True)
        self._free_checked_at = 0.0
        self._has_room = True

    @classmethod
    def for_settings(cls, settings: Settings) -> Spool:
        return cls(
            settings.data_dir / "spool", min_free_bytes=settings.spool_min_free_mb * 1024 * 1024
        )

    def path_for(self, file_id: str) -> Path:
        return self.objects / file_id[:2] / f"{file_id}.dcm"

    def has_room(self) -> bool:
        """Whether free space is above the reserve; checked at most once a second."""
        now = time.monotonic()
        if now - self._free_checked_at >= self.FREE_SPACE_CHECK_SECONDS:
            self._has_room = shutil.disk_usage(self.root).free >= self.min_free_bytes
            self._free_checked_at = now
        return self._has_room

    def write(self, data: bytes) -> SpooledFile:
        """Store ``data`` durably and return its id. Raises OutOfResourcesError on a full disk."""
        incoming = self.open()
        incoming.write(data)
        return incoming.commit()

    def open(self) -> IncomingFile:
        """A new spool file to be written as its bytes arrive.

        Raises OutOfResourcesError below the free-space reserve or when it cannot be created.
        """
        if not self.has_room():
            raise OutOfResourcesError("spool is below its free-space reserve")
        return IncomingFile(self, uuid.uuid4().hex)

    def _failed(self, exc: OSError) -> OutOfResourcesError:
        self._free_checked_at = 0.0  # look again next time
        return OutOfResourcesError(f"spool write failed: {exc.strerror}")

    def remove(self, file_id: str) -> None:
        self.path_for(file_id).unlink(missing_ok=True)

    def quarantine(self, path: Path) -> Path:
        """Move a file the index cannot account for out of the way, keeping it for inspection."""
        target = self.quarantine_dir / path.name
        os.replace(path, target)
        _fsync_dir(self.quarantine_dir)
        return target

    def stored_ids(self) -> Iterator[str]:
        for path in self.objects.glob("*/*.dcm"):
            yield path.stem

    def clear_tmp(self) -> int:
        """Delete partial writes left by a crash; they were never acknowledged."""
        count = 0
        for path in self.tmp.glob("*.part"):
            path.unlink(missing_ok=True)
            count += 1
        return count
