"""Build the Key Object Selection documents of model runs (TID 2010).

Two kinds: the key images of one run, with its SEG and SR (IHE AI Results), and the
rejection note that withdraws an earlier run's result objects once a later run superseded
them (IHE Imaging Object Change Management, RAD-66 "Rejection Note Stored").

Both go in the study of the objects they reference, in a series of their own, with UIDs
derived like those of the SEG and SR: a rebuild yields the same document, and a receiver
replaces its copy instead of keeping two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import triage
from triage.dicom import uids
from triage.dicom.uids import ResultUid
from triage.results.inputs import AlgorithmIdentity, ResultInput

OF_INTEREST: Code = codes.DCM.OfInterest
"""(113000, DCM, "Of Interest"), CID 7010: the title of a run's key images."""

REJECTED_FOR_QUALITY_REASONS: Code = codes.DCM.RejectedForQualityReasons
"""(113001, DCM, "Rejected for Quality Reasons"), CID 7010: the title of a rejection note."""

KEY_OBJECT_DESCRIPTION: Code = codes.DCM.KeyObjectDescription
"""(113012, DCM, "Key Object Description"): TID 2010's free-text description."""

REFERENCE_NAME = Code("260753009", "SCT", "Source")
"""Concept name of each reference: TID 2010 leaves it unnamed; highdicom's choice (PS3.3
C.17.3.2.4 suggests a generic name where anonymous items are unwelcome)."""

KEY_OBJECT_SELECTION_TEMPLATE = "2010"

REJECTION_MANUFACTURER = "triage"
REJECTION_SERIES_DESCRIPTION = "Rejected results"

# The attributes highdicom's KeyObjectSelectionDocument reads from its first evidence item
# (the Patient and Study modules are copied in full afterwards, as for the SEG and SR).
_FIRST_EVIDENCE_ATTRIBUTES = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class InstanceReference:
    """One instance a Key Object Selection references, e.g. an earlier run's SEG or SR.

    ``image`` says whether the instance is an image (it has rows and columns of pixels: a
    CT slice or a SEG is one, an SR or KOS is not); it decides the value type of its content
    item, IMAGE or COMPOSITE (PS3.3 C.17.3.2.1). Waveforms are not supported.
    """

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    image: bool

    def __post_init__(self) -> None:
        for name in ("sop_class_uid", "sop_instance_uid", "series_instance_uid"):
            value = getattr(self, name)
            if not uids.is_valid_uid(value):
                raise ValueError(f"{name} is not a valid UID: {value!r}")

    @classmethod
    def of(cls, dataset: Dataset) -> InstanceReference:
        """The reference to ``dataset``, an image when it has Rows and Columns (as highdicom
        decides)."""
        return cls(
            sop_class_uid=str(dataset.SOPClassUID),
            sop_instance_uid=str(dataset.SOPInstanceUID),
            series_instance_uid=str(dataset.SeriesInstanceUID),
            image="Rows" in dataset and "Columns" in dataset,
        )


def _unique(references: Sequence[InstanceReference]) -> list[InstanceReference]:
    """``references`` in order, each once; one UID named twice in two ways is an error."""
    seen: dict[str, InstanceReference] = {}
    for reference in references:
        earlier = seen.setdefault(reference.sop_instance_uid, reference)
        if earlier != reference:
            raise ValueError(f"instance {reference.sop_instance_uid} is referenced inconsistently")
    return list(seen.values())


def _reference_item(reference: InstanceReference) -> hd.sr.ContentItem:
    if reference.image:
        return hd.sr.ImageContentItem(
            name=REFERENCE_NAME,
            referenced_sop_class_uid=reference.sop_class_uid,
            referenced_sop_instance_uid=reference.sop_instance_uid,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    return hd.sr.CompositeContentItem(
        name=REFERENCE_NAME,
        referenced_sop_class_uid=reference.sop_class_uid,
        referenced_sop_instance_uid=reference.sop_instance_uid,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _content(
    title: Code,
    description: str,
    references: Sequence[InstanceReference],
    observer: hd.sr.ObserverContext | None,
) -> hd.ko.KeyObjectSelection:
    """The TID 2010 tree: title, observer (TID 1002), description, then the references.

    Built here rather than by ``hd.ko.KeyObjectSelection``, which decides IMAGE or
    COMPOSITE from a dataset's Rows, and a rejected object is known by its UIDs alone.
    """
    items: list[hd.sr.ContentItem] = [*(observer or [])]
    items.append(
        hd.sr.TextContentItem(
            name=KEY_OBJECT_DESCRIPTION,
            value=description,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    items.extend(_reference_item(reference) for reference in references)
    root = hd.sr.ContainerContentItem(name=title, template_id=KEY_OBJECT_SELECTION_TEMPLATE)
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.ko.KeyObjectSelection.from_sequence([root])


def _evidence(
    references: Sequence[InstanceReference], study_uid: str, header: Dataset
) -> list[Dataset]:
    """Current Requested Procedure Evidence of the references: all in ``study_uid``.

    highdicom takes a few patient and study attributes from the first item; they come from
    ``header`` (empty where it lacks them: all are type 2).
    """
    evidence = []
    for reference in references:
        item = Dataset()
        item.SOPClassUID = reference.sop_class_uid
        item.SOPInstanceUID = reference.sop_instance_uid
        item.SeriesInstanceUID = reference.series_instance_uid
        item.StudyInstanceUID = study_uid
        evidence.append(item)
    for keyword in _FIRST_EVIDENCE_ATTRIBUTES:
        setattr(evidence[0], keyword, header.get(keyword, ""))
    if "SpecificCharacterSet" in header:
        evidence[0].SpecificCharacterSet = header.SpecificCharacterSet
    return evidence


def _check_header(header: Dataset, study_uid: str) -> None:
    if header.get("StudyInstanceUID") != study_uid:
        raise ValueError("header does not belong to study_uid")
    if "SOPClassUID" not in header:
        raise ValueError("header has no SOP Class UID to pick its Patient and Study modules by")
    if not uids.is_valid_uid(study_uid):
        raise ValueError(f"study_uid is not a valid UID: {study_uid!r}")


def _observation_context(identity: AlgorithmIdentity) -> hd.sr.ObserverContext:
    """The algorithm as the device observer that selected the objects (TID 1002/1004)."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid,
            name=identity.name,
            manufacturer_name=identity.manufacturer,
            model_name=identity.name,
        ),
    )


def _rounded(value: float) -> int:
    return math.floor(value + 0.5)


def key_slices(result: ResultInput) -> list[Dataset]:
    """The key slice of each positive finding of ``result``: source slices, in slice order.

    A finding with a segment: the slice where its segment covers most voxels, the lower
    index of equals (the slice ``workers.keyimage`` previews). One with only a location: the
    slice nearest its centroid. Findings sharing a segment share its slice, and a slice two
    findings name is listed once.
    """
    indices: set[int] = set()
    mask = result.mask
    for finding in result.findings:
        if not finding.positive:
            continue
        if finding.segment_number is not None and mask is not None:
            number = finding.segment_number
            covered = result.segment_slices[number]
            indices.add(max(covered, key=lambda index: int((mask[index] == number).sum())))
        elif finding.location is not None:
            indices.add(_rounded(finding.location[0]))
    return [result.source[index] for index in sorted(indices)]


def build_key_object_selection(
    result: ResultInput,
    segmentation: Dataset | None,
    sr: Dataset,
    key_slices: Sequence[Dataset],
    *,
    series_number: int,
) -> hd.ko.KeyObjectSelectionDocument:
    """The key images of ``result`` (IHE AI Results): the key slices, its SEG and its SR.

    ``segmentation`` and ``sr`` are the run's ``build_segmentation(result)`` (None where the
    run segmented nothing) and ``build_sr(result, segmentation)``; ``key_slices`` are source
    images of the study, e.g. ``key_slices(result)``, none for a negative run. The document
    is titled (113000, DCM, "Of Interest") from CID 7010, names the algorithm as its device
    observer and in the Contributing Equipment Sequence, and goes in the source study in a
    new series numbered ``series_number``, with UIDs derived from the run.
    """
    if series_number < 1:
        raise ValueError("series numbers must be positive")
    results = [*([segmentation] if segmentation is not None else []), sr]
    for dataset in [*key_slices, *results]:
        if dataset.StudyInstanceUID != result.study_uid:
            raise ValueError(f"instance {dataset.SOPInstanceUID} belongs to another study")
    references = _unique([InstanceReference.of(dataset) for dataset in [*key_slices, *results]])
    identity = result.algorithm
    header = result.source[0]
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=_evidence(references, result.study_uid, header),
        content=_content(
            OF_INTEREST,
            f"Key images of {identity.name} {identity.version}, with its segmentation and report",
            references,
            _observation_context(identity),
        ),
        series_instance_uid=result.uid(ResultUid.KOS_SERIES),
        series_number=series_number,
        sop_instance_uid=result.uid(ResultUid.KOS_INSTANCE),
        **identity.equipment(),
    )
    document.copy_patient_and_study_information(header)
    return document


def build_rejection_note(
    *,
    study_uid: str,
    model_name: str,
    model_version: str,
    rejected: Sequence[InstanceReference],
    header: Dataset,
    series_number: int,
) -> hd.ko.KeyObjectSelectionDocument:
    """The IOCM rejection note withdrawing ``rejected``, earlier result objects of the study.

    Title (113001, DCM, "Rejected for Quality Reasons"), from CID 7010 Key Object Selection
    Document Title. IOCM knows four rejection titles: (113001) "Rejected for Quality Reasons",
    (113037) "Rejected for Patient Safety Reasons", (113038) "Incorrect Modality Worklist
    Entry" and (113039) "Data Retention Policy Expired". Results a later run superseded are
    sound objects of the right patient and procedure whose content turned out wrong: a
    quality rejection. Archives typically hide such instances from regular use yet keep
    them for quality review (here: the audit of what was sent). Patient Safety is for
    objects that must not be used at all (e.g. wrong patient or laterality); Incorrect
    Modality Worklist Entry for objects filed under the wrong order; Data Retention Policy
    Expired for deletion at end of life. CID 7011 holds the optional
    Document Title Modifiers of a quality rejection (reasons such as "Software failure"), not
    the title; none is given, since a superseded result need not be a failure.

    As IOCM asks, the note is in the study of the rejected instances (``study_uid``: all of
    them must be there), in a new series, and references each rejected instance in its
    content and its Current Requested Procedure Evidence Sequence. Its Series and SOP
    Instance UIDs derive from the superseding run (``model_name``, ``model_version``), so a
    rebuild is the same note. ``header`` is an instance of the study (a source image, say)
    whose Patient and Study attributes are copied; its SOP Class picks the modules.

    Never list an object the superseding run replaced under the same UID: a re-run of the
    same model version reuses its UIDs, so rejecting its earlier SR would withdraw the new
    one. Its earlier SEG, where the re-run made none, is fair game.
    """
    if series_number < 1:
        raise ValueError("series numbers must be positive")
    if not model_name or not model_version:
        raise ValueError("model_name and model_version must not be empty")
    _check_header(header, study_uid)
    references = _unique(rejected)
    if not references:
        raise ValueError("nothing to reject")

    def uid(kind: ResultUid) -> str:
        return uids.result_uid(
            study_uid=study_uid, model_name=model_name, model_version=model_version, kind=kind
        )

    own = {uid(ResultUid.REJECTION_SERIES), uid(ResultUid.REJECTION_INSTANCE)}
    for reference in references:
        if {reference.sop_instance_uid, reference.series_instance_uid} & own:
            raise ValueError("a rejection note cannot reject itself")

    document = hd.ko.KeyObjectSelectionDocument(
        evidence=_evidence(references, study_uid, header),
        content=_content(
            REJECTED_FOR_QUALITY_REASONS,
            f"Results superseded by {model_name} {model_version}",
            references,
            None,
        ),
        series_instance_uid=uid(ResultUid.REJECTION_SERIES),
        series_number=series_number,
        sop_instance_uid=uid(ResultUid.REJECTION_INSTANCE),
        instance_number=1,
        manufacturer=REJECTION_MANUFACTURER,
        manufacturer_model_name=REJECTION_MANUFACTURER,
        software_versions=triage.__version__,
        series_description=REJECTION_SERIES_DESCRIPTION,
    )
    document.copy_patient_and_study_information(header)
    return document
