"""``triage serve`` with ``dicom_processes = 2``: real receiver processes behind one port."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import func, select

from tests.conftest import free_port
from tests.helpers.dul import RawAssociation
from tests.helpers.instances import ct_study
from tests.helpers.process import VENV_BIN, child_pids, port_open, running, wait_for
from triage.db.models import Instance, Study
from triage.db.session import create_db_engine, make_session_factory, session_scope
from triage.domain import StudyStatus

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@contextmanager
def serve(tmp_path: Path, data_dir: Path, **settings: str) -> Iterator[tuple[int, int, int]]:
    """``triage serve`` with two receiver processes: (pid, DICOM port, HTTP port)."""
    dicom_port, http_port = free_port(), free_port()
    env = {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_DICOM_PORT": str(dicom_port),
        "TRIAGE_HTTP_PORT": str(http_port),
        "TRIAGE_DICOM_PROCESSES": "2",
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        "TRIAGE_STUDY_QUIET_SECONDS": "600",
        "TRIAGE_WORKERS": "0",
        **{f"TRIAGE_{name.upper()}": value for name, value in settings.items()},
    }
    with running(
        [str(VENV_BIN / "triage"), "serve"],
        env=env,
        log_file=tmp_path / "serve.log",
        ready=lambda: port_open(dicom_port) and port_open(http_port),
    ) as process:
        yield process.pid, dicom_port, http_port


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def connections_on(pid: int, port: int) -> int:
    """Established TCP connections to local ``port`` that process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def associate(port: int) -> Association:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    return ae.associate("127.0.0.1", port, ae_title="TRIAGE")


def metrics_token(data_dir: Path) -> str:
    return subprocess.run(
        [str(VENV_BIN / "triage-admin"), "tokens", "create", "prometheus", "--role", "admin"],
        env={**os.environ, "TRIAGE_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()


def metrics(http_port: int, token: str) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/metrics", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as reply:
        return str(reply.read().decode())


def sample(exposition: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in exposition.splitlines() if line.startswith(name)]
    assert values, f"{name} not in the metrics"
    return sum(values)


def test_associations_spread_over_processes_and_release_completes_the_study(
    tmp_path: Path, data_dir: Path
) -> None:
    studies = [ct_study(tmp_path / f"s{i}", 5) for i in range(2)]
    with serve(tmp_path, data_dir, association_grace_seconds="1") as (pid, port, http_port):
        receivers = child_pids(pid)
        assert len(receivers) == 2
        held = [associate(port) for _ in studies]
        assert all(assoc.is_established for assoc in held)
        # One association in each receiver process, none in triage serve itself.
        wait_for(
            lambda: [connections_on(child, port) for child in receivers] == [1, 1],
            timeout=10,
            what="one association per receiver process",
        )
        assert connections_on(pid, port) == 0
        for assoc, study in zip(held, studies, strict=True):
            for path in study.paths:
                assert assoc.send_c_store(path).Status == 0x0000
        for assoc in held:
            assoc.release()

        session_factory = make_session_factory(
            create_db_engine(f"sqlite:///{data_dir / 'triage.sqlite'}")
        )

        def completed() -> bool:
            with session_scope(session_factory) as session:
                states = session.scalars(select(Study.status)).all()
            return len(states) == 2 and StudyStatus.RECEIVING not in states

        # The quiet period is 10 minutes: only the released associations complete them.
        wait_for(completed, timeout=20, what="both studies complete after release")
        with session_scope(session_factory) as session:
            assert session.scalar(select(func.count(Instance.id))) == 10

        # triage serve's /metrics adds up what the receiver processes counted.
        token = metrics_token(data_dir)

        def counted() -> bool:
            exposition = metrics(http_port, token)
            return (
                sample(exposition, 'triage_instances_received_total{source="dimse"}') == 10
                and sample(exposition, "triage_associations_active") == 0
                and sample(exposition, "triage_spool_seconds_count") == 10
            )

        wait_for(counted, timeout=10, what="the receiver processes' metrics")

        # A receiver process that dies still counts for what it stored; its replacement
        # starts from nothing and the associations gauge forgets the dead one.
        os.kill(receivers[0], signal.SIGKILL)
        wait_for(
            lambda: len(child_pids(pid)) == 2 and receivers[0] not in child_pids(pid),
            timeout=30,
            what="the killed receiver process replaced",
        )
        exposition = metrics(http_port, token)
        assert sample(exposition, 'triage_instances_received_total{source="dimse"}') == 10
        assert sample(exposition, "triage_spool_seconds_count") == 10
        assert sample(exposition, "triage_associations_active") == 0


def test_association_limit_counts_every_process(tmp_path: Path, data_dir: Path) -> None:
    """max_associations spans the receiver processes and counts associations only: idle
    connections hold no slot, and a receiver process that dies gives its slots back."""
    with serve(tmp_path, data_dir, max_associations="1") as (pid, port, _http):
        idle = [RawAssociation(port) for _ in range(3)]  # never associate
        first = associate(port)
        assert first.is_established
        second = RawAssociation(port)  # goes to the other receiver process
        reply = second.associate([CT_IMAGE_STORAGE])
        assert RawAssociation.rejection(reply) == (0x02, 0x03, 0x02)  # transient, local limit
        second.close()
        for peer in idle:
            peer.close()

        def holder() -> list[int]:
            return [child for child in child_pids(pid) if connections_on(child, port) >= 1]

        wait_for(lambda: len(holder()) == 1, timeout=10, what="one process left holding one")
        # The process holding the association dies: its slot is free once it is gone.
        os.kill(holder()[0], signal.SIGKILL)
        wait_for(lambda: associate_and_release(port), timeout=20, what="a free association")
    log = (tmp_path / "serve.log").read_text()
    assert "too many associations" in log


def associate_and_release(port: int) -> bool:
    assoc = associate(port)
    if not assoc.is_established:
        return False
    assoc.release()
    return True


def test_dead_receiver_process_is_replaced_and_all_die_with_serve(
    tmp_path: Path, data_dir: Path
) -> None:
    study = ct_study(tmp_path / "s", 4)
    with serve(tmp_path, data_dir) as (pid, port, _http):
        first, second = child_pids(pid)
        os.kill(first, signal.SIGKILL)
        wait_for(
            lambda: len(child_pids(pid)) == 2 and first not in child_pids(pid),
            timeout=30,
            what="a new receiver process",
        )
        replacement = next(child for child in child_pids(pid) if child != second)
        wait_for(
            lambda: (
                "receiver process serving" in (tmp_path / "serve.log").read_text()
                and sum(1 for _ in _serving_lines(tmp_path)) == 3
            ),
            timeout=60,
            what="the new receiver process serving",
        )
        # Both processes take associations again: two at once land one in each.
        held = [associate(port), associate(port)]
        wait_for(
            lambda: [connections_on(child, port) for child in (second, replacement)] == [1, 1],
            timeout=10,
            what="one association per receiver process",
        )
        for assoc, path in zip(held, study.paths, strict=False):
            assert assoc.send_c_store(path).Status == 0x0000
            assoc.release()

        os.kill(pid, signal.SIGKILL)  # triage serve alone, not its process group
        wait_for(
            lambda: not alive(second) and not alive(replacement),
            timeout=10,
            what="the receiver processes to die with triage serve",
        )
    log = (tmp_path / "serve.log").read_text()
    assert "receiver process exited; starting another" in log
    assert "exit_status=-9" in log


def _serving_lines(tmp_path: Path) -> Iterator[str]:
    for line in (tmp_path / "serve.log").read_text().splitlines():
        if "receiver process serving" in line:
            yield line


def test_four_associations_keep_every_instance_across_processes(
    tmp_path: Path, data_dir: Path
) -> None:
    """Four concurrent associations of 15 instances each: every one indexed once."""
    series = [ct_study(tmp_path / f"s{i}", 15) for i in range(4)]
    failures: list[str] = []

    def send(paths: list[Path]) -> None:
        assoc = associate(port)
        if not assoc.is_established:
            failures.append("not established")
            return
        for path in paths:
            reply = assoc.send_c_store(path)
            if not reply or reply.Status != 0x0000:
                failures.append(str(path))
        assoc.release()

    with serve(tmp_path, data_dir) as (_pid, port, _http):
        senders = [threading.Thread(target=send, args=(s.paths,)) for s in series]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=120)
    assert failures == []
    session_factory = make_session_factory(
        create_db_engine(f"sqlite:///{data_dir / 'triage.sqlite'}")
    )
    with session_scope(session_factory) as session:
        assert session.scalar(select(func.count(Instance.id))) == 60
        assert session.scalar(select(func.count(func.distinct(Instance.file_id)))) == 60
