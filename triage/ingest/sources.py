"""Files to import: a folder searched recursively, a DICOMDIR, or one file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread
from pydicom.fileset import FileSet


def import_sources(path: Path) -> Iterator[Path]:
    """Every file to ingest under ``path``, in a stable order; DICOMDIR files name their own."""
    if path.is_dir():
        for candidate in sorted(path.rglob("*")):
            if candidate.is_file() and candidate.name.upper() != "DICOMDIR":
                yield candidate
    elif path.name.upper() == "DICOMDIR":
        for instance in FileSet(dcmread(path)):
            yield Path(instance.path)
    elif path.is_file():
        yield path
