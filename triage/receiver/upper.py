"""The DICOM upper layer (PS3.8) as association acceptor, for C-ECHO and C-STORE.

``triage.receiver.acse`` decodes the association request and negotiates it; this module runs
the connections. Each association is one thread doing blocking reads, with no polling and no
hand-offs between threads. P-DATA-TF PDUs are read item by item, and a C-STORE data set's
fragments are received straight into its sink's buffer, so writing it overlaps receiving it.

What is done with an association and its messages is the ``AcceptorPolicy``'s business
(``triage.receiver.scp``); this module knows the protocol only.

The acceptor's states of PS3.8 Table 9-10, and where they are kept:

- Sta2, connection open, awaiting the A-ASSOCIATE-RQ (``Association._negotiate``): the
  request gets an A-ASSOCIATE-AC or -RJ (AE-6); any other PDU, or one that cannot be read, an
  A-ABORT from the service-user (AA-1); an A-ABORT or the end of the connection closes it
  (AA-2, AA-5); so does the ARTIM timer's expiry, ``acse_timeout`` after the connection.
- Sta6, established (``Association._serve``), in three phases of the DIMSE message in
  progress: idle, in the middle of a command, in the middle of a data set. P-DATA-TF is taken
  (DT-2); A-RELEASE-RQ when idle gets an A-RELEASE-RP (AR-2, AR-4), in the middle of a message
  an A-ABORT; an A-ASSOCIATE-RQ/AC/RJ or an A-RELEASE-RP an A-ABORT from the service-provider,
  reason unexpected PDU (AA-8); an unknown PDU type the same, reason unrecognised PDU; an A-ABORT
  or the end of the connection ends the association (AA-3, AA-4). Silence past the network
  timeout (idle) or the DIMSE timeout (in a message), or a PDU or message slower than its
  deadline, gets an A-ABORT from the service-provider, reason not specified.
- Sta13, after sending an A-RELEASE-RP, an A-ASSOCIATE-RJ or an A-ABORT: the connection is
  closed at once (the peer has nothing more to say that we would read).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from triage.dicom import status
from triage.dicom.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    Command,
    encode_response,
    parse_command,
)
from triage.errors import DicomInputError
from triage.receiver.acse import (
    LOCAL_LIMIT_EXCEEDED,
    AcceptorIdentity,
    MalformedRequest,
    Negotiation,
    Rejection,
    UserIdentity,
    ae_titles,
    negotiate,
    rejection,
)

log = logging.getLogger(__name__)

# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ_TYPE = 0x01
A_ASSOCIATE_AC_TYPE = 0x02
A_ASSOCIATE_RJ_TYPE = 0x03
P_DATA_TF_TYPE = 0x04
A_RELEASE_RQ_TYPE = 0x05
A_RELEASE_RP_TYPE = 0x06
A_ABORT_TYPE = 0x07

# A-P-ABORT reasons (PS3.8 9.3.8)
REASON_NOT_SPECIFIED = 0x00
UNRECOGNISED_PDU = 0x01
UNEXPECTED_PDU = 0x02
INVALID_PDU_PARAMETER = 0x06

MAX_ASSOCIATE_RQ_BYTES = 1 << 20
"""An A-ASSOCIATE-RQ larger than this is not a real one."""
PDU_SLACK_BYTES = 1024
"""P-DATA-TF PDUs may exceed the maximum length we announced by this much before we abort."""
NEGOTIATIONS_KEPT = 32
"""Distinct association requests whose negotiation the listener remembers."""
NEGOTIATION_KEPT_BYTES = 64 << 10
"""...each at most this long (storescu's ~128 contexts make about 15 KiB)."""
SKIP_TIMEOUT_SECONDS = 1.0
"""How long to read on for the rest of a P-DATA-TF we abort in the middle of."""
MAX_COMMAND_BYTES = 64 << 10
"""A command set longer than this is not a real one (a C-STORE-RQ's is about 200 bytes)."""
SCRATCH_BYTES = 64 << 10
"""Room for the PDUs and fragments nobody keeps (an A-ASSOCIATE-RQ may borrow more)."""

_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
_TIMEVAL = struct.Struct("@ll")  # struct timeval on Linux


@dataclass
class Requestor:
    """The association-requestor (PS3.8) and its association, as the policy sees them."""

    address: str
    port: int
    calling_ae: str = ""
    called_ae: str = ""
    identity: UserIdentity | None = None
    started: float = field(default_factory=time.monotonic)
    instances: int = 0


@dataclass(frozen=True)
class StoreResult:
    status: int
    error_comment: str | None = None


class DataSink(Protocol):
    """Where one C-STORE data set goes while it arrives.

    Each fragment is read from the socket straight into the memory ``buffer`` gives: the
    data set is not copied between buffers on its way to the sink.
    """

    def buffer(self, size: int) -> memoryview:
        """Room for the next ``size`` bytes of the data set."""
        ...

    def received(self) -> None:
        """The room ``buffer`` last gave is filled."""
        ...

    def finish(self) -> StoreResult:
        """The whole data set has arrived: keep it (or not) and say which status to answer."""
        ...

    def abandon(self) -> None:
        """The association ended before the data set was whole: nothing is kept."""
        ...


class AcceptorPolicy(Protocol):
    """What the listener decides; the protocol is this module's."""

    def check_titles(self, requestor: Requestor) -> Rejection | None:
        """Whether its calling and called AE titles may associate (asked first)."""
        ...

    def check_identity(self, requestor: Requestor) -> Rejection | None:
        """Whether its user identity is accepted (asked once its request is decoded; the
        association limit is the server's)."""
        ...

    def rejected(self, requestor: Requestor, refusal: Rejection) -> None: ...

    def open_store(
        self, requestor: Requestor, command: Command, transfer_syntax: str
    ) -> DataSink: ...

    def ended(self, requestor: Requestor, *, released: bool) -> None: ...

    def aborted(self, requestor: Requestor, why: str) -> None:
        """We aborted the association because the peer broke the protocol or went silent."""
        ...

    def connection_refused(self, address: str, why: str) -> None:
        """A connection was closed unread: too many from its address or in all are negotiating."""
        ...


class AssociationSlots(Protocol):
    """The count of established associations against ``max_associations`` (shared by every
    receiver process where there are several)."""

    def take(self, limit: int) -> bool:
        """One more association, if fewer than ``limit`` are established."""
        ...

    def give_back(self) -> None: ...


class LocalSlots:
    """``AssociationSlots`` of one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = 0

    def take(self, limit: int) -> bool:
        with self._lock:
            if self._taken >= limit:
                return False
            self._taken += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._taken = max(0, self._taken - 1)


class ConnectionGate:
    """Connections that have not associated yet: at most ``per_address`` from one address and
    ``total`` in all, so that idle or slow connections cannot crowd out real senders."""

    LOG_EVERY_SECONDS = 10.0

    def __init__(self, *, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total = total
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._count = 0
        self._refused = 0  # since the last log line
        self._logged_at = 0.0

    def admit(self, address: str) -> str | None:
        """None when the connection may negotiate (``done`` must follow); else why not."""
        with self._lock:
            if self._count >= self.total:
                why = f"{self.total} connections negotiating"
            elif self._open.get(address, 0) >= self.per_address:
                why = f"{self.per_address} connections from this address negotiating"
            else:
                self._open[address] = self._open.get(address, 0) + 1
                self._count += 1
                return None
            self._refused += 1
            now = time.monotonic()
            if now - self._logged_at >= self.LOG_EVERY_SECONDS:  # a flood makes one line
                log.warning(
                    "connection closed unread: %s",
                    why,
                    extra={"address": address, "refused": self._refused},
                )
                self._refused, self._logged_at = 0, now
            return why

    def done(self, address: str) -> None:
        """The connection associated, was rejected, or ended."""
        with self._lock:
            left = self._open.get(address, 0) - 1
            if left > 0:
                self._open[address] = left
            else:
                self._open.pop(address, None)
            self._count = max(0, self._count - 1)


class _Abort(Exception):
    """The peer broke the protocol: send an A-P-ABORT with ``reason`` and close."""

    def __init__(self, message: str, reason: int = INVALID_PDU_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


class _Closed(Exception):
    """The connection ended (closed by the peer, reset, timed out, or told to stop)."""


class _Expired(Exception):
    """No whole A-ASSOCIATE-RQ within the ARTIM timeout: close the connection (PS3.8 AA-2)."""


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return _PDU_HEADER.pack(pdu_type, len(body)) + body


def _p_data(context_id: int, control: int, data: bytes) -> bytes:
    item = _PDV_HEADER.pack(len(data) + 2, context_id, control) + data
    return _pdu(P_DATA_TF_TYPE, item)


# The phases of an established association (Sta6) between DIMSE messages and inside one.
IDLE = "idle"
MID_COMMAND = "in the middle of a command"
MID_DATA_SET = "in the middle of a data set"


@dataclass(frozen=True)
class AcceptorSettings:
    max_pdu_bytes: int
    network_timeout: float
    dimse_timeout: float
    implementation_class_uid: str
    implementation_version_name: str
    max_associations: int = 16
    acse_timeout: float = 15.0
    """From accepting the connection to a whole A-ASSOCIATE-RQ (PS3.8's ARTIM timer)."""
    min_bytes_per_second: int = 0
    """Once started, a PDU must arrive whole within the network timeout plus its length at
    this rate, and a message within the DIMSE timeout plus its length so far (0: no limit)."""
    identities_checked: bool = False
    """User identities are checked (a positive response is sent when one is requested)."""


class Association:
    """One accepted connection, run to its end in its own thread."""

    def __init__(
        self,
        sock: socket.socket,
        requestor: Requestor,
        *,
        server: AcceptorServer,
        on_negotiated: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.requestor = requestor
        self.server = server
        self._on_negotiated = on_negotiated  # called once, when negotiation is over
        self.settings = server.settings
        self.policy = server.policy
        announced = self.settings.max_pdu_bytes
        # Announcing no maximum (0) means none: any P-DATA-TF is read in pieces.
        self._pdata_limit = announced + PDU_SLACK_BYTES if announced else 0xFFFFFFFF
        self._scratch = bytearray(SCRATCH_BYTES)  # PDU bodies and fragments no sink takes
        self._header = bytearray(_PDU_HEADER.size)
        self._pdv_header = bytearray(_PDV_HEADER.size)
        self._head = bytearray(_PDU_HEADER.size + _PDV_HEADER.size)
        self._ahead = bytearray()  # bytes received before they were asked for
        self._unread = 0  # bytes of the current P-DATA-TF not read yet
        self._timeout: float | None = None
        # A socket with a Python timeout polls before every recv and send, each a release of
        # the GIL of its own; the kernel's SO_RCVTIMEO / SO_SNDTIMEO time out a blocking one.
        self._kernel_timeouts = sys.platform == "linux" and server.tls is None
        if self._kernel_timeouts:
            sock.settimeout(None)
        self._contexts: Mapping[int, str] = {}  # accepted context id -> transfer syntax
        self._abstract: Mapping[int, str] = {}  # accepted context id -> abstract syntax
        self._peer_max_pdu = 0
        self._established = False
        self._slot = False  # one of the server's association slots is ours
        self._sink: DataSink | None = None  # the C-STORE data set being received
        # Every receive is checked against a deadline: the ARTIM timer until the request is
        # whole (each wait no longer than what is left of it), then one per PDU and message.
        self._deadline = requestor.started + self.settings.acse_timeout
        self._negotiating = True
        self._late = "no whole A-ASSOCIATE-RQ in time"

    # -- transport ---------------------------------------------------------------------------

    def _recv_into(self, view: memoryview) -> int:
        if self._negotiating:
            self._set_timeout(max(0.001, self._deadline - time.monotonic()))
        try:
            count = self.sock.recv_into(view)
        except (TimeoutError, BlockingIOError) as exc:  # BlockingIOError: SO_RCVTIMEO
            self._check_deadline()
            raise _Abort("nothing received within the timeout", REASON_NOT_SPECIFIED) from exc
        except OSError as exc:
            raise _Closed(type(exc).__name__) from exc
        if count == 0:
            raise _Closed("connection closed by the peer")
        self._check_deadline()
        return count

    def _check_deadline(self) -> None:
        if time.monotonic() > self._deadline:
            if self._negotiating:
                raise _Expired(f"{self._late} ({self.settings.acse_timeout:g} s)")
            raise _Abort(self._late, REASON_NOT_SPECIFIED)

    def _read_into(self, view: memoryview) -> None:
        if self._ahead:  # bytes an earlier read took early
            count = min(len(view), len(self._ahead))
            view[:count] = self._ahead[:count]
            del self._ahead[:count]
            view = view[count:]
        while view:
            view = view[self._recv_into(view) :]

    def _read_header_into(self, view: memoryview) -> None:
        """Like ``_read_into``, also taking the few bytes after it that have arrived (a
        P-DATA-TF's PDV item header), which saves a system call per PDU."""
        if self._ahead or len(view) >= len(self._head):
            self._read_into(view)
            return
        count = self._recv_into(memoryview(self._head))
        if count > len(view):
            self._ahead += self._head[len(view) : count]
            count = len(view)
        view[:count] = self._head[:count]
        self._read_into(view[count:])

    def _set_timeout(self, timeout: float) -> None:
        if timeout == self._timeout:  # a system call, and this runs per PDU
            return
        self._timeout = timeout
        if self._kernel_timeouts:
            whole = int(timeout)
            timeval = _TIMEVAL.pack(whole, int((timeout - whole) * 1_000_000))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        else:
            self.sock.settimeout(timeout)

    def _read_pdu_header(self, timeout: float) -> tuple[int, int]:
        """The next PDU's type and length, checked against the limit for its type."""
        self._set_timeout(timeout)
        self._read_header_into(memoryview(self._header))
        pdu_type, length = _PDU_HEADER.unpack(self._header)
        if pdu_type == P_DATA_TF_TYPE:
            limit = self._pdata_limit
        elif pdu_type == A_ASSOCIATE_RQ_TYPE:
            limit = MAX_ASSOCIATE_RQ_BYTES
        else:
            limit = 64 * 1024
        if length > limit:
            raise _Abort(f"PDU of type {pdu_type:#04x} claims {length} bytes")
        return pdu_type, length

    def _read_scratch(self, length: int) -> memoryview:
        """The next ``length`` bytes, valid until the next read."""
        if length > len(self._scratch):
            self._scratch = bytearray(length)
        view = memoryview(self._scratch)[:length]
        self._read_into(view)
        return view

    def _read_pdu(self, timeout: float) -> tuple[int, memoryview]:
        """The next PDU's type and body; the body is valid until the next read."""
        pdu_type, length = self._read_pdu_header(timeout)
        return pdu_type, self._read_scratch(length)

    def _discard(self, length: int) -> None:
        """Read ``length`` bytes nobody wants, a scratch buffer's worth at a time."""
        while length:
            length -= len(self._read_scratch(min(length, SCRATCH_BYTES)))

    def _skip_unread(self) -> None:
        """Read the rest of the current P-DATA-TF before aborting, so that closing the
        connection does not reset it (which can cost the peer our A-ABORT)."""
        self._deadline = time.monotonic() + SKIP_TIMEOUT_SECONDS  # in all: it may trickle
        with contextlib.suppress(_Abort, _Closed, _Expired, OSError):
            self._set_timeout(SKIP_TIMEOUT_SECONDS)
            self._discard(self._unread)
            self._unread = 0

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise _Closed(type(exc).__name__) from exc

    def _send_abort(self, source: int, reason: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(_pdu(A_ABORT_TYPE, bytes([0, 0, source, reason])))

    # -- the association ---------------------------------------------------------------------

    def run(self) -> None:
        released = False
        try:
            if self.server.tls is not None:
                self._handshake()
            if not self._negotiate():
                return
            released = self._serve()
        except _Abort as exc:
            self._skip_unread()
            log.warning(
                "association aborted: %s",
                exc,
                extra={"calling_ae": self.requestor.calling_ae, "address": self.requestor.address},
            )
            if self._established:  # AA-8: service-provider source, with the reason
                self._send_abort(0x02, exc.reason)
            else:  # AA-1 (before an association): service-user source, reason not significant
                self._send_abort(0x00, REASON_NOT_SPECIFIED)
            self.policy.aborted(self.requestor, str(exc))
        except _Expired as exc:
            log.warning("connection closed: %s", exc, extra={"address": self.requestor.address})
            self.policy.aborted(self.requestor, str(exc))
        except _Closed as exc:
            if self._established and self.server.stopping:
                # Its reading side was shut by stop(): the peer learns why (PS3.8 A-ABORT,
                # from the service-user) before the connection closes.
                self._send_abort(0x00, REASON_NOT_SPECIFIED)
                log.info(
                    "association aborted: triage is stopping",
                    extra={
                        "calling_ae": self.requestor.calling_ae,
                        "address": self.requestor.address,
                    },
                )
            elif self._established:
                log.info(
                    "association ended without release: %s",
                    exc,
                    extra={
                        "calling_ae": self.requestor.calling_ae,
                        "address": self.requestor.address,
                    },
                )
        except Exception:
            log.exception(
                "association failed",
                extra={"calling_ae": self.requestor.calling_ae, "address": self.requestor.address},
            )
            self._send_abort(0x02, REASON_NOT_SPECIFIED)
        finally:
            if self._sink is not None:
                self._sink.abandon()
                self._sink = None
            with contextlib.suppress(OSError):
                self.sock.close()
            self._negotiation_over()
            if self._slot:
                self.server.give_slot()
            if self._established:
                self.policy.ended(self.requestor, released=released)

    def _negotiation_over(self) -> None:
        if self._negotiating:
            self._negotiating = False
            self._deadline = float("inf")
            self.server.negotiation_over(self.requestor)
            if self._on_negotiated is not None:
                self._on_negotiated()

    def _handshake(self) -> None:
        assert self.server.tls is not None
        self.sock.settimeout(max(0.001, self._deadline - time.monotonic()))
        try:
            self.sock = self.server.tls.wrap_socket(self.sock, server_side=True)
        except TimeoutError as exc:
            raise _Expired("TLS handshake not done in time") from exc
        except (ssl.SSLError, OSError) as exc:
            log.warning(
                "TLS handshake failed: %s",
                getattr(exc, "reason", None) or type(exc).__name__,
                extra={"address": self.requestor.address},
            )
            raise _Closed("TLS handshake failed") from exc

    def _negotiate(self) -> bool:
        """Read the A-ASSOCIATE-RQ and answer it. True when the association is established."""
        pdu_type, length = self._read_pdu_header(self.settings.network_timeout)
        if pdu_type == A_ABORT_TYPE:  # Sta2 + Evt16: AA-2, close
            raise _Closed("aborted by the peer before associating")
        if pdu_type != A_ASSOCIATE_RQ_TYPE:  # Sta2 + Evt3, 4, 10, 12, 13, 19: AA-1
            self._unread = length  # not read into memory: only skipped, within a deadline
            raise _Abort(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type:#04x}", UNEXPECTED_PDU)
        body = self._read_scratch(length)
        request = _PDU_HEADER.pack(pdu_type, len(body)) + body
        try:
            # The AE titles are checked first, from the request's fixed fields: a caller
            # refused costs nothing more, whatever it proposes.
            self.requestor.calling_ae, self.requestor.called_ae = ae_titles(request)
            refusal = self.policy.check_titles(self.requestor)
            if refusal is None:
                negotiation = self.server.negotiation(request)
                self.requestor.identity = negotiation.identity
                refusal = negotiation.refusal or self.policy.check_identity(self.requestor)
        except MalformedRequest as exc:
            raise _Abort(f"undecodable A-ASSOCIATE-RQ: {exc}") from exc
        if refusal is None:
            self._slot = self.server.take_slot()
            if not self._slot:
                refusal = rejection(LOCAL_LIMIT_EXCEEDED, "too many associations")
        self._negotiation_over()
        if refusal is not None:
            self._send(
                _pdu(
                    A_ASSOCIATE_RJ_TYPE, bytes([0, refusal.result, refusal.source, refusal.reason])
                )
            )
            self.policy.rejected(self.requestor, refusal)
            return False
        if len(self._scratch) > SCRATCH_BYTES:  # a large request's room, given back
            self._scratch = bytearray(SCRATCH_BYTES)
        self._contexts = negotiation.transfer_syntaxes
        self._abstract = negotiation.abstract_syntaxes
        self._peer_max_pdu = negotiation.peer_max_pdu
        self._send(negotiation.accept)
        self._established = True
        log.info(
            "association accepted",
            extra={
                "calling_ae": self.requestor.calling_ae,
                "address": self.requestor.address,
                "contexts": len(self._contexts),
            },
        )
        return True

    def _serve(self) -> bool:
        """The data transfer phase, until release, abort or end of connection.

        Returns whether the peer released the association.
        """
        command_bytes = bytearray()
        command: Command | None = None
        context_id = 0
        settings = self.settings
        rate = settings.min_bytes_per_second
        message_started = 0.0  # when the first PDU of the message in progress began
        message_bytes = 0  # its PDUs' lengths so far
        while True:
            # Sta6 of PS3.8 Table 9-10, in three phases of the DIMSE message in progress.
            phase = MID_DATA_SET if command is not None else MID_COMMAND if command_bytes else IDLE
            in_message = phase != IDLE
            if rate and in_message:
                self._deadline = message_started + settings.dimse_timeout + message_bytes / rate
                self._late = "message not whole within its deadline"
            else:
                self._deadline = float("inf")
            pdu_type, length = self._read_pdu_header(
                settings.dimse_timeout if in_message else settings.network_timeout
            )
            if rate:
                now = time.monotonic()
                self._deadline = now + settings.network_timeout + length / rate
                self._late = "PDU not whole within its deadline"
                if pdu_type == P_DATA_TF_TYPE:
                    if not in_message:
                        message_started, message_bytes = now, 0
                    message_bytes += length
                    whole = message_started + settings.dimse_timeout + message_bytes / rate
                    if whole < self._deadline:
                        self._deadline = whole
                        self._late = "message not whole within its deadline"
            if pdu_type == P_DATA_TF_TYPE:
                self._unread = length
                while self._unread:
                    if self._unread < _PDV_HEADER.size:
                        raise _Abort("P-DATA-TF ends inside a PDV header")
                    self._read_into(memoryview(self._pdv_header))
                    self._unread -= _PDV_HEADER.size
                    item_length, pdv_context, control = _PDV_HEADER.unpack(self._pdv_header)
                    size = item_length - 2
                    if size < 0 or size > self._unread:
                        raise _Abort("PDV item length does not fit its P-DATA-TF")
                    if pdv_context not in self._contexts:
                        raise _Abort(f"PDV for presentation context {pdv_context} not accepted")
                    last = bool(control & 0x02)
                    if control & 0x01:  # command fragment
                        if command is not None:
                            raise _Abort("command fragment while a data set was expected")
                        if len(command_bytes) + size > MAX_COMMAND_BYTES:
                            raise _Abort(f"command set longer than {MAX_COMMAND_BYTES} bytes")
                        command_bytes += self._read_scratch(size)
                        self._unread -= size
                        if not last:
                            continue
                        try:
                            command = parse_command(command_bytes)
                        except DicomInputError as exc:
                            raise _Abort(str(exc)) from exc
                        command_bytes.clear()
                        context_id = pdv_context
                        if command.command_field == C_CANCEL_RQ:
                            # Nothing of ours runs in the background to cancel, and a C-CANCEL
                            # gets no response (PS3.7 9.3.2.3): the association goes on.
                            command = None
                            continue
                        if not command.has_dataset:
                            self._answer(context_id, command, self._no_dataset(command))
                            command = None
                            continue
                        self._sink = self._open(command, context_id)
                    else:  # data set fragment
                        if command is None:
                            raise _Abort("data set fragment without a command")
                        if pdv_context != context_id:
                            raise _Abort("data set on another presentation context")
                        sink = self._sink
                        if sink is None:
                            self._discard(size)
                        else:
                            left = size
                            while left:
                                room = sink.buffer(left)
                                self._read_into(room)
                                sink.received()
                                left -= len(room)
                        self._unread -= size
                        if not last:
                            continue
                        if sink is not None:
                            self._sink = None
                            result = sink.finish()
                            self.requestor.instances += 1
                        else:
                            result = self._unsupported(command, context_id)
                        self._answer(context_id, command, result)
                        command = None
                continue
            self._read_scratch(length)  # the other PDUs' bodies carry nothing we need
            if pdu_type == A_RELEASE_RQ_TYPE:
                if in_message:
                    raise _Abort(f"A-RELEASE-RQ {phase}", UNEXPECTED_PDU)
                self._send(_pdu(A_RELEASE_RP_TYPE, bytes(4)))
                log.info(
                    "association released",
                    extra={
                        "calling_ae": self.requestor.calling_ae,
                        "instances": self.requestor.instances,
                        "seconds": round(time.monotonic() - self.requestor.started, 3),
                    },
                )
                return True
            elif pdu_type == A_ABORT_TYPE:
                log.info(
                    "association aborted by the peer",
                    extra={
                        "calling_ae": self.requestor.calling_ae,
                        "instances": self.requestor.instances,
                    },
                )
                return False
            elif pdu_type in (A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_AC_TYPE, A_ASSOCIATE_RJ_TYPE):
                raise _Abort(f"unexpected PDU type {pdu_type:#04x}", UNEXPECTED_PDU)
            elif pdu_type == A_RELEASE_RP_TYPE:
                raise _Abort("A-RELEASE-RP without a release request", UNEXPECTED_PDU)
            else:
                raise _Abort(f"unrecognised PDU type {pdu_type:#04x}", UNRECOGNISED_PDU)

    def _open(self, command: Command, context_id: int) -> DataSink | None:
        """A sink for a C-STORE on its own SOP class's context; None discards the data set."""
        if command.command_field != C_STORE_RQ:
            return None
        if command.affected_sop_class_uid != self._abstract[context_id]:
            return None
        return self.policy.open_store(self.requestor, command, self._contexts[context_id])

    def _no_dataset(self, command: Command) -> StoreResult:
        if command.command_field == C_ECHO_RQ:
            return StoreResult(status.SUCCESS)
        if command.command_field == C_STORE_RQ:  # PS3.7 9.3.1.1: a C-STORE-RQ has one
            log.warning(
                "C-STORE request without a data set",
                extra={"calling_ae": self.requestor.calling_ae},
            )
            return StoreResult(status.CANNOT_UNDERSTAND, "C-STORE request without a data set")
        return StoreResult(status.UNRECOGNISED_OPERATION, "operation not supported")

    def _unsupported(self, command: Command, context_id: int) -> StoreResult:
        if command.command_field != C_STORE_RQ:
            return StoreResult(status.UNRECOGNISED_OPERATION, "operation not supported")
        log.warning(
            "C-STORE on a context of another SOP class",
            extra={"calling_ae": self.requestor.calling_ae, "context_id": context_id},
        )
        return StoreResult(status.SOP_CLASS_NOT_SUPPORTED, "SOP class differs from the context")

    def _answer(self, context_id: int, request: Command, result: StoreResult) -> None:
        response = encode_response(request, result.status, error_comment=result.error_comment)
        room = self._peer_max_pdu - 6 if self._peer_max_pdu else len(response)
        if room <= 0 or room >= len(response):
            self._send(_p_data(context_id, 0x03, response))
            return
        for start in range(0, len(response), room):
            last = start + room >= len(response)
            self._send(_p_data(context_id, 0x03 if last else 0x01, response[start : start + room]))


def accept_connections(
    listening: socket.socket,
    stopping: threading.Event,
    take: Callable[[socket.socket, tuple[str, int]], None],
) -> None:
    """Accept until ``stopping`` is set; each connection, with TCP_NODELAY, goes to ``take``."""
    while not stopping.is_set():
        try:
            sock, address = listening.accept()
        except OSError:
            if stopping.is_set():
                return
            time.sleep(0.05)  # e.g. out of file descriptors: do not spin
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        take(sock, (str(address[0]), int(address[1])))


def stop_listening(listening: socket.socket | None) -> None:
    """Close a listening socket, waking the thread blocked in its accept()."""
    if listening is None:
        return
    with contextlib.suppress(OSError):
        listening.shutdown(socket.SHUT_RDWR)
    listening.close()


class AcceptorServer:
    """Accepts TCP connections and runs each association in its own thread.

    With no ``address`` it listens nowhere and runs the connections another process accepted
    and handed over (``adopt``).
    """

    def __init__(
        self,
        address: tuple[str, int] | None,
        *,
        settings: AcceptorSettings,
        policy: AcceptorPolicy,
        contexts: Mapping[str, frozenset[str]],
        tls: ssl.SSLContext | None = None,
        gate: ConnectionGate | None = None,
        slots: AssociationSlots | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.contexts = contexts  # abstract syntax -> the transfer syntaxes we take for it
        self._acceptor = AcceptorIdentity(
            max_pdu_bytes=settings.max_pdu_bytes,
            implementation_class_uid=settings.implementation_class_uid,
            implementation_version_name=settings.implementation_version_name,
            identities_checked=settings.identities_checked,
        )
        self.tls = tls
        # Where another process accepts the connections, it gates them, and the slots are
        # shared with the other receiver processes.
        self.gate = gate
        self.slots: AssociationSlots = slots if slots is not None else LocalSlots()
        self._associated = 0  # established associations of this server
        self._socket = socket.create_server(address, backlog=64) if address is not None else None
        self._lock = threading.Lock()
        self._active: dict[int, tuple[threading.Thread, socket.socket]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._negotiations: OrderedDict[bytes, Negotiation] = OrderedDict()
        self._negotiating = threading.Lock()

    @property
    def port(self) -> int:
        if self._socket is None:
            raise ValueError("this server does not listen")
        return int(self._socket.getsockname()[1])

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def active_count(self) -> int:
        """Established associations (connections still negotiating are not counted)."""
        return self._associated

    def take_slot(self) -> bool:
        """One of the ``max_associations`` slots, for an association about to be accepted."""
        if not self.slots.take(self.settings.max_associations):
            return False
        with self._lock:
            self._associated += 1
        return True

    def give_slot(self) -> None:
        with self._lock:
            self._associated -= 1
        self.slots.give_back()

    def negotiation_over(self, requestor: Requestor) -> None:
        if self.gate is not None:
            self.gate.done(requestor.address)

    def negotiation(self, request: bytes) -> Negotiation:
        """``negotiate(request)``, remembered for the last NEGOTIATIONS_KEPT requests.

        A PACS asks for the same thing association after association (storescu proposes
        about 128 presentation contexts). One request is negotiated at a time: associations
        that open together wait for the first one's answer instead of all working it out.
        Requests over NEGOTIATION_KEPT_BYTES are not kept.
        """
        with self._negotiating:
            found = self._negotiations.get(request)
            if found is None:
                found = negotiate(request, self.contexts, self._acceptor)
                if len(request) > NEGOTIATION_KEPT_BYTES:
                    return found
                self._negotiations[request] = found
                if len(self._negotiations) > NEGOTIATIONS_KEPT:
                    self._negotiations.popitem(last=False)
            else:
                self._negotiations.move_to_end(request)
            return found

    def start(self) -> None:
        if self._socket is not None:
            self._thread.start()

    def _accept_loop(self) -> None:
        assert self._socket is not None
        accept_connections(self._socket, self._stopping, self.adopt)

    def adopt(
        self,
        sock: socket.socket,
        address: tuple[str, int],
        *,
        on_negotiated: Callable[[], None] | None = None,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        """Run an accepted connection as an association, in a thread of its own, or close it
        at once when the gate says too many are negotiating.

        ``on_negotiated`` is called when it associated, was rejected or ended before;
        ``on_closed`` when the connection is done with.
        """
        if self.gate is not None:
            why = self.gate.admit(address[0])
            if why is not None:
                with contextlib.suppress(OSError):
                    sock.close()
                self.policy.connection_refused(address[0], why)
                if on_closed is not None:
                    on_closed()
                return
        requestor = Requestor(address=address[0], port=address[1])
        association = Association(sock, requestor, server=self, on_negotiated=on_negotiated)
        thread = threading.Thread(
            target=self._run,
            args=(association, on_closed),
            name=f"dicom-{address[0]}",
            daemon=True,
        )
        with self._lock:
            self._active[id(association)] = (thread, sock)
        thread.start()

    def _run(self, association: Association, on_closed: Callable[[], None] | None) -> None:
        try:
            association.run()
        finally:
            with self._lock:
                self._active.pop(id(association), None)
            if on_closed is not None:
                on_closed()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, end the open associations, and wait for their threads."""
        self._stopping.set()
        stop_listening(self._socket)
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            active = list(self._active.values())
        for _thread, sock in active:
            # The association's own thread sees its reading side end, sends an A-ABORT and
            # cleans up (one thread per socket: a TLS connection allows no other).
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + timeout
        for thread, sock in active:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():  # stuck sending to a peer that does not read
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
