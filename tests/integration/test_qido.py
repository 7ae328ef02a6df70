"""QIDO-RS matching (PS3.4 C.2.2.2 as PS3.18 10.6 uses it) on SQLite and PostgreSQL, on
instances indexed by the real ingest path. Expected matches are worked out by hand from the
standard's rules for the three studies below."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import IngestStack, StackFactory
from tests.helpers.instances import pydicom_file
from triage.config import Settings
from triage.db.session import session_scope
from triage.dicomweb.qido import Level, QueryError, parse_query, search

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


@dataclass(frozen=True)
class Held:
    study: str
    series: list[str]
    instances: list[str]


def _instance(
    out: Path, *, study: str, series: str, modality: str, sop_class: str, **attributes: str
) -> Path:
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality = modality
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path = out / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def held(
    tmp_path: Path, database_url: str, settings: Settings, stack_factory: StackFactory
) -> tuple[IngestStack, dict[str, Held]]:
    stack = stack_factory(settings.model_copy(update={"database_url": database_url}))
    patients = {
        "A": dict(
            PatientName="Doe^John",
            PatientID="P1",
            AccessionNumber="ACC1",
            StudyDate="20240115",
            StudyTime="083000",
            StudyDescription="CT HEAD",
        ),
        "B": dict(
            PatientName="O'Brien^Mary",
            PatientID="P2",
            AccessionNumber="ACC2",
            StudyDate="20240220",
            StudyTime="131500.25",
        ),
        "C": dict(
            PatientName="Do_e%^Jane",
            PatientID="P3",
            AccessionNumber="ACC3",
            StudyDate="20231231",
            StudyTime="235959",
        ),
    }
    modalities = {"A": [("CT", CT), ("MR", MR)], "B": [("CT", CT)], "C": [("CR", CT)]}
    found: dict[str, Held] = {}
    for name, attributes in patients.items():
        study = generate_uid()
        series_uids, instance_uids = [], []
        for modality, sop_class in modalities[name]:
            series = generate_uid()
            series_uids.append(series)
            for _ in range(2):
                path = _instance(
                    tmp_path,
                    study=study,
                    series=series,
                    modality=modality,
                    sop_class=sop_class,
                    **attributes,
                )
                stack.ingest(path)
                instance_uids.append(str(dcmread(path).SOPInstanceUID))
        found[name] = Held(study, series_uids, instance_uids)
    return stack, found


def run(stack: IngestStack, level: Level, *params: tuple[str, str], **fixed: str) -> list[Any]:
    query = parse_query(level, list(params), fixed=fixed or None)
    with session_scope(stack.session_factory) as session:
        return search(session, query, lambda uids: "/".join(filter(None, uids.values())))


def studies(stack: IngestStack, held: dict[str, Held], *params: tuple[str, str]) -> set[str]:
    by_uid = {h.study: name for name, h in held.items()}
    return {by_uid[answer["0020000D"]["Value"][0]] for answer in run(stack, Level.STUDY, *params)}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([("PatientID", "P1")], {"A"}),
        ([("00100020", "P2")], {"B"}),  # by tag
        ([("PatientName", "doe^john")], {"A"}),  # PN: without regard to case
        ([("PatientName", "Do*")], {"A", "C"}),
        ([("PatientName", "Do?e*")], {"C"}),  # ? is one character
        ([("PatientName", "Do_e%^Jane")], {"C"}),  # _ and % are literal
        ([("PatientName", "D%")], set()),
        ([("PatientName", "O'Brien*")], {"B"}),  # a quote is a character
        ([("AccessionNumber", "ACC2")], {"B"}),
        ([("StudyDate", "20240220")], {"B"}),
        ([("StudyDate", "20240101-20241231")], {"A", "B"}),
        ([("StudyDate", "-20231231")], {"C"}),
        ([("StudyDate", "20240116-")], {"B"}),
        ([("StudyTime", "0800-0900")], {"A"}),
        ([("StudyTime", "1300-")], {"B", "C"}),
        ([("StudyTime", "-131500")], {"A", "B"}),  # 131500.25 is within 13:15:00
        ([("ModalitiesInStudy", "MR")], {"A"}),
        ([("ModalitiesInStudy", "CT")], {"A", "B"}),
        ([("ModalitiesInStudy", "CR,MR")], {"A", "C"}),
        ([("PatientID", "P1"), ("StudyDate", "20240220")], set()),  # every key must match
        ([("PatientID", "")], {"A", "B", "C"}),  # universal matching
    ],
)
def test_study_matching(
    held: tuple[IngestStack, dict[str, Held]], params: list[tuple[str, str]], expected: set[str]
) -> None:
    stack, found = held
    assert studies(stack, found, *params) == expected


def test_uid_lists_series_and_instance_levels(held: tuple[IngestStack, dict[str, Held]]) -> None:
    stack, found = held
    a, b = found["A"], found["B"]
    assert studies(stack, found, ("StudyInstanceUID", f"{a.study}\\{b.study}")) == {"A", "B"}
    assert studies(stack, found, ("StudyInstanceUID", f"{a.study},{b.study}")) == {"A", "B"}

    mr = run(stack, Level.SERIES, ("Modality", "MR"))
    assert [row["0020000E"]["Value"][0] for row in mr] == [a.series[1]]
    assert mr[0]["00201209"]["Value"] == [2]  # NumberOfSeriesRelatedInstances
    assert mr[0]["0020000D"]["Value"] == [a.study]  # which study, across studies
    in_a = run(stack, Level.SERIES, StudyInstanceUID=a.study)
    assert [row["0020000E"]["Value"][0] for row in in_a] == a.series
    one = run(stack, Level.SERIES, ("SeriesInstanceUID", b.series[0]))
    assert [row["00080060"]["Value"][0] for row in one] == ["CT"]

    mr_instances = run(stack, Level.INSTANCE, ("SOPClassUID", MR))
    assert {row["00080018"]["Value"][0] for row in mr_instances} == set(a.instances[2:])
    single = run(stack, Level.INSTANCE, ("SOPInstanceUID", b.instances[1]))
    assert [row["00080016"]["Value"][0] for row in single] == [CT]
    in_series = run(stack, Level.INSTANCE, StudyInstanceUID=a.study, SeriesInstanceUID=a.series[0])
    assert [row["00080018"]["Value"][0] for row in in_series] == a.instances[:2]


def test_counts_includefield_limit_and_offset(held: tuple[IngestStack, dict[str, Held]]) -> None:
    stack, _ = held
    every = run(stack, Level.STUDY)
    assert len(every) == 3
    first = every[0]
    assert first["00201206"]["Value"] == [2]  # NumberOfStudyRelatedSeries of A
    assert first["00201208"]["Value"] == [4]  # NumberOfStudyRelatedInstances
    assert first["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
    assert first["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}
    assert "00080020" in first
    page = run(stack, Level.STUDY, ("limit", "1"), ("offset", "1"))
    assert [row["0020000D"] for row in page] == [every[1]["0020000D"]]
    assert run(stack, Level.STUDY, ("offset", "3")) == []
    with_series = run(stack, Level.INSTANCE, ("includefield", "SeriesDescription,Modality"))
    assert all("00080060" in row for row in with_series)


@pytest.mark.parametrize(
    "params",
    [
        [("NoSuchKeyword", "1")],
        [("PatientBirthDate", "19700101")],  # a real attribute the index does not keep
        [("limit", "ten")],
        [("StudyDate", "2024-01-01-2024-02-01")],
        [("Modality", "CT")],  # a series attribute in a study search
    ],
)
def test_queries_we_cannot_answer_say_why(params: list[tuple[str, str]]) -> None:
    with pytest.raises(QueryError):
        parse_query(Level.STUDY, params)
