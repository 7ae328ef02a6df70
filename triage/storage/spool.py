"""The durable spool: each received instance as one file named by our own id.

A file is written to ``tmp/``, fsynced, renamed into ``objects/``, and the directory fsynced,
so after a crash a file in ``objects/`` is whole. Names never come from the wire.

Two things keep the disk off the association's path where they can: writeback of each file
starts while its data set is still arriving (so the fsync at the end waits for the tail, not
the whole file), and the listener takes empty files made ahead of need (creating a file costs
from 0.1 ms to over 1 ms on ext4, most just after many files were deleted).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from triage.config import Settings
from triage.errors import DicomInputError, OutOfResourcesError

# The spool's hot path (a few file operations per received instance) names files with strings:
# each pathlib operation costs microseconds of Python, with the GIL held.
StrPath = str | os.PathLike[str]


@dataclass(frozen=True)
class SpooledFile:
    file_id: str
    location: str
    size_bytes: int
    digest: str

    @property
    def path(self) -> Path:
        return Path(self.location)


DIGEST_ALGORITHM = "xxh3-128"
"""What ``content_digest`` names its digests with. XXH3 is not cryptographic: the digest is a
spool file's checksum, to find damage, and nothing is taken for a duplicate on its word (a
re-send is compared with the held files byte by byte, see ``triage.ingest.index``). Per 512 KiB
CT slice it costs about 15 us against about 400 us for SHA-256 with the CPU's SHA extensions,
on the ingest path before Success."""


def content_digest(data: bytes | bytearray | memoryview) -> str:
    """``xxh3-128:<32 hex digits>``: the digest a spool file's index row carries."""
    return f"{DIGEST_ALGORITHM}:{xxhash.xxh3_128_hexdigest(data)}"


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_WRITEBACK_CHUNK = 64 * 1024  # start writeback once this much whole-page data is waiting
_PAGE = 4096


def _writeback_starter() -> Callable[[int, int, int], object] | None:
    """Linux's sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE), or None elsewhere.

    It only queues the pages for writing (no metadata, no cache flush: no durability); the
    fsync in ``commit()`` still makes the file durable, with less left to wait for.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE
    return lambda fd, offset, length: function(fd, offset, length, write)


_start_writeback = _writeback_starter()


def new_file_id() -> str:
    """A spool file's name: 128 random bits in hex (never anything from the wire)."""
    return os.urandom(16).hex()


def _fsync_dir(path: StrPath) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _OpenDirectories:
    """Directories kept open for their fsyncs: an open and a close fewer per file."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fsync(self, path: str) -> None:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)


def write_durably(final: StrPath, data: bytes, *, temporary: StrPath) -> None:
    """Write ``data`` to ``temporary``, fsync, rename onto ``final``, fsync the directory."""
    writer = DurableWriter(final, temporary=temporary)
    try:
        writer.write(data)
    except BaseException:
        writer.discard()
        raise
    writer.commit()


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class DurableWriter:
    """A file written piece by piece into ``temporary`` and, on ``commit()``, fsynced and
    renamed onto ``final`` (directory fsynced too). Until then ``final`` does not exist.

    Pieces are digested (``content_digest``) as they are written. ``fd``, if given, is ``temporary``
    already created empty and open for writing; ``sync_dir`` fsyncs a directory. Raises
    OSError as the system does.
    """

    def __init__(
        self,
        final: StrPath,
        *,
        temporary: StrPath,
        fd: int | None = None,
        sync_dir: Callable[[str], None] = _fsync_dir,
    ) -> None:
        self.final = os.fspath(final)
        self.temporary = os.fspath(temporary)
        self._sync_dir = sync_dir
        self.size = 0
        self._queued = 0  # bytes handed to writeback so far
        self._hash = xxhash.xxh3_128()
        self._fd: int | None = os.open(temporary, _CREATE_FLAGS, 0o640) if fd is None else fd

    def write(self, piece: bytes | bytearray | memoryview) -> None:
        if self._fd is None:
            raise ValueError("writer already committed or discarded")
        view = memoryview(piece)
        self._hash.update(view)
        self.size += len(view)
        while view:
            view = view[os.write(self._fd, view) :]
        whole_pages = self.size - self.size % _PAGE
        if _start_writeback is not None and whole_pages - self._queued >= _WRITEBACK_CHUNK:
            _start_writeback(self._fd, self._queued, whole_pages - self._queued)
            self._queued = whole_pages

    @property
    def digest(self) -> str:
        return f"{DIGEST_ALGORITHM}:{self._hash.hexdigest()}"

    def commit(self) -> None:
        if self._fd is None:
            raise ValueError("writer already committed or discarded")
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(self.temporary)
            raise
        os.close(fd)
        directory = os.path.dirname(self.final)
        try:
            try:
                os.replace(self.temporary, self.final)
            except FileNotFoundError:
                os.makedirs(directory, exist_ok=True)
                os.replace(self.temporary, self.final)
            self._sync_dir(directory)
        except BaseException:
            _unlink(self.temporary)
            raise

    def discard(self) -> None:
        """Forget the file (nothing happens after a commit)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            _unlink(self.temporary)


class IncomingFile:
    """A spool file being written; ``commit()`` makes it durable, ``discard()`` drops it.

    Every OSError (a full disk above all) comes out as OutOfResourcesError, and a failed
    file is discarded.
    """

    def __init__(self, spool: Spool, file_id: str, fd: int | None = None) -> None:
        self.spool = spool
        self.file_id = file_id
        try:
            self._writer = DurableWriter(
                spool.location_for(file_id),
                temporary=spool.temporary_location_for(file_id),
                fd=fd,
                sync_dir=spool.sync_dir,
            )
        except OSError as exc:
            raise spool._failed(exc) from exc

    def write(self, piece: bytes | bytearray | memoryview) -> None:
        try:
            self._writer.write(piece)
        except OSError as exc:
            self._writer.discard()
            raise self.spool._failed(exc) from exc

    @contextlib.contextmanager
    def mapped(self) -> Iterator[memoryview]:
        """What is written so far, mapped read-only: the pages read are the page cache's,
        not a copy (a header is read from a file of any size in a few pages)."""
        try:
            fd = os.open(self._writer.temporary, os.O_RDONLY | os.O_CLOEXEC)
            try:
                mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self.spool._failed(exc) from exc
        except ValueError as exc:  # an empty file cannot be mapped
            raise DicomInputError("no data received") from exc
        view = memoryview(mapping)
        try:
            yield view
        finally:
            view.release()
            # A view still held elsewhere (a traceback's frame) keeps the mapping until it
            # is collected.
            with contextlib.suppress(BufferError):
                mapping.close()

    def commit(self) -> SpooledFile:
        try:
            self._writer.commit()
        except OSError as exc:
            raise self.spool._failed(exc) from exc
        writer = self._writer
        return SpooledFile(self.file_id, writer.final, writer.size, writer.digest)

    def discard(self) -> None:
        self._writer.discard()


class _Spares:
    """Empty temporary files (named by ``temporary_for``, a spool's ``temporary_location_for``)
    made ahead of need by a thread, ``count`` kept ready."""

    def __init__(self, temporary_for: Callable[[str], str], count: int) -> None:
        self._temporary_for = temporary_for
        self._count = count
        self._ready: deque[tuple[str, int]] = deque()
        self._wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="spool-spares", daemon=True)
        self._wanted.set()
        self._thread.start()

    def take(self) -> tuple[str, int] | None:
        """A ready (file id, open fd), or None when none is ready."""
        try:
            spare = self._ready.popleft()
        except IndexError:
            spare = None
        if len(self._ready) <= self._count // 2:  # refill by halves: one wake-up per few files
            self._wanted.set()
        return spare

    def _run(self) -> None:
        while not self._stopping:
            self._wanted.wait()
            self._wanted.clear()
            while not self._stopping and len(self._ready) < self._count:
                file_id = new_file_id()
                try:
                    fd = os.open(self._temporary_for(file_id), _CREATE_FLAGS, 0o640)
                except OSError:
                    break  # a full disk: open() tries itself and reports it
                self._ready.append((file_id, fd))

    def close(self) -> None:
        """Stop making spares and delete those not taken."""
        self._stopping = True
        self._wanted.set()
        self._thread.join()
        while self._ready:
            file_id, fd = self._ready.popleft()
            os.close(fd)
            _unlink(self._temporary_for(file_id))


class Spool:
    """Files under ``root``: ``objects/ab/<id>.dcm``, ``tmp/``, ``quarantine/``."""

    FREE_SPACE_CHECK_SECONDS = 1.0

    def __init__(self, root: Path, *, min_free_bytes: int, tmp_subdir: str | None = None) -> None:
        self.root = root
        self.objects = root / "objects"
        # A receiver process writes into tmp/<its own>/: processes creating and renaming
        # files in one directory queue on its lock.
        self.tmp = root / "tmp" / tmp_subdir if tmp_subdir else root / "tmp"
        self.quarantine_dir = root / "quarantine"
        self.min_free_bytes = min_free_bytes
        for directory in (self.objects, self.tmp, self.quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for prefix in range(256):  # every objects/<xx>/ now, not on the first C-STORE to each
            (self.objects / f"{prefix:02x}").mkdir(exist_ok=True)
        self._objects_prefix = os.path.join(self.objects, "")
        self._tmp_prefix = os.path.join(self.tmp, "")
        self._free_checked_at = 0.0
        self._has_room = True
        self._spares: _Spares | None = None
        self._directories: _OpenDirectories | None = None

    @classmethod
    def for_settings(cls, settings: Settings, *, tmp_subdir: str | None = None) -> Spool:
        return cls(
            settings.data_dir / "spool",
            min_free_bytes=settings.spool_min_free_mb * 1024 * 1024,
            tmp_subdir=tmp_subdir,
        )

    def path_for(self, file_id: str) -> Path:
        return Path(self.location_for(file_id))

    def location_for(self, file_id: str) -> str:
        """``path_for`` as a string (objects/ab/<id>.dcm): the ingest path's."""
        return f"{self._objects_prefix}{file_id[:2]}/{file_id}.dcm"

    def temporary_location_for(self, file_id: str) -> str:
        return f"{self._tmp_prefix}{file_id}.part"

    def keep_ready(self, spares: int) -> None:
        """Keep ``spares`` empty files ready for ``open()``, and the directories files are
        renamed into open for their fsyncs (the listener does; an import need not).
        ``close()`` deletes the spares not taken; a crash leaves them to ``clear_tmp()``."""
        if self._spares is None:
            self._spares = _Spares(self.temporary_location_for, spares)
            self._directories = _OpenDirectories()

    def close(self) -> None:
        spares, self._spares = self._spares, None
        if spares is not None:
            spares.close()
        directories, self._directories = self._directories, None
        if directories is not None:
            directories.close()

    def sync_dir(self, path: StrPath) -> None:
        """fsync the directory ``path``, through an open descriptor while ``keep_ready``."""
        directories = self._directories  # once: close() may clear it meanwhile
        if directories is not None:
            directories.fsync(os.fspath(path))
        else:
            _fsync_dir(path)

    def has_room(self) -> bool:
        """Whether free space is above the reserve; checked at most once a second."""
        now = time.monotonic()
        if now - self._free_checked_at >= self.FREE_SPACE_CHECK_SECONDS:
            self._has_room = shutil.disk_usage(self.root).free >= self.min_free_bytes
            self._free_checked_at = now
        return self._has_room

    def open(self) -> IncomingFile:
        """A new spool file to be written as its bytes arrive.

        Raises OutOfResourcesError below the free-space reserve or when it cannot be created.
        """
        if not self.has_room():
            raise OutOfResourcesError("spool is below its free-space reserve")
        spares = self._spares  # once: close() may clear it meanwhile
        spare = spares.take() if spares is not None else None
        if spare is not None:
            return IncomingFile(self, *spare)
        return IncomingFile(self, new_file_id())

    def _failed(self, exc: OSError) -> OutOfResourcesError:
        self._free_checked_at = 0.0  # look again next time
        return OutOfResourcesError(f"spool write failed: {exc.strerror}")

    def remove(self, file_id: str) -> None:
        _unlink(self.location_for(file_id))

    def quarantine(self, path: Path) -> Path:
        """Move a file the index cannot account for out of the way, keeping it for inspection."""
        target = self.quarantine_dir / path.name
        os.replace(path, target)
        self.sync_dir(self.quarantine_dir)
        return target

    def stored_ids(self) -> Iterator[str]:
        for path in self.objects.glob("*/*.dcm"):
            yield path.stem

    def clear_tmp(self) -> int:
        """Delete partial writes left by a crash; they were never acknowledged."""
        count = 0
        for path in self.tmp.glob("**/*.part"):  # receiver processes' tmp/<n>/ too
            path.unlink(missing_ok=True)
            count += 1
        return count
