"""What the SEG and SR builders take: one model run on one source series, grouped small."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from triage.dicom import uids

MAX_LO_LENGTH = 64
"""Long String (LO): names, versions and labels end up in LO attributes."""

MORPHOLOGICALLY_ABNORMAL_STRUCTURE: Code = codes.SCT.MorphologicallyAbnormalStructure
CT_HEAD = Code("24725-4", "LN", "CT Head")
PROCESSING_ALGORITHM = Code("1630", "99IHE", "Processing Algorithm")
"""Purpose of Reference of the algorithm in Contributing Equipment (IHE AI Results)."""


def _check_long_string(name: str, value: str) -> None:
    if not value or len(value) > MAX_LO_LENGTH or "\\" in value:
        raise ValueError(f"{name} must be 1-{MAX_LO_LENGTH} characters without '\\': {value!r}")


@dataclass(frozen=True)
class AlgorithmIdentity:
    """The model that produced the results, as DICOM names it."""

    name: str
    version: str
    manufacturer: str = "triage"
    family_code: Code = codes.DCM.ArtificialIntelligence
    """Algorithm family, from CID 7162."""

    def __post_init__(self) -> None:
        for name in ("name", "version", "manufacturer"):
            _check_long_string(name, getattr(self, name))

    @property
    def device_uid(self) -> str:
        """Device UID of this model version, the same on every study."""
        return uids.device_uid(model_name=self.name, model_version=self.version)

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """Contributing Equipment Sequence item naming the algorithm (IHE AI Results)."""
        item = hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.name,
            software_versions=self.version,
        )
        # highdicom accepts only DCM purposes; the profile names the algorithm with 99IHE 1630.
        item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(PROCESSING_ALGORITHM)]
        item.DeviceUID = self.device_uid
        return item

    def equipment(self) -> dict[str, Any]:
        """The keyword arguments every result object's constructor takes for the equipment
        that made it: this algorithm (General Equipment, Contributing Equipment, the series'
        description)."""
        return {
            "instance_number": 1,
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.name,
            "software_versions": self.version,
            "device_serial_number": self.device_uid,
            "series_description": self.name,
            "contributing_equipment": [self.contributing_equipment()],
        }


@dataclass(frozen=True)
class FindingInput:
    """One finding of the model; a negative one says a finding type was checked and is absent.

    Only a positive finding (at the model's operating point) carries a mask segment, a volume
    or a location. ``segment_number`` is the label value of its voxels in ``ResultInput.mask``;
    all findings of one type share one segment. ``location`` is a centroid as a voxel index
    (slice, row, col) into the sorted source series; it may be fractional.
    """

    label: str
    code: Code
    probability: float
    positive: bool
    tracking_uid: str
    category: Code = MORPHOLOGICALLY_ABNORMAL_STRUCTURE
    volume_ml: float | None = None
    segment_number: int | None = None
    location: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        _check_long_string("label", self.label)
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must lie in [0, 1], got {self.probability}")
        if not uids.is_valid_uid(self.tracking_uid):
            raise ValueError(f"tracking_uid is not a valid UID: {self.tracking_uid!r}")
        if self.volume_ml is not None and not self.volume_ml >= 0:  # NaN too
            raise ValueError(f"volume_ml must not be negative, got {self.volume_ml}")
        if self.segment_number is not None and self.segment_number < 1:
            raise ValueError(f"segment_number must be at least 1, got {self.segment_number}")
        localised = (self.volume_ml, self.segment_number, self.location)
        if not self.positive and any(value is not None for value in localised):
            raise ValueError("a negative finding has no volume, segment or location")


@dataclass(frozen=True)
class ResultInput:
    """One model run on one source series: everything the SEG and SR builders need.

    ``source`` holds the datasets of ONE series sorted by position; ``mask`` (or None) is a
    label map of shape (slices, rows, cols) aligned to it, 0 for background and a finding's
    ``segment_number`` for its voxels (a boolean mask is segment 1). ``findings`` names at
    least one finding type, negative ones included, so a negative study still has something
    to report. ``procedure`` is the imaging procedure reported, e.g. ``CT_HEAD``.
    """

    source: Sequence[Dataset]
    algorithm: AlgorithmIdentity
    findings: Sequence[FindingInput]
    mask: npt.NDArray[np.bool_] | npt.NDArray[np.uint8] | None
    study_uid: str
    procedure: Code
    seg_series_number: int
    sr_series_number: int

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("no source datasets")
        if not self.findings:
            raise ValueError("no findings: pass a negative finding for each type checked")
        if {ds.StudyInstanceUID for ds in self.source} != {self.study_uid}:
            raise ValueError("source datasets do not all belong to study_uid")
        if len({ds.SeriesInstanceUID for ds in self.source}) != 1:
            raise ValueError("source datasets span more than one series")
        if min(self.seg_series_number, self.sr_series_number) < 1:
            raise ValueError("series numbers must be positive")
        shape = (len(self.source), self.source[0].Rows, self.source[0].Columns)
        for finding in self.findings:
            if finding.location is not None and not all(
                0 <= index <= size - 1 for index, size in zip(finding.location, shape, strict=True)
            ):
                raise ValueError(f"location {finding.location} lies outside {shape}")
        self._check_segments(shape)

    def uid(self, kind: uids.ResultUid) -> str:
        """Deterministic UID of one of this run's result objects."""
        return uids.result_uid(
            study_uid=self.study_uid,
            model_name=self.algorithm.name,
            model_version=self.algorithm.version,
            kind=kind,
        )

    @property
    def segments(self) -> dict[int, FindingInput]:
        """The first finding of each segment by segment number; empty: nothing to segment."""
        segments: dict[int, FindingInput] = {}
        for finding in self.findings:
            if finding.segment_number is not None:
                segments.setdefault(finding.segment_number, finding)
        return dict(sorted(segments.items()))

    @cached_property
    def segment_slices(self) -> dict[int, tuple[int, ...]]:
        """The source slice indices each mask label covers, in slice order, by label.

        The SEG encodes and the SR references only these slices. One cheap pass over the mask
        finds the slices holding any voxel; only those are looked at label by label, so the work
        beyond that pass grows with the finding, not with the series.
        """
        if self.mask is None:
            return {}
        per_slice = self.mask.reshape(len(self.mask), -1)
        slices: dict[int, list[int]] = {}
        for index in np.flatnonzero(per_slice.max(axis=1)).tolist():
            voxels = per_slice[index]
            for label in np.unique(voxels[voxels != 0]).tolist():
                slices.setdefault(int(label), []).append(index)
        return {label: tuple(found) for label, found in sorted(slices.items())}

    def _check_segments(self, shape: tuple[int, int, int]) -> None:
        segments = self.segments
        for finding in self.findings:
            number = finding.segment_number
            if number is not None and segments[number].code != finding.code:
                raise ValueError(f"segment {number} holds two finding types")
        if len({finding.code for finding in segments.values()}) != len(segments):
            raise ValueError("one finding type spread over several segments")
        numbers = tuple(segments)
        if numbers != tuple(range(1, len(numbers) + 1)):
            raise ValueError(f"segment numbers must run 1..N, got {numbers}")
        if self.mask is None:
            if numbers:
                raise ValueError("findings name segments but there is no mask")
            return
        if self.mask.shape != shape:
            raise ValueError(f"mask shape {self.mask.shape} is not {shape}")
        labels = tuple(self.segment_slices)
        if labels != numbers:
            raise ValueError(f"mask labels {labels} differ from the findings' segments {numbers}")
