"""A stateful fuzzer against a real ``triage serve``: associations of valid and mutated
requests, commands and data sets, cut at random PDV, PDU and TCP boundaries (Hypothesis).

After every session: the daemon is alive; nothing is stored without a Success; every stored
data set is one that was answered Success, byte for byte. Every few sessions it must answer a
C-ECHO. After the run: its threads, file descriptors, temporary files and memory are back to
their baseline.

A short run is part of the suite. A long one is a documented command (README, Testing):

    TRIAGE_TEST_FUZZ_SECONDS=1800 .venv/bin/pytest tests/integration/test_fuzz_receiver.py -s
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE

from tests.helpers.fuzz import (
    Echo,
    Garbage,
    Ledger,
    Message,
    Mutation,
    Session,
    Store,
    run_session,
)
from tests.helpers.instances import dataset_bytes_of
from tests.helpers.process import child_pids, serve_env, serving, wait_for

FUZZ_SECONDS = float(os.environ.get("TRIAGE_TEST_FUZZ_SECONDS", "0"))
SHORT_EXAMPLES = 30  # per receiver configuration, in the suite
WARM_UP_EXAMPLES = 15
ECHO_EVERY = 10

mutations = st.builds(
    Mutation,
    kind=st.sampled_from(["flip", "truncate", "insert"]),
    offset=st.integers(0, 1 << 20),
    value=st.integers(1, 255),
)
# Most traffic is well formed (so that most of it reaches the deep states), and any part of
# it may be broken: a mutation's chance is about one in eight where it can apply.


def rarely(strategy: st.SearchStrategy[Mutation]) -> st.SearchStrategy[Mutation | None]:
    # Hypothesis's one_of and integers are not uniform; sampled_from is (and shrinks to its
    # first element: no mutation).
    return st.tuples(st.sampled_from([False] * 7 + [True]), strategy).map(
        lambda chosen: chosen[1] if chosen[0] else None
    )


stores = st.builds(
    Store,
    side=st.integers(1, 300),
    seed=st.integers(0, 1 << 32),
    fragment=st.integers(1, 140_000) | st.sampled_from([1, 2, 6, 16_378, 131_066]),
    per_pdu=st.integers(1, 6),
    body_mutation=rarely(mutations),
    mutation=rarely(mutations),
)
_kinds: dict[str, st.SearchStrategy[Message]] = {
    "store": stores,
    "echo": st.builds(Echo, mutation=rarely(mutations)),
    "garbage": st.builds(Garbage, pdu_type=st.integers(0, 255), body=st.binary(max_size=80)),
}
messages: st.SearchStrategy[Message] = st.sampled_from(["store"] * 6 + ["echo", "garbage"]).flatmap(
    _kinds.__getitem__
)
sessions = st.builds(
    Session,
    calling=st.sampled_from(["FUZZ", "A", "SIXTEENCHARSAE16"]),
    called=st.sampled_from(["TRIAGE"] * 7 + ["SOMEONE"]),
    request_mutation=rarely(mutations),
    messages=st.lists(messages, min_size=1, max_size=5),
    ending=st.sampled_from(["release", "release", "abort", "close", "half"]),
    chunk=st.integers(1, 1 << 17) | st.sampled_from([1, 7, 1 << 20]),
    pause=st.booleans(),
)


class Daemon:
    """``triage serve`` under fuzzing, and what it is checked against."""

    def __init__(self, pid: int, port: int, data_dir: Path) -> None:
        self.pid = pid
        self.port = port
        self.data_dir = data_dir
        self.ledger = Ledger()
        self.held: dict[str, tuple[str, bytes]] = {}  # spool file id -> what it holds

    def processes(self) -> list[int]:
        return [self.pid, *child_pids(self.pid)]

    def alive(self) -> bool:
        return all(Path(f"/proc/{pid}").exists() for pid in self.processes())

    def echo(self) -> None:
        ae = AE(ae_title="FUZZCHECK")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", self.port, ae_title="TRIAGE")
        assert assoc.is_established, "the daemon no longer associates"
        answer = assoc.send_c_echo()
        assert answer is not None
        assert answer.Status == 0x0000
        assoc.release()

    def check_stored(self) -> None:
        """Every stored instance was answered Success and holds a data set answered so; and
        every data set answered Success is stored (an identical re-send once)."""
        database = self.data_dir / "triage.sqlite"
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as db:
            rows = db.execute("SELECT sop_instance_uid, file_id FROM instances").fetchall()
        for sop_instance_uid, file_id in rows:
            if file_id in self.held or sop_instance_uid.startswith("1.2.840.10008"):
                continue
            sent = self.ledger.stored.get(sop_instance_uid)
            assert sent, f"{sop_instance_uid} stored without a Success"
            path = self.data_dir / "spool" / "objects" / file_id[:2] / f"{file_id}.dcm"
            data_set = hashlib.sha256(dataset_bytes_of(path)).digest()
            assert data_set in sent, f"{sop_instance_uid} stored other bytes"
            self.held[file_id] = (sop_instance_uid, data_set)
        stored = set(self.held.values())
        for sop_instance_uid, data_sets in self.ledger.stored.items():
            for data_set in data_sets:
                assert (sop_instance_uid, data_set) in stored, f"{sop_instance_uid}: Success, lost"

    def descriptors(self) -> set[str]:
        found = set()
        for pid in self.processes():
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    found.add(f"{pid}:{fd.name}:{os.readlink(fd)}")
        return found

    def resources(self) -> dict[str, int]:
        """Threads, resident memory and descriptors by kind, over the daemon's processes.

        The spool keeps the directories files are renamed into open (at most 256) and eight
        empty files ready per receiver process, and database connections open as the pools
        need them (two engines of at most 15 per process): those are bounded by design and
        counted apart from the rest."""
        counts = dict.fromkeys(["threads", "rss", "sockets", "spares", "database", "other"], 0)
        for pid in self.processes():
            status = Path(f"/proc/{pid}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            counts["threads"] += int(fields["Threads"])
            counts["rss"] += int(fields["VmRSS"].split()[0]) * 1024
        for descriptor in self.descriptors():
            target = descriptor.split(":", 2)[2]
            if target.startswith("socket:"):
                counts["sockets"] += 1
            elif target.endswith(".part"):
                counts["spares"] += 1
            elif target.endswith("triage.sqlite"):
                counts["database"] += 1  # one per SQLite connection
            elif target.endswith(("triage.sqlite-wal", "triage.sqlite-shm")):
                continue
            elif "/spool/objects/" not in target:
                counts["other"] += 1
        counts["temporary"] = sum(
            1 for path in (self.data_dir / "spool" / "tmp").rglob("*.part") if path.stat().st_size
        )
        return counts


@contextmanager
def daemon(tmp_path: Path, data_dir: Path, processes: int) -> Iterator[Daemon]:
    env = serve_env(
        data_dir,
        dicom_processes=str(processes),
        study_quiet_seconds="3600",
        network_timeout_seconds="1",
        dimse_timeout_seconds="1",
        acse_timeout_seconds="2",
        log_level="WARNING",
    )
    with serving(env, tmp_path / "serve.log") as process:
        yield Daemon(process.pid, int(env["TRIAGE_DICOM_PORT"]), data_dir)
        assert process.poll() is None, "triage serve died"


def fuzz(target: Daemon, examples: int) -> None:
    count = 0

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(session=sessions)
    def one(session: Session) -> None:
        nonlocal count
        count += 1
        run_session(target.port, session, target.ledger)
        assert target.alive(), "a receiver process died"
        target.check_stored()
        if count % ECHO_EVERY == 0:
            target.echo()

    one()


@pytest.mark.slow
@pytest.mark.timeout(FUZZ_SECONDS + 600)
@pytest.mark.parametrize("processes", [1, 2])
def test_fuzzed_associations_break_nothing(tmp_path: Path, data_dir: Path, processes: int) -> None:
    with daemon(tmp_path, data_dir, processes) as target:
        # A first round opens what the daemon opens lazily, in every receiver process (index
        # and audit database connections, with their WAL files): the baseline is taken after.
        fuzz(target, WARM_UP_EXAMPLES)
        baseline = target.resources()
        opened = target.descriptors()
        end = time.monotonic() + FUZZ_SECONDS / 2  # half the time for each configuration
        while True:
            fuzz(target, SHORT_EXAMPLES if not FUZZ_SECONDS else 200)
            if time.monotonic() >= end:
                break
        target.echo()
        target.check_stored()

        def settled() -> bool:
            now = target.resources()
            return (
                now["threads"] <= baseline["threads"]
                and now["sockets"] <= baseline["sockets"]
                and now["spares"] <= 8 * len(target.processes())
                and now["database"] <= 30 * len(target.processes())
                and now["other"] <= baseline["other"]
                and now["temporary"] == 0
            )

        try:
            wait_for(settled, timeout=15, what="the daemon's resources to settle")
        except TimeoutError:
            raise AssertionError(
                f"{target.resources()} against {baseline}; descriptors opened since: "
                f"{sorted(target.descriptors() - opened)}"
            ) from None
        grown = target.resources()["rss"] - baseline["rss"]
        assert grown < 64 << 20, f"resident memory grew by {grown >> 20} MiB"
    ledger = target.ledger
    report = {
        "processes": processes,
        "associations": ledger.associations,
        "accepted": ledger.accepted,
        "messages": ledger.messages,
        "successes": ledger.successes,
        "aborted_or_closed": ledger.aborts,
        "stored_checked": len(target.held),
    }
    print(json.dumps(report))
    if out := os.environ.get("TRIAGE_TEST_FUZZ_REPORT"):
        with open(out, "a") as file:
            file.write(json.dumps(report) + "\n")
