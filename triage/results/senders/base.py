"""What every sender shares: the files to send, read once, and the registry of senders by kind.

A sender kind is a function registered for one destination type with ``@sends(...)``; adding a
kind is a new module, not a new branch here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID

from triage.config import DicomWebDestination, DimseDestination
from triage.errors import PermanentError

log = logging.getLogger(__name__)

Destination = DimseDestination | DicomWebDestination
DestinationT = TypeVar("DestinationT", DimseDestination, DicomWebDestination)
DestinationT_contra = TypeVar(
    "DestinationT_contra", DimseDestination, DicomWebDestination, contravariant=True
)


@dataclass(frozen=True)
class ResultFile:
    """A DICOM Part 10 file to deliver, with the identifiers its File Meta Information gives."""

    path: Path
    sop_class_uid: UID
    sop_instance_uid: UID
    transfer_syntax_uid: UID


def read_result_file(path: Path) -> ResultFile:
    """Read only the File Meta Information of ``path``; PermanentError if it is no DICOM file."""
    try:
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError) as exc:
        raise PermanentError(f"result file {path} cannot be read: {exc}") from exc
    try:
        return ResultFile(
            path=path,
            sop_class_uid=UID(meta.MediaStorageSOPClassUID),
            sop_instance_uid=UID(meta.MediaStorageSOPInstanceUID),
            transfer_syntax_uid=UID(meta.TransferSyntaxUID),
        )
    except AttributeError as exc:
        raise PermanentError(f"result file {path} lacks file meta information: {exc}") from exc


class Sender(Protocol[DestinationT_contra]):
    """Delivers every file to the destination or raises DestinationUnavailableError (retry) or
    PermanentError (do not)."""

    def __call__(
        self,
        destination: DestinationT_contra,
        files: Sequence[ResultFile],
        *,
        calling_ae: str,
        timeout: float,
    ) -> None: ...


_SENDERS: dict[type[Any], Sender[Any]] = {}


def sends(kind: type[DestinationT]) -> Callable[[Sender[DestinationT]], Sender[DestinationT]]:
    """Register the decorated function as the sender for destinations of type ``kind``."""

    def register(sender: Sender[DestinationT]) -> Sender[DestinationT]:
        if kind in _SENDERS:
            raise RuntimeError(f"a sender for {kind.__name__} is already registered")
        _SENDERS[kind] = sender
        return sender

    return register


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae: str,
    timeout: float = 30,
) -> None:
    """Deliver every file in ``paths`` to ``destination``, or raise.

    Raises DestinationUnavailableError when trying again later may succeed (the peer is down,
    busy or out of resources) and PermanentError when it will not (a refused object, a wrong
    URL, an unreadable file). ``timeout`` bounds each network step (connect, each answer), not
    the whole batch.
    """
    sender = _SENDERS.get(type(destination))
    if sender is None:
        raise PermanentError(f"no sender for destinations of kind {destination.kind!r}")
    files = [read_result_file(Path(path)) for path in paths]
    if not files:
        return
    sender(destination, files, calling_ae=calling_ae, timeout=timeout)
