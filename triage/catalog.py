"""The model catalog as triage sees it: descriptions read from disk, no weights loaded.

Routing needs each model's name and version to create jobs; ``workers`` loads the weights.
Three layouts are recognised in each models directory:

- a TorchScript file with a JSON sidecar beside it (``"format": "torchscript"``, ``"file"``);
- a MONAI bundle directory: ``configs/metadata.json`` (name, version) whose ``"triage"`` section
  holds what the sidecar holds (applies_to, outputs, operating_point, finding);
- a JSON sidecar alone with ``"format": "python"`` and ``"entry": "module:function"``: a
  pipeline written in Python that the worker imports and calls (``workers/models/python.py``).

The bundled reference model lives in ``workers/models/reference``; a model of the same name in
the configured ``models_dir`` takes precedence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from triage.config import Settings
from triage.config import describe_validation_error as _describe

BUNDLED_MODELS_DIR = Path(__file__).resolve().parents[1] / "workers" / "models" / "reference"


class AppliesTo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    modalities: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    description_patterns: list[str] = Field(default_factory=list)


class ModelDescription(BaseModel):
    """What a model declares. Unknown keys (preprocessing, training notes) are kept as given."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=32)
    format: Literal["torchscript", "monai-bundle", "python"]
    file: str | None = None
    applies_to: AppliesTo = Field(default_factory=AppliesTo)
    outputs: list[str] = Field(default_factory=list)
    operating_point: dict[str, Any] = Field(default_factory=dict)
    finding: dict[str, Any] | None = None


@dataclass(frozen=True)
class CatalogEntry:
    """One model found on disk; ``error`` says why it cannot be used."""

    path: Path
    description: ModelDescription | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return self.description.name if self.description else self.path.name


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _entry(path: Path, data: dict[str, Any]) -> CatalogEntry:
    try:
        description = ModelDescription.model_validate(data)
    except ValidationError as exc:
        return CatalogEntry(path, error=_describe(exc).removeprefix("invalid configuration: "))
    if description.format == "torchscript":
        weights = path.parent / (description.file or "")
        if not description.file or not weights.is_file():
            return CatalogEntry(path, description, f"weights file {weights.name!r} not found")
    if description.format == "python" and python_entry(description) is None:
        target = (description.model_extra or {}).get("entry", "")
        why = f"entry {target!r} is not 'module:function' (e.g. 'site.model:load')"
        return CatalogEntry(path, description, why)
    return CatalogEntry(path, description)


def python_entry(description: ModelDescription) -> tuple[str, str] | None:
    """A ``python``-format model's ``"entry"`` as (module, function); None if malformed."""
    target = str((description.model_extra or {}).get("entry", ""))
    module, _, function = target.partition(":")
    return (module, function) if module and function else None


def _bundle(directory: Path) -> CatalogEntry:
    metadata_path = directory / "configs" / "metadata.json"
    try:
        metadata = _read_json(metadata_path)
    except (OSError, ValueError) as exc:
        return CatalogEntry(directory, error=f"unreadable configs/metadata.json: {exc}")
    data = {
        "name": metadata.get("name", directory.name),
        "version": metadata.get("version"),
        "format": "monai-bundle",
        **metadata.get("triage", {}),
    }
    return _entry(directory, data)


def _scan(directory: Path) -> list[CatalogEntry]:
    entries = []
    for candidate in sorted(directory.iterdir()) if directory.is_dir() else []:
        if (candidate / "configs" / "metadata.json").is_file():
            entries.append(_bundle(candidate))
        elif candidate.is_dir():
            entries.extend(_scan_sidecars(candidate))
    entries.extend(_scan_sidecars(directory))
    return entries


def _scan_sidecars(directory: Path) -> list[CatalogEntry]:
    entries = []
    for sidecar in sorted(directory.glob("*.json")):
        try:
            data = _read_json(sidecar)
        except (OSError, ValueError) as exc:
            entries.append(CatalogEntry(sidecar, error=f"unreadable sidecar: {exc}"))
            continue
        if data.get("format") in ("torchscript", "python"):
            entries.append(_entry(sidecar, data))
    return entries


def scan_models(settings: Settings) -> list[CatalogEntry]:
    """Every model description in ``models_dir`` then the bundled directory, in that order."""
    directories = [d for d in (settings.models_dir, BUNDLED_MODELS_DIR) if d is not None]
    return [entry for directory in directories for entry in _scan(directory)]


def usable_models(settings: Settings) -> dict[str, ModelDescription]:
    """Model name -> description; the first usable entry of a name wins."""
    models: dict[str, ModelDescription] = {}
    for entry in scan_models(settings):
        if entry.description is not None and entry.error is None:
            models.setdefault(entry.description.name, entry.description)
    return models
