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
    try:
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temporary, final)
        _fsync_dir(final.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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

    def write(self, data: bytes, *, sha256: str | None = None) -> SpooledFile:
        """Store ``data`` durably and return its id. Raises OutOfResourcesError on a full disk."""
        if not self.has_room():
            raise OutOfResourcesError("spool is below its free-space reserve")
        file_id = uuid.uuid4().hex
        final = self.path_for(file_id)
        temporary = self.tmp / f"{file_id}.part"
        try:
            write_durably(final, data, temporary=temporary)
        except OSError as exc:
            self._free_checked_at = 0.0  # look again next time
            raise OutOfResourcesError(f"spool write failed: {exc.strerror}") from exc
        return SpooledFile(file_id, final, len(data), sha256 or content_hash(data))

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
