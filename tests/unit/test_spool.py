"""The durable spool on a real filesystem: files written piece by piece, and spare files."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from triage.storage.spool import Spool


def _parts(spool: Spool) -> set[str]:
    return {path.name for path in spool.tmp.glob("*.part")}


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_file_written_in_uneven_pieces_is_whole_after_commit(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    data = os.urandom(700_000)
    pieces, offset, chance = [], 0, random.Random(7)
    while offset < len(data):  # from 1 byte to 200 kB, across page and writeback boundaries
        size = chance.choice([1, 7, 4095, 4097, 65_536, 200_000])
        pieces.append(data[offset : offset + size])
        offset += size

    incoming = spool.open()
    for piece in pieces:
        incoming.write(memoryview(piece))
    assert not spool.path_for(incoming.file_id).exists()  # nothing in objects/ before commit
    spooled = incoming.commit()

    assert spooled.path.read_bytes() == data
    assert spooled.size_bytes == len(data)
    assert spooled.digest == "xxh3-128:" + xxhash.xxh3_128(data).hexdigest()
    assert _parts(spool) == set()


def _open_directories(spool: Spool) -> set[str]:
    """The spool's directories this process holds open."""
    fds = Path("/proc/self/fd")
    return {
        target
        for target in (os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink())
        if target.startswith(str(spool.objects)) and Path(target).is_dir()
    }


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_spare_files_are_used_refilled_and_removed_on_close(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.keep_ready(4)
    _wait_for(lambda: len(_parts(spool)) == 4)
    ready = _parts(spool)

    renamed_into = set()
    for _ in range(2):  # down to half of them: they are made good again
        incoming = spool.open()
        assert f"{incoming.file_id}.part" in ready  # a file made ahead, not a new one
        incoming.write(b"DICM" * 100)
        stored = incoming.commit()
        assert stored.path.read_bytes() == b"DICM" * 100
        renamed_into.add(str(stored.path.parent))
    _wait_for(lambda: len(_parts(spool)) == 4)
    # The directories renamed into stay open for their fsyncs, until close().
    assert _open_directories(spool) == renamed_into

    discarded = spool.open()
    discarded.write(b"partial")
    discarded.discard()
    assert f"{discarded.file_id}.part" not in _parts(spool)

    spool.close()
    assert _open_directories(spool) == set()
    assert _parts(spool) == set()  # spares not taken are deleted
    after = spool.open()  # and without spares a file is created on the spot
    after.write(b"x")
    assert after.commit().path.read_bytes() == b"x"
    assert _parts(spool) == set()
