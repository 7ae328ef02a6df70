"""What every model run returns, whatever its format: findings, an optional mask, timings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from triage.catalog import ModelDescription
from workers.volume import Volume


@dataclass(frozen=True)
class Code:
    scheme: str
    value: str
    meaning: str

    @classmethod
    def from_description(cls, description: ModelDescription) -> Code:
        finding = description.finding or {}
        return cls(
            scheme=str(finding.get("scheme", "99TRIAGE")),
            value=str(finding.get("code", description.name))[:16],
            meaning=str(finding.get("meaning", description.name))[:64],
        )


@dataclass(frozen=True)
class DetectedFinding:
    """A study-level score (``kind="score"``) or one detected lesion (``kind="lesion"``)."""

    kind: str
    label: str
    code: Code
    probability: float
    positive: bool
    volume_ml: float | None = None
    centroid_voxel: tuple[float, float, float] | None = None  # canonical grid
    segment: int | None = None  # value of this finding's voxels in the mask


@dataclass(frozen=True, eq=False)
class ModelOutput:
    findings: list[DetectedFinding]
    mask: npt.NDArray[np.uint8] | None = None  # label map on the volume's canonical grid
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def positive(self) -> bool:
        return any(f.positive for f in self.findings)


class LoadedModel(Protocol):
    """A model ready to run in this process, on its device."""

    description: ModelDescription
    device: torch.device

    def run(self, volume: Volume) -> ModelOutput: ...

    def warm_up(self) -> None:
        """Run the network once (or as often as its runtime needs) on an input of its own
        shape, so that the first study does not pay for allocation and compilation."""
        ...


def threshold_of(description: ModelDescription, key: str, default: float = 0.5) -> float:
    value: Any = description.operating_point.get(key, default)
    return float(value)
