"""The DICOM file format's preamble and File Meta Information (PS3.10 7.1), written directly.

A received data set is stored as sent, behind a meta header built from the C-STORE request
and the negotiated transfer syntax; the UIDs in it must already be valid (``is_valid_uid``).
"""

from __future__ import annotations

import struct

PREAMBLE = b"\x00" * 128 + b"DICM"

_SHORT = struct.Struct("<HH2sH")  # tag, VR, 16-bit length
_LONG = struct.Struct("<HH2s2xL")  # tag, VR, reserved, 32-bit length


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    return _SHORT.pack(0x0002, element, vr, len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    encoded = value.encode("ascii")
    return encoded + pad if len(encoded) % 2 else encoded


def file_meta(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version_name: str,
    source_ae_title: str | None = None,
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group, Explicit VR Little Endian."""
    body = [
        _LONG.pack(0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
        _short(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _short(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _short(0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
        _short(0x0012, b"UI", _padded(implementation_class_uid, b"\x00")),
        _short(0x0013, b"SH", _padded(implementation_version_name, b" ")),
    ]
    if source_ae_title:
        body.append(_short(0x0016, b"AE", _padded(source_ae_title, b" ")))
    group = b"".join(body)
    length = _SHORT.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<L", len(group))
    return PREAMBLE + length + group
