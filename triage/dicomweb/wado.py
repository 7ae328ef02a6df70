"""WADO-RS, PS3.18 10.4: what triage holds, read back.

Instances are sent as stored: the spool files' bytes, in their own transfer syntax, read in
pieces into a ``multipart/related; type="application/dicom"`` body (triage transcodes
nothing). A request whose Accept names only transfer syntaxes other than an instance's gets
406. Metadata is DICOM JSON (PS3.18 F.2) with bulk data by reference: pixel data points at
the instance's frames, any other large binary value at ``bulkdata/{tag}``. Frames come
uncompressed (``application/octet-stream``) or as their encapsulated fragments
(``image/*`` of the transfer syntax) as stored.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from sqlalchemy import select
from sqlalchemy.orm import Session

from triage.db.models import Instance, Job, ResultObject, Series, Study
from triage.dicom.header import parse_header
from triage.domain import InstanceState
from triage.errors import DicomInputError
from triage.storage.spool import Spool

PIECE = 4 << 20
"""Bytes read from a spool file at a time while an answer streams."""
BULK_THRESHOLD = 1024
"""Binary values longer than this go by reference in metadata."""
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}

# Media types of encapsulated frames, by transfer syntax (PS3.18 Table 8.7.3-2).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
_NATIVE = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
}


class NotFound(LookupError):
    """No such study, series, instance or frame here (404)."""


class NotAcceptable(ValueError):
    """Nothing the client accepts can be given (406)."""


@dataclass(frozen=True)
class Held:
    """One instance as held: its UIDs, transfer syntax and spool file."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path


def instances(
    session: Session,
    spool: Spool,
    results_dir: Path,
    study_uid: str,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> list[Held]:
    """The stored instances of a study, series or one instance, in the order received (the
    latest version of each SOP Instance UID), then triage's own results (SEG, SR) in
    ``results_dir``. Raises NotFound when there are none."""
    statement = (
        select(
            Study.study_uid,
            Series.series_uid,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax_uid,
            Instance.file_id,
            Instance.version,
        )
        .join(Series, Series.study_id == Study.id)
        .join(Instance, Instance.series_id == Series.id)
        .where(Study.study_uid == study_uid, Instance.state == InstanceState.STORED)
        .order_by(Series.id, Instance.id)
    )
    if series_uid is not None:
        statement = statement.where(Series.series_uid == series_uid)
    if sop_instance_uid is not None:
        statement = statement.where(Instance.sop_instance_uid == sop_instance_uid)
    # The latest version of each SOP Instance UID, where the first one was (versions are rare).
    latest: dict[str, tuple[int, Held]] = {}
    for study, series, sop, sop_class, syntax, file_id, version in session.execute(statement):
        if sop not in latest or latest[sop][0] < version:
            held = Held(study, series, sop, sop_class, syntax, spool.path_for(file_id))
            latest[sop] = (version, held)
    found = [held for _, held in latest.values()]
    results = (
        select(
            ResultObject.series_uid,
            ResultObject.sop_instance_uid,
            ResultObject.sop_class_uid,
            ResultObject.file_id,
        )
        .join(Job, ResultObject.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(Study.study_uid == study_uid)
        .order_by(ResultObject.id)
    )
    if series_uid is not None:
        results = results.where(ResultObject.series_uid == series_uid)
    if sop_instance_uid is not None:
        results = results.where(ResultObject.sop_instance_uid == sop_instance_uid)
    for series, sop, sop_class, file_id in session.execute(results):
        path = results_dir / f"{file_id}.dcm"
        try:
            syntax = parse_header(path.read_bytes()).transfer_syntax_uid
        except (OSError, DicomInputError):
            continue  # being rewritten by a re-run, or gone: not ours to give now
        found.append(Held(study_uid, series, sop, sop_class, syntax, path))
    if not found:
        raise NotFound("no such instances here")
    return found


def accepted_syntaxes(accept: str, media_type: str) -> set[str] | None:
    """The transfer syntaxes an Accept header takes for ``media_type`` parts (``None``: any,
    as stored). Raises NotAcceptable when it takes no ``media_type`` at all."""
    if not accept.strip():
        return None
    syntaxes: set[str] = set()
    for media_range in accept.split(","):
        kind, params = _media_range(media_range)
        part_type = params.get("type", "").lower()
        if (
            kind in ("*/*", "multipart/*")
            or (kind == "multipart/related" and part_type in ("", media_type, "*/*"))
            or kind == media_type
        ):
            syntax = params.get("transfer-syntax")
            if syntax is None or syntax == "*":
                return None
            syntaxes.add(syntax)
    if not syntaxes:
        raise NotAcceptable(f'send Accept: multipart/related; type="{media_type}"')
    return syntaxes


def _media_range(text: str) -> tuple[str, dict[str, str]]:
    kind, *rest = text.strip().split(";")
    params = {}
    for item in rest:
        name, _, value = item.strip().partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return kind.strip().lower(), params


def check_syntaxes(held: Sequence[Held], syntaxes: set[str] | None) -> None:
    if syntaxes is None:
        return
    other = sorted({item.transfer_syntax_uid for item in held} - syntaxes)
    if other:
        raise NotAcceptable(
            f"held in transfer syntax {', '.join(other)}, which the request does not accept; "
            "triage sends instances as stored (add transfer-syntax=* to the Accept header)"
        )


def multipart_instances(held: Sequence[Held], boundary: str) -> Iterator[bytes]:
    """The instances' files as one multipart/related body, in pieces of about PIECE bytes
    (several small instances to a piece, a large one in several): few writes, few hand-overs
    from the thread that reads the files to the one that sends."""
    pending: list[bytes] = []
    size = 0
    for item in held:
        pending.append(
            (
                f"--{boundary}\r\nContent-Type: application/dicom; "
                f"transfer-syntax={item.transfer_syntax_uid}\r\n"
                f"Content-Location: {item.sop_instance_uid}\r\n\r\n"
            ).encode()
        )
        with open(item.path, "rb", buffering=0) as file:
            while data := file.read(PIECE):
                pending.append(data)
                size += len(data)
                if size >= PIECE:
                    yield b"".join(pending)
                    pending, size = [], 0
        pending.append(b"\r\n")
    pending.append(f"--{boundary}--\r\n".encode())
    yield b"".join(pending)


def metadata(held: Held, instance_url: str) -> dict[str, Any]:
    """DICOM JSON of one instance, bulk data by reference."""
    ds = dcmread(held.path, defer_size=BULK_THRESHOLD)

    def bulk(element: DataElement) -> str:
        if element.tag == 0x7FE00010:
            frames = int(ds.get("NumberOfFrames") or 1)
            return f"{instance_url}/frames/{','.join(str(n) for n in range(1, frames + 1))}"
        return f"{instance_url}/bulkdata/{element.tag:08X}"

    body = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk)
    # The file meta is not part of the data set, but its transfer syntax says how to read
    # the bulk data.
    body["00020010"] = {"vr": "UI", "Value": [held.transfer_syntax_uid]}
    return body


def bulk_value(held: Held, tag: int) -> bytes:
    """A top-level binary value of the instance. Raises NotFound."""
    ds = dcmread(held.path)
    element = ds.get(tag)
    if element is None or element.VR not in _BINARY_VRS or element.value is None:
        raise NotFound(f"no bulk data at {tag:08X}")
    return bytes(element.value)


def frames(held: Held, numbers: Sequence[int]) -> tuple[str, list[bytes]]:
    """(media type, the frames' bytes) of frames ``numbers`` (from 1), as stored. Raises
    NotFound."""
    ds: Dataset = dcmread(held.path)
    if "PixelData" not in ds:
        raise NotFound("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames") or 1)
    if any(number < 1 or number > count for number in numbers):
        raise NotFound(f"the instance has {count} frame(s)")
    syntax = held.transfer_syntax_uid
    if syntax in _NATIVE:
        data = ds.PixelData
        size = len(data) // count
        return "application/octet-stream", [bytes(data[(n - 1) * size : n * size]) for n in numbers]
    media = FRAME_MEDIA_TYPES.get(syntax, "application/octet-stream")
    every = list(generate_frames(ds.PixelData, number_of_frames=count))
    return media, [every[n - 1] for n in numbers]


def multipart_frames(media_type: str, syntax: str, parts: Sequence[bytes], boundary: str) -> bytes:
    body = b""
    for part in parts:
        body += (
            f"--{boundary}\r\nContent-Type: {media_type}; transfer-syntax={syntax}\r\n\r\n"
        ).encode()
        body += part + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()
