"""Receiver processes: the DICOM intake spread over several processes behind ``triage serve``.

One Python process runs one thread's Python at a time (the GIL): over four associations on
two cores, the associations of one process wait on it for about a fifth of the time (see
bench/README). With ``dicom_processes`` above 1, ``triage serve`` accepts each DICOM connection
itself and hands it (its descriptor, over a Unix socket) to the receiver process with the
fewest open associations. Every receiver process runs the same listener and ingest path, on the
same spool and database, and tells ``triage serve`` when an association closes (for the
association limit) or was released (for study completion). Every process counts its metrics
into the files of prometheus_client's multiprocess mode (``triage.metrics``), which ``triage
serve``'s ``/metrics`` adds up. A receiver process that dies is started again. When ``triage
serve`` ends, crash included, the receiver processes read the end of their control socket and
stop, ending their associations (whatever was not answered yet is not kept, as after a
crash).

Run as ``python -m triage.receiver.processes`` by ``ReceiverPool`` only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from triage.config import Settings
from triage.metrics import process_ended
from triage.receiver.upper import ConnectionGate, accept_connections, stop_listening

log = logging.getLogger("triage.receiver.processes")  # also when run as __main__

SUPERVISE_SECONDS = 0.5
"""How often ``triage serve`` looks for receiver processes that exited."""
MESSAGE_BYTES = 1 << 16
"""The largest control message read (a released association's study UIDs)."""
RESTART_SECONDS = (1.0, 30.0)
"""First and longest wait before a receiver process that died is started again."""
READY_SECONDS = 120.0
"""How long ``start()`` waits for the receiver processes to be serving."""
STABLE_SECONDS = 10.0
"""A receiver process that ran this long before it died is restarted after the first wait."""


MAX_PROCESSES = 64
_SLOTS = struct.Struct(f"={MAX_PROCESSES}L")


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


class SharedSlots:
    """The association count of every receiver process, in a file each maps: one counter per
    process, changed only under an exclusive lock on the file, so that taking a slot (check
    the sum, add one) is atomic across processes. The counter of a process that died is set
    back to zero, by ``triage serve`` and by the process started in its place."""

    def __init__(self, path: Path, index: int) -> None:
        self.index = index
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._map = mmap.mmap(self._fd, _SLOTS.size)
        self._lock = threading.Lock()  # flock is per open file: threads queue here first

    @staticmethod
    def create(path: Path) -> None:
        """A new file, every counter zero."""
        path.write_bytes(bytes(_SLOTS.size))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[int]]:
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                counts = list(_SLOTS.unpack_from(self._map))
                before = list(counts)
                yield counts
                if counts != before:
                    _SLOTS.pack_into(self._map, 0, *counts)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def take(self, limit: int) -> bool:
        with self._locked() as counts:
            if sum(counts) >= limit:
                return False
            counts[self.index] += 1
            return True

    def give_back(self) -> None:
        with self._locked() as counts:
            counts[self.index] = max(0, counts[self.index] - 1)

    def clear(self) -> None:
        """Zero this process's counter."""
        with self._locked() as counts:
            counts[self.index] = 0

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes]
    control: socket.socket
    started: float = field(default_factory=time.monotonic)
    open: set[int] = field(default_factory=set)  # connections handed over, not closed yet
    negotiating: dict[int, str] = field(default_factory=dict)  # connection -> caller address
    alive: bool = True
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None


class ReceiverPool:
    """``settings.dicom_processes`` receiver processes behind one listening socket."""

    def __init__(
        self,
        settings: Settings,
        *,
        config_file: Path | None,
        on_association_end: Callable[[set[str]], None],
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.config_file = config_file
        self.on_association_end = on_association_end
        self.on_refused = on_refused
        self._gate = ConnectionGate(  # triage serve gates every connection before hand-over
            per_address=settings.max_negotiating_per_address, total=settings.max_negotiating
        )
        self._slots_file = slots_file(settings)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._children: list[_Child] = []
        self._next_id = 0
        self._socket: socket.socket | None = None
        self._accepting = threading.Thread(target=self._accept_loop, name="dicom-accept")
        self._supervisor = threading.Thread(target=self._supervise, name="dicom-processes")

    @property
    def port(self) -> int:
        if self._socket is None:
            return self.settings.dicom_port
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        """Start the receiver processes and, once they all serve, listen.

        Raises RuntimeError when one of them exits or does not start within READY_SECONDS.
        """
        settings = self.settings
        SharedSlots.create(self._slots_file)
        self._children = [self._spawn(index) for index in range(settings.dicom_processes)]
        deadline = time.monotonic() + READY_SECONDS
        for child in self._children:
            while not child.ready.wait(0.1):
                if child.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"receiver process {child.index} did not start")
        self._socket = socket.create_server((settings.dicom_host, settings.dicom_port), backlog=64)
        self._accepting.start()
        self._supervisor.start()
        log.info(
            "DICOM listener started",
            extra={
                "ae_title": settings.ae_title,
                "port": self.port,
                "tls": settings.tls is not None,
                "processes": settings.dicom_processes,
            },
        )

    # -- receiver processes ------------------------------------------------------------------

    def _spawn(self, index: int) -> _Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [
            sys.executable,
            "-m",
            "triage.receiver.processes",
            "--control-fd",
            str(theirs.fileno()),
            "--index",
            str(index),
        ]
        if self.config_file is not None:
            argv += ["--config", str(self.config_file)]
        try:
            process = subprocess.Popen(argv, pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        child = _Child(index, process, ours)
        child.reader = threading.Thread(
            target=self._read, args=(child,), name=f"dicom-process-{index}", daemon=True
        )
        child.reader.start()
        log.info("receiver process started", extra={"receiver": index, "pid": process.pid})
        return child

    def _read(self, child: _Child) -> None:
        """What a receiver process reports, until it closes its end (it exited)."""
        while True:
            try:
                data = child.control.recv(MESSAGE_BYTES)
            except OSError:
                break
            if not data:
                break
            try:
                message = json.loads(data)
                kind = message["t"]
                if kind == "closed":
                    with self._lock:
                        child.open.discard(message["id"])
                    self._negotiated(child, message["id"])
                elif kind == "negotiated":
                    self._negotiated(child, message["id"])
                elif kind == "ready":
                    child.ready.set()
                elif kind == "released":
                    self.on_association_end(set(message["studies"]))
            except (ValueError, KeyError, TypeError):
                log.exception("unreadable message from a receiver process")
        with self._lock:
            child.alive = False
            child.open.clear()  # its connections ended with it
        for connection in list(child.negotiating):
            self._negotiated(child, connection)
        slots = SharedSlots(self._slots_file, child.index)
        try:
            slots.clear()  # its associations ended with it
        finally:
            slots.close()

    def _negotiated(self, child: _Child, connection: int) -> None:
        with self._lock:
            address = child.negotiating.pop(connection, None)
        if address is not None:
            self._gate.done(address)

    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.wait(SUPERVISE_SECONDS):
            for position, child in enumerate(list(self._children)):
                status = child.process.poll()
                if status is None or self._stopping.is_set():
                    continue
                lived = time.monotonic() - child.started
                failures = 0 if lived >= STABLE_SECONDS else failures + 1
                delay = min(RESTART_SECONDS[0] * 2 ** max(failures - 1, 0), RESTART_SECONDS[1])
                log.error(
                    "receiver process exited; starting another",
                    extra={
                        "receiver": child.index,
                        "exit_status": status,
                        "seconds": round(lived, 1),
                        "restart_in": delay,
                    },
                )
                process_ended(child.process.pid)
                child.control.close()
                if child.reader is not None:
                    child.reader.join(5)
                if self._stopping.wait(delay):
                    return
                replacement = self._spawn(child.index)
                with self._lock:
                    self._children[position] = replacement

    # -- connections -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._socket is not None
        accept_connections(self._socket, self._stopping, self._take)

    def _take(self, sock: socket.socket, address: tuple[str, int]) -> None:
        with sock:  # the receiver process has its own descriptor once handed over
            self._hand_over(sock, address)

    def _hand_over(self, sock: socket.socket, address: tuple[str, int]) -> None:
        if self._gate.admit(address[0]) is not None:
            if self.on_refused is not None:
                self.on_refused()
            return
        with self._lock:
            running = [child for child in self._children if child.alive]
            if not running:
                child = None
            else:
                child = min(running, key=lambda c: len(c.open))
                self._next_id += 1
                connection = self._next_id
                child.open.add(connection)
                child.negotiating[connection] = address[0]
        if child is None:
            self._gate.done(address[0])
            log.error(
                "no receiver process running: connection closed", extra={"address": address[0]}
            )
            return
        message = _encode({"t": "conn", "id": connection, "address": list(address)})
        try:
            socket.send_fds(child.control, [message], [sock.fileno()])
        except OSError as exc:
            with self._lock:
                child.open.discard(connection)
            self._negotiated(child, connection)
            log.error(
                "could not hand a connection to a receiver process: %s",
                type(exc).__name__,
                extra={"receiver": child.index, "address": address[0]},
            )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, then stop every receiver process (each ends its associations)."""
        self._stopping.set()
        stop_listening(self._socket)
        if self._accepting.is_alive():
            self._accepting.join(timeout)
        if self._supervisor.is_alive():
            self._supervisor.join(timeout)
        children = list(self._children)
        for child in children:
            with contextlib.suppress(OSError):
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "receiver process did not stop: killed", extra={"receiver": child.index}
                )
                child.process.kill()
                child.process.wait()
            process_ended(child.process.pid)
            child.control.close()
            if child.reader is not None:
                child.reader.join(timeout)


def slots_file(settings: Settings) -> Path:
    return settings.data_dir / "associations.slots"


def child_main(argv: Sequence[str] | None = None) -> int:
    """A receiver process: serve the connections ``triage serve`` hands over."""
    parser = argparse.ArgumentParser(prog="python -m triage.receiver.processes")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--config", type=Path)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches triage serve, which stops us

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)

    # Imported here: the parent imports this module for ReceiverPool without all of this.
    from prometheus_client import CollectorRegistry

    from triage.db.session import create_db_engine, make_session_factory
    from triage.errors import ConfigError
    from triage.ingest.pipeline import Ingestor
    from triage.logs import configure_logging
    from triage.metrics import IngestMetrics
    from triage.receiver.scp import DicomListener
    from triage.storage.spool import Spool

    try:
        settings = Settings.load(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    control = socket.socket(fileno=args.control_fd)

    def send(message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # triage serve is gone: the kernel ends us soon
            control.send(_encode(message))

    # Counted into the files triage serve reads (the environment it started us with).
    metrics = IngestMetrics(CollectorRegistry())
    spool = Spool.for_settings(settings, tmp_subdir=f"receiver-{args.index}")
    spool.clear_tmp()  # what a receiver process before this one left when it died
    ingestor = Ingestor(
        spool=spool,
        engine=create_db_engine(settings.database_url, rebuildable=True),
        metrics=metrics,
        writers_lock=settings.data_dir / "ingest.lock",
    )
    session_engine = create_db_engine(settings.database_url)
    listener = DicomListener(
        settings,
        ingestor=ingestor,
        session_factory=make_session_factory(session_engine),
        metrics=metrics,
        on_association_end=lambda studies: send({"t": "released", "studies": sorted(studies)}),
    )
    slots = SharedSlots(slots_file(settings), args.index)
    slots.clear()  # what a receiver process before this one held when it died
    listener.start(listen=False, slots=slots)
    send({"t": "ready"})
    log.info("receiver process serving", extra={"receiver": args.index})
    try:
        while True:
            data, fds, _flags, _address = socket.recv_fds(control, MESSAGE_BYTES, 1)
            if not data:
                break  # triage serve stopped or died
            message = json.loads(data)
            if message.get("t") != "conn" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            connection = int(message["id"])
            host, port = message["address"]
            listener.adopt(
                socket.socket(fileno=fds[0]),
                (str(host), int(port)),
                on_negotiated=lambda c=connection: send({"t": "negotiated", "id": c}),  # type: ignore[misc]
                on_closed=lambda c=connection: send({"t": "closed", "id": c}),  # type: ignore[misc]
            )
    finally:
        listener.stop()
        slots.close()
        ingestor.close()
        ingestor.engine.dispose()
        session_engine.dispose()
        log.info("receiver process stopped", extra={"receiver": args.index})
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
