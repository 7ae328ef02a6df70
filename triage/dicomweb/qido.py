"""QIDO-RS, PS3.18 10.6: search the studies, series and instances triage holds.

Query keys name an attribute by keyword (``PatientID``) or tag (``00100020``); matching is PS3.4
C.2.2.2's for the attributes the index keeps: single value (exact; PatientName also without
regard to case, as C.2.2.2.1 allows for PN), wildcards ``*`` and ``?`` for strings, UID lists
(``\\``- or comma-separated) for UIDs, and ranges (``20240101-20240131``, ``-0800``,
``1200-``) for dates and times. ``includefield`` (attributes or ``all``), ``limit`` and
``offset`` page the answer, ordered as stored. Answers are DICOM JSON (PS3.18 F.2).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import ColumnElement, Select, and_, case, func, literal, null, or_, select
from sqlalchemy.orm import Session

from triage.db.models import Instance, Job, ResultObject, Series, Study
from triage.domain import InstanceState, ResultKind


class Level(enum.StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


class QueryError(ValueError):
    """A query key or value we cannot use (answered 400 with this message)."""


@dataclass(frozen=True)
class Attribute:
    tag: int
    level: Level
    column: Any  # an ORM column, or None for a value computed per result
    vr: str

    @property
    def keyword(self) -> str:
        return keyword_for_tag(self.tag)

    @property
    def key(self) -> str:
        return f"{self.tag:08X}"


def _attribute(keyword: str, level: Level, column: Any) -> Attribute:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return Attribute(tag, level, column, dictionary_VR(tag))


# The attributes the index keeps, and so can match and return.
ATTRIBUTES = {
    attribute.tag: attribute
    for attribute in (
        _attribute("StudyInstanceUID", Level.STUDY, Study.study_uid),
        _attribute("PatientName", Level.STUDY, Study.patient_name),
        _attribute("PatientID", Level.STUDY, Study.patient_id),
        _attribute("AccessionNumber", Level.STUDY, Study.accession_number),
        _attribute("StudyDate", Level.STUDY, Study.study_date),
        _attribute("StudyTime", Level.STUDY, Study.study_time),
        _attribute("StudyDescription", Level.STUDY, Study.study_description),
        _attribute("ModalitiesInStudy", Level.STUDY, Study.modalities),
        _attribute("NumberOfStudyRelatedSeries", Level.STUDY, None),
        _attribute("NumberOfStudyRelatedInstances", Level.STUDY, None),
        _attribute("SeriesInstanceUID", Level.SERIES, Series.series_uid),
        _attribute("Modality", Level.SERIES, Series.modality),
        _attribute("SeriesDescription", Level.SERIES, Series.series_description),
        _attribute("SeriesNumber", Level.SERIES, Series.series_number),
        _attribute("BodyPartExamined", Level.SERIES, Series.body_part),
        _attribute("NumberOfSeriesRelatedInstances", Level.SERIES, None),
        _attribute("SOPInstanceUID", Level.INSTANCE, Instance.sop_instance_uid),
        _attribute("SOPClassUID", Level.INSTANCE, Instance.sop_class_uid),
        _attribute("InstanceNumber", Level.INSTANCE, Instance.instance_number),
    )
}
_BY_KEYWORD = {attribute.keyword: attribute for attribute in ATTRIBUTES.values()}

# What each level returns without includefield (PS3.18 10.6.3.3, of what the index keeps).
_DEFAULT = {
    Level.STUDY: [
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "PatientName",
        "PatientID",
        "StudyInstanceUID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ],
    Level.SERIES: [
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
    ],
    Level.INSTANCE: ["SOPClassUID", "SOPInstanceUID", "InstanceNumber"],
}
_LEVELS = (Level.STUDY, Level.SERIES, Level.INSTANCE)
_CONTROL = {"includefield", "limit", "offset", "fuzzymatching"}
MAX_LIMIT = 1000
"""The most results one answer holds; a larger ``limit`` is lowered to it."""
_UID_LIST = re.compile(r"[\\,]")
_RANGE = re.compile(r"^(\d*)-(\d*)$")


def attribute_for(name: str) -> Attribute:
    """The indexed attribute a query key names (keyword or 8 hex digits)."""
    hex_tag = re.fullmatch(r"[0-9A-Fa-f]{8}", name)
    tag = int(name, 16) if hex_tag else tag_for_keyword(name)
    if tag is None:
        raise QueryError(f"{name!r} is not a DICOM attribute keyword or tag")
    attribute = ATTRIBUTES.get(tag)
    if attribute is None:
        raise QueryError(f"{name} cannot be searched here (not kept in the index)")
    return attribute


@dataclass(frozen=True)
class Query:
    level: Level
    filters: list[tuple[Attribute, str]]
    """(attribute, value) pairs every match must satisfy."""
    returned: list[Attribute]
    limit: int
    offset: int


def parse_query(
    level: Level, params: Sequence[tuple[str, str]], *, fixed: Mapping[str, str] | None = None
) -> Query:
    """A QIDO-RS query from its URL parameters; ``fixed`` holds the UIDs of the resource path
    (``StudyInstanceUID``, ``SeriesInstanceUID``). Raises QueryError."""
    filters: list[tuple[Attribute, str]] = []
    included: list[Attribute] = []
    include_all = False
    limit, offset = MAX_LIMIT, 0
    depth = _LEVELS.index(level)
    for keyword, value in (fixed or {}).items():
        filters.append((_BY_KEYWORD[keyword], value))
    for name, value in params:
        if name == "includefield":
            for item in filter(None, (part.strip() for part in value.split(","))):
                if item == "all":
                    include_all = True
                else:
                    included.append(attribute_for(item))
            continue
        if name in ("limit", "offset"):
            if not value.isdigit():
                raise QueryError(f"{name} must be a whole number")
            if name == "limit":
                limit = min(int(value), MAX_LIMIT)
            else:
                offset = int(value)
            continue
        if name == "fuzzymatching":
            continue  # not offered: literal matching, as PS3.18 allows
        attribute = attribute_for(name)
        if _LEVELS.index(attribute.level) > depth:
            raise QueryError(f"{attribute.keyword} is below the {level} level of this search")
        if attribute.column is None:
            raise QueryError(f"{attribute.keyword} is returned, not matched")
        if value:  # an empty value is universal matching: asks for the attribute back
            _match(attribute.column, attribute, value)  # raises QueryError for a bad value
            filters.append((attribute, value))
        included.append(attribute)
    returned = [
        _BY_KEYWORD[keyword] for level_ in _LEVELS[: depth + 1] for keyword in _DEFAULT[level_]
    ]
    if include_all:
        returned = [a for a in ATTRIBUTES.values() if _LEVELS.index(a.level) <= depth]
    for attribute in included:
        if attribute not in returned and _LEVELS.index(attribute.level) <= depth:
            returned.append(attribute)
    return Query(level, filters, returned, limit, offset)


def _like(pattern: str) -> str:
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _match(column: ColumnElement[Any], attribute: Attribute, value: str) -> ColumnElement[bool]:
    vr = attribute.vr
    if vr == "UI":
        uids = [uid.strip() for uid in _UID_LIST.split(value) if uid.strip()]
        return column.in_(uids) if len(uids) > 1 else column == uids[0]
    if vr in ("DA", "TM", "DT"):
        return _range(column, attribute, value)
    if vr in ("IS", "US", "UL", "SS", "SL"):
        try:
            return column == int(value)
        except ValueError:
            raise QueryError(f"{attribute.keyword} takes a number") from None
    if attribute.keyword == "ModalitiesInStudy":
        # Any of the study's modalities: stored as CT\MR.
        wanted = [part for part in _UID_LIST.split(value) if part]
        return or_(*(_in_list(column, modality) for modality in wanted))
    wildcard = "*" in value or "?" in value
    if vr == "PN":
        target = func.lower(column)
        if wildcard:
            return target.like(_like(value.lower()), escape="\\")
        return target == value.lower()
    if wildcard:
        return column.like(_like(value), escape="\\")
    return column == value


def _in_list(column: Any, item: str) -> ColumnElement[bool]:
    escaped = _like(item)
    return or_(
        column == item,
        column.like(f"{escaped}\\\\%", escape="\\"),
        column.like(f"%\\\\{escaped}", escape="\\"),
        column.like(f"%\\\\{escaped}\\\\%", escape="\\"),
    )


def _range(column: ColumnElement[Any], attribute: Attribute, value: str) -> ColumnElement[bool]:
    """Dates and times as stored (DA YYYYMMDD, TM HHMMSS.FFFFFF: compared as text, which
    orders them as time does); a time range's upper bound is padded with 9s to full precision."""
    compact = value.replace(":", "").replace(" ", "")
    match = _RANGE.match(compact)
    if match is None:
        if not re.fullmatch(r"\d+(\.\d+)?", compact):
            raise QueryError(f"{attribute.keyword} takes a value or a range like 20240101-20240131")
        if attribute.vr == "TM":
            return column.like(f"{compact}%")
        return column == compact
    low, high = match.groups()
    if not low and not high:
        raise QueryError(f"{attribute.keyword}: a range needs at least one bound")
    conditions: list[ColumnElement[bool]] = [column.is_not(None)]
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= (high.ljust(13, "9") if attribute.vr == "TM" else high))
    return and_(*conditions)


def _element(attribute: Attribute, value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if attribute.vr == "PN":
        return {"vr": "PN", "Value": [{"Alphabetic": str(value)}]}
    if attribute.vr in ("IS", "US", "UL", "SS", "SL"):
        return {"vr": attribute.vr, "Value": [int(value)]}
    if attribute.keyword == "ModalitiesInStudy":
        return {"vr": "CS", "Value": str(value).split("\\")}
    return {"vr": attribute.vr, "Value": [str(value)]}


def search(
    session: Session, query: Query, retrieve_url: Callable[[dict[str, str]], str]
) -> list[dict[str, Any]]:
    """The matches of ``query`` as DICOM JSON objects, ``retrieve_url`` given the UIDs of each."""
    statement = _statement(query)
    rows = session.execute(statement).mappings().all()
    answers = []
    for row in rows:
        body: dict[str, Any] = {}
        for attribute in query.returned:
            element = _element(attribute, row.get(attribute.key))
            if element is not None:
                body[attribute.key] = element
        uids = {
            "study": row[f"{tag_for_keyword('StudyInstanceUID'):08X}"],
            "series": row.get(f"{tag_for_keyword('SeriesInstanceUID'):08X}"),
            "instance": row.get(f"{tag_for_keyword('SOPInstanceUID'):08X}"),
        }
        body["00081190"] = {"vr": "UR", "Value": [retrieve_url(uids)]}
        answers.append(dict(sorted(body.items())))
    return answers


def _statement(query: Query) -> Select[Any]:
    """Images and triage's own results (each SEG and SR a series of its study) in one
    statement, matched alike, in the order received, results after the images."""
    if query.level is Level.STUDY:
        columns = _study_columns()
        order = [Study.id]
        statement = select(*columns).select_from(Study)
        statement = statement.where(*_conditions(query, lambda a: a.column))
        return statement.order_by(*order).limit(query.limit).offset(query.offset)
    images = _images(query)
    results = _results(query)
    union = images.union_all(results).subquery()
    return (
        select(*[column for column in union.c if not column.name.startswith("_")])
        .order_by(union.c._study, union.c._kind, union.c._series, union.c._instance)
        .limit(query.limit)
        .offset(query.offset)
    )


_STORED = Instance.state == InstanceState.STORED
_RESULT_MODALITY = case(
    (ResultObject.kind == ResultKind.SEG, "SEG"),
    (ResultObject.kind == ResultKind.SR, "SR"),
    else_="KO",
)
_RESULT_COLUMNS: dict[str, Any] = {
    "SeriesInstanceUID": ResultObject.series_uid,
    "Modality": _RESULT_MODALITY,
    "SeriesDescription": null(),
    "SeriesNumber": null(),
    "BodyPartExamined": null(),
    "SOPInstanceUID": ResultObject.sop_instance_uid,
    "SOPClassUID": ResultObject.sop_class_uid,
    "InstanceNumber": literal(1),
}


def _study_columns() -> list[Any]:
    study_results = select(ResultObject.id).join(Job, ResultObject.job_id == Job.id)
    study_results = study_results.where(Job.study_id == Study.id)
    return [
        *_study_attribute_columns(),
        (
            select(func.count(Series.id)).where(Series.study_id == Study.id).scalar_subquery()
            + select(func.count(func.distinct(ResultObject.series_uid)))
            .join(Job, ResultObject.job_id == Job.id)
            .where(Job.study_id == Study.id)
            .scalar_subquery()
        ).label(_key("NumberOfStudyRelatedSeries")),
        (
            select(func.count(Instance.id))
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == Study.id, _STORED)
            .scalar_subquery()
            + select(func.count()).select_from(study_results.subquery()).scalar_subquery()
        ).label(_key("NumberOfStudyRelatedInstances")),
    ]


def _conditions(query: Query, column_of: Callable[[Attribute], Any]) -> list[ColumnElement[bool]]:
    return [_match(column_of(attribute), attribute, value) for attribute, value in query.filters]


def _branch_columns(query: Query, column_of: Callable[[Attribute], Any]) -> list[Any]:
    depth = _LEVELS.index(query.level)
    return [
        column_of(attribute).label(attribute.key)
        for attribute in ATTRIBUTES.values()
        if attribute.column is not None and 0 < _LEVELS.index(attribute.level) <= depth
    ]


def _study_attribute_columns() -> list[Any]:
    return [
        attribute.column.label(attribute.key)
        for attribute in ATTRIBUTES.values()
        if attribute.level is Level.STUDY and attribute.column is not None
    ]


def _images(query: Query) -> Select[Any]:
    columns = [
        *(
            a.column.label(a.key)
            for a in ATTRIBUTES.values()
            if a.level is Level.STUDY and a.column is not None
        ),
        *_branch_columns(query, lambda a: a.column),
    ]
    statement = select(*columns).select_from(Study).join(Series, Series.study_id == Study.id)
    sort: list[Any] = [
        Study.id.label("_study"),
        literal(0).label("_kind"),
        Series.id.label("_series"),
    ]
    if query.level is Level.SERIES:
        columns_count = (
            select(func.count(Instance.id))
            .where(Instance.series_id == Series.id, _STORED)
            .scalar_subquery()
            .label(_key("NumberOfSeriesRelatedInstances"))
        )
        statement = statement.add_columns(columns_count)
        sort.append(literal(0).label("_instance"))
    else:
        statement = statement.join(Instance, Instance.series_id == Series.id).where(_STORED)
        sort.append(Instance.id.label("_instance"))
    statement = statement.add_columns(*sort)
    return statement.where(*_conditions(query, lambda a: a.column))


def _results(query: Query) -> Select[Any]:
    def column_of(attribute: Attribute) -> Any:
        if attribute.level is Level.STUDY:
            return attribute.column
        return _RESULT_COLUMNS[attribute.keyword]

    columns = [
        *(
            a.column.label(a.key)
            for a in ATTRIBUTES.values()
            if a.level is Level.STUDY and a.column is not None
        ),
        *_branch_columns(query, column_of),
    ]
    statement = (
        select(*columns)
        .select_from(Study)
        .join(Job, Job.study_id == Study.id)
        .join(ResultObject, ResultObject.job_id == Job.id)
    )
    if query.level is Level.SERIES:
        statement = statement.add_columns(literal(1).label(_key("NumberOfSeriesRelatedInstances")))
    statement = statement.add_columns(
        Study.id.label("_study"),
        literal(1).label("_kind"),
        ResultObject.id.label("_series"),
        ResultObject.id.label("_instance"),
    )
    return statement.where(*_conditions(query, column_of))


def _key(keyword: str) -> str:
    return f"{tag_for_keyword(keyword):08X}"
