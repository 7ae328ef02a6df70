"""DICOMweb routes under ``/dicom-web``: STOW-RS (PS3.18 10.5), QIDO-RS (10.6) and WADO-RS
(10.4).

The body is read piece by piece as it arrives and each piece handed to a worker thread that
parses it and writes the spool (``triage.dicomweb.stow``); the event loop only moves bytes.
A body declared or found larger than ``dicomweb_max_request_bytes`` (inflated size, where
the body is gzip- or deflate-encoded) is answered 413 without reading on; a body that
arrives too slowly (``dicomweb_timeout_seconds``, ``dicomweb_min_bytes_per_second``) 408.
Both close the connection. The end of a request that stored instances counts as the end of
an association for study completion.
"""

from __future__ import annotations

import logging
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Annotated

import anyio
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from triage.api.deps import DbSession, ReadCaller, StoreCaller
from triage.api.results import results_dir
from triage.config import Settings
from triage.dicom.uids import is_valid_uid
from triage.dicomweb.qido import Level, QueryError, parse_query, search
from triage.dicomweb.render import MEDIA_TYPES, RenderError, parse_window, render
from triage.dicomweb.stow import (
    DICOM,
    StowRequest,
    StowSyntaxError,
    media_type,
    response_body,
)
from triage.dicomweb.wado import (
    Held,
    NotAcceptable,
    NotFound,
    accepted_syntaxes,
    bulk_value,
    check_syntaxes,
    frames,
    instances,
    metadata,
    multipart_frames,
    multipart_instances,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"
INFLATE_PIECE = 1 << 20
"""The most one step of inflating a compressed body produces."""

StudyUid = Annotated[str, Path(description="Study Instance UID the instances must belong to.")]


class _Refused(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def _error(status_code: int, message: str, *, close: bool = False) -> JSONResponse:
    """A refused request: logged, answered with its reason."""
    log.warning("DICOMweb request refused: %s", message, extra={"status": status_code})
    headers = {"Connection": "close"} if close else None
    return JSONResponse({"detail": message}, status_code=status_code, headers=headers)


_STORE_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"description": "Every instance stored (Store Instances Response, DICOM JSON)."},
    202: {"description": "Some stored; the Failed SOP Sequence names the others and why."},
    400: {"description": "The body is not a multipart/related message we can read."},
    408: {"description": "The body arrived too slowly."},
    409: {"description": "No instance stored; the Failed SOP Sequence says why for each."},
    413: {"description": "The body is larger than dicomweb_max_request_bytes."},
    415: {"description": 'Not multipart/related; type="application/dicom".'},
}


@router.post("/studies", responses=_STORE_RESPONSES, response_class=Response)
async def store_instances(request: Request, caller: StoreCaller) -> Response:
    """STOW-RS: store the instances of a multipart/related body (any studies)."""
    return await _store(request, caller.name, None)


@router.post("/studies/{study}", responses=_STORE_RESPONSES, response_class=Response)
async def store_study_instances(request: Request, caller: StoreCaller, study: StudyUid) -> Response:
    """STOW-RS: store the instances of a multipart/related body, all of study ``study``."""
    if not is_valid_uid(study):
        return _error(400, "the study in the path is not a valid UID")
    return await _store(request, caller.name, study)


def _root(request: Request) -> str:
    """The DICOMweb root clients reach us at, for Retrieve URLs: ``public_url`` when set (a
    proxy, a name in a certificate), else what the request was sent to (its Host header)."""
    settings: Settings = request.app.state.settings
    base = settings.public_url.rstrip("/") if settings.public_url else str(request.base_url)
    return base.rstrip("/") + "/dicom-web"


async def _store(request: Request, caller: str, study_uid: str | None) -> Response:
    settings: Settings = request.app.state.settings
    ingestor = request.app.state.ingestor
    if ingestor is None:
        return _error(503, "this server does not take instances over HTTP")
    kind, params = media_type(request.headers.get("content-type", ""))
    if kind != "multipart/related" or params.get("type", DICOM).lower() != DICOM:
        return _error(415, f'send multipart/related; type="{DICOM}" (got {kind or "nothing"})')
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):
        return _error(415, f"Content-Encoding {encoding} is not supported (gzip, deflate)")
    limit = settings.dicomweb_max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return _error(413, f"the body is over the {limit}-byte limit", close=True)
    try:
        stow = StowRequest(
            ingestor=ingestor,
            session_factory=request.app.state.session_factory,
            boundary=params.get("boundary", ""),
            study_uid=study_uid,
            caller=caller,
            address=request.client.host if request.client else None,
        )
    except StowSyntaxError as exc:
        return _error(400, str(exc))
    try:
        async for piece in _body(request, settings, encoding):
            await run_in_threadpool(stow.feed, piece)
    except _Refused as refused:
        await run_in_threadpool(stow.abort)
        return _error(refused.status_code, refused.message, close=True)
    except BaseException:
        await run_in_threadpool(stow.abort)  # client gone: nothing of the part in progress kept
        raise
    result = await run_in_threadpool(stow.finish)
    if result.studies:
        on_end: Callable[[set[str]], None] | None = request.app.state.on_request_end
        if on_end is not None:
            on_end(result.studies)
    log.info(
        "STOW-RS request",
        extra={
            "caller": caller,
            "stored": len(result.stored),
            "failed": len(result.failed),
            "study_uid": study_uid,
        },
    )
    code = result.http_status()
    if code == 400 and not result.failed:
        return _error(400, result.syntax_error or "no instance in the body")
    body = response_body(result, _root(request), study_uid)
    return JSONResponse(body, status_code=code, media_type=DICOM_JSON)


async def _body(request: Request, settings: Settings, encoding: str) -> AsyncIterator[bytes]:
    """The body's pieces, inflated, within the size, time and rate limits (_Refused)."""
    limit = settings.dicomweb_max_request_bytes
    timeout = settings.dicomweb_timeout_seconds
    started = time.monotonic()
    received = produced = 0
    inflater = (
        zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        if encoding != "identity"
        else None
    )
    pieces = request.stream().__aiter__()
    while True:
        try:
            with anyio.fail_after(timeout):
                piece = await pieces.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise _Refused(408, f"no data for {timeout:g} s") from None
        received += len(piece)
        elapsed = time.monotonic() - started
        if elapsed > timeout and received < elapsed * settings.dicomweb_min_bytes_per_second:
            raise _Refused(408, "the body arrives too slowly") from None
        if inflater is None:
            if received > limit:
                raise _Refused(413, f"the body is over the {limit}-byte limit")
            if piece:
                yield piece
            continue
        pending = piece
        while pending:
            try:
                out = inflater.decompress(pending, INFLATE_PIECE)
            except zlib.error:
                raise _Refused(400, f"the body is not valid {encoding} data") from None
            pending = inflater.unconsumed_tail
            produced += len(out)
            if produced > limit:
                raise _Refused(413, f"the inflated body is over the {limit}-byte limit")
            if out:
                yield out
    if inflater is not None:
        rest = inflater.flush()
        produced += len(rest)
        if produced > limit:
            raise _Refused(413, f"the inflated body is over the {limit}-byte limit")
        if rest:
            yield rest


# -- QIDO-RS -------------------------------------------------------------------------------------

SeriesUid = Annotated[str, Path(description="Series Instance UID.")]
_SEARCH_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": "The matches, DICOM JSON (application/dicom+json), possibly none.",
        "content": {DICOM_JSON: {"schema": {"type": "array", "items": {"type": "object"}}}},
    },
    400: {"description": "A query key that is not an attribute we index, or a bad value."},
}


def _search(request: Request, session: Session, level: Level, fixed: dict[str, str]) -> Response:
    for uid in fixed.values():
        if not is_valid_uid(uid):
            return _error(400, f"{uid!r} in the path is not a valid UID")
    try:
        query = parse_query(level, list(request.query_params.multi_items()), fixed=fixed)
    except QueryError as exc:
        return _error(400, str(exc))
    base = _root(request)

    def retrieve_url(uids: dict[str, str]) -> str:
        url = f"{base}/studies/{uids['study']}"
        if level is not Level.STUDY:
            url += f"/series/{uids['series']}"
        if level is Level.INSTANCE:
            url += f"/instances/{uids['instance']}"
        return url

    return JSONResponse(search(session, query, retrieve_url), media_type=DICOM_JSON)


@router.get("/studies", responses=_SEARCH_RESPONSES, response_class=Response)
def search_studies(request: Request, caller: ReadCaller, session: DbSession) -> Response:
    """QIDO-RS: search for studies."""
    return _search(request, session, Level.STUDY, {})


@router.get("/series", responses=_SEARCH_RESPONSES, response_class=Response)
def search_series(request: Request, caller: ReadCaller, session: DbSession) -> Response:
    """QIDO-RS: search for series, in any study."""
    return _search(request, session, Level.SERIES, {})


@router.get("/instances", responses=_SEARCH_RESPONSES, response_class=Response)
def search_instances(request: Request, caller: ReadCaller, session: DbSession) -> Response:
    """QIDO-RS: search for instances, in any study."""
    return _search(request, session, Level.INSTANCE, {})


@router.get("/studies/{study}/series", responses=_SEARCH_RESPONSES, response_class=Response)
def search_study_series(
    request: Request, caller: ReadCaller, session: DbSession, study: StudyUid
) -> Response:
    """QIDO-RS: search for the series of a study."""
    return _search(request, session, Level.SERIES, {"StudyInstanceUID": study})


@router.get("/studies/{study}/instances", responses=_SEARCH_RESPONSES, response_class=Response)
def search_study_instances(
    request: Request, caller: ReadCaller, session: DbSession, study: StudyUid
) -> Response:
    """QIDO-RS: search for the instances of a study."""
    return _search(request, session, Level.INSTANCE, {"StudyInstanceUID": study})


@router.get(
    "/studies/{study}/series/{series}/instances",
    responses=_SEARCH_RESPONSES,
    response_class=Response,
)
def search_series_instances(
    request: Request, caller: ReadCaller, session: DbSession, study: StudyUid, series: SeriesUid
) -> Response:
    """QIDO-RS: search for the instances of a series."""
    fixed = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
    return _search(request, session, Level.INSTANCE, fixed)


# -- WADO-RS -------------------------------------------------------------------------------------

InstanceUid = Annotated[str, Path(description="SOP Instance UID.")]
BulkTag = Annotated[
    str, Path(description="The attribute's tag, 8 hex digits.", pattern="^[0-9A-Fa-f]{8}$")
]
_RETRIEVE_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": 'The instances as stored, multipart/related; type="application/dicom".',
        "content": {"multipart/related": {}},
    },
    404: {"description": "Nothing held under these UIDs."},
    406: {"description": "The Accept header takes none of the transfer syntaxes held."},
}
_METADATA_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": "DICOM JSON of each instance, bulk data by reference.",
        "content": {DICOM_JSON: {"schema": {"type": "array", "items": {"type": "object"}}}},
    },
    404: {"description": "Nothing held under these UIDs."},
}


def _held(
    request: Request, session: Session, study: str, series: str | None, instance: str | None
) -> list[Held]:
    for uid in filter(None, (study, series, instance)):
        if not is_valid_uid(uid):
            raise _Refused(400, f"{uid!r} in the path is not a valid UID")
    try:
        settings: Settings = request.app.state.settings
        where = results_dir(settings)
        return instances(session, request.app.state.spool, where, study, series, instance)
    except NotFound as exc:
        raise _Refused(404, str(exc)) from None


def _retrieve(
    request: Request, session: Session, study: str, series: str | None, instance: str | None
) -> Response:
    try:
        held = _held(request, session, study, series, instance)
        syntaxes = accepted_syntaxes(request.headers.get("accept", ""), DICOM)
        check_syntaxes(held, syntaxes)
    except _Refused as refused:
        return _error(refused.status_code, refused.message)
    except NotAcceptable as exc:
        return _error(406, str(exc))
    boundary = uuid.uuid4().hex
    return StreamingResponse(
        multipart_instances(held, boundary),
        media_type=f'multipart/related; type="{DICOM}"; boundary={boundary}',
    )


def _metadata(
    request: Request, session: Session, study: str, series: str | None, instance: str | None
) -> Response:
    try:
        held = _held(request, session, study, series, instance)
    except _Refused as refused:
        return _error(refused.status_code, refused.message)
    base = _root(request)
    body = [
        metadata(
            item,
            f"{base}/studies/{item.study_uid}/series/{item.series_uid}"
            f"/instances/{item.sop_instance_uid}",
        )
        for item in held
    ]
    return JSONResponse(body, media_type=DICOM_JSON)


@router.get("/studies/{study}", responses=_RETRIEVE_RESPONSES, response_class=Response)
def retrieve_study(
    request: Request, caller: ReadCaller, session: DbSession, study: StudyUid
) -> Response:
    """WADO-RS: every instance of a study, as stored."""
    return _retrieve(request, session, study, None, None)


@router.get(
    "/studies/{study}/series/{series}", responses=_RETRIEVE_RESPONSES, response_class=Response
)
def retrieve_series(
    request: Request, caller: ReadCaller, session: DbSession, study: StudyUid, series: SeriesUid
) -> Response:
    """WADO-RS: every instance of a series, as stored."""
    return _retrieve(request, session, study, series, None)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}",
    responses=_RETRIEVE_RESPONSES,
    response_class=Response,
)
def retrieve_instance(
    request: Request,
    caller: ReadCaller,
    session: DbSession,
    study: StudyUid,
    series: SeriesUid,
    instance: InstanceUid,
) -> Response:
    """WADO-RS: one instance, as stored."""
    return _retrieve(request, session, study, series, instance)


@router.get("/studies/{study}/metadata", responses=_METADATA_RESPONSES, response_class=Response)
def study_metadata(
    request: Request, caller: ReadCaller, session: DbSession, study: StudyUid
) -> Response:
    """WADO-RS: the metadata of every instance of a study."""
    return _metadata(request, session, study, None, None)


@router.get(
    "/studies/{study}/series/{series}/metadata",
    responses=_METADATA_RESPONSES,
    response_class=Response,
)
def series_metadata(
    request: Request, caller: ReadCaller, session: DbSession, study: StudyUid, series: SeriesUid
) -> Response:
    """WADO-RS: the metadata of every instance of a series."""
    return _metadata(request, session, study, series, None)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    responses=_METADATA_RESPONSES,
    response_class=Response,
)
def instance_metadata(
    request: Request,
    caller: ReadCaller,
    session: DbSession,
    study: StudyUid,
    series: SeriesUid,
    instance: InstanceUid,
) -> Response:
    """WADO-RS: the metadata of one instance."""
    return _metadata(request, session, study, series, instance)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{numbers}",
    responses={200: {"description": "The frames, multipart/related."}, 404: {}},
    response_class=Response,
)
def retrieve_frames(
    request: Request,
    caller: ReadCaller,
    session: DbSession,
    study: StudyUid,
    series: SeriesUid,
    instance: InstanceUid,
    numbers: Annotated[str, Path(description="Frame numbers from 1, comma-separated.")],
) -> Response:
    """WADO-RS: frames of one instance, as stored (uncompressed, or their compressed bytes)."""
    try:
        wanted = [int(number) for number in numbers.split(",")]
    except ValueError:
        return _error(400, "frames are numbers from 1, comma-separated")
    try:
        (held,) = _held(request, session, study, series, instance)
        media_type, parts = frames(held, wanted)
    except _Refused as refused:
        return _error(refused.status_code, refused.message)
    except NotFound as exc:
        return _error(404, str(exc))
    boundary = uuid.uuid4().hex
    body = multipart_frames(media_type, held.transfer_syntax_uid, parts, boundary)
    return Response(body, media_type=f'multipart/related; type="{media_type}"; boundary={boundary}')


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}",
    responses={200: {"description": "One binary value, application/octet-stream."}, 404: {}},
    response_class=Response,
)
def retrieve_bulkdata(
    request: Request,
    caller: ReadCaller,
    session: DbSession,
    study: StudyUid,
    series: SeriesUid,
    instance: InstanceUid,
    tag: Annotated[
        str, Path(description="The attribute's tag, 8 hex digits.", pattern="^[0-9A-Fa-f]{8}$")
    ],
) -> Response:
    """WADO-RS: a binary value of one instance that its metadata gave by reference."""
    try:
        (held,) = _held(request, session, study, series, instance)
        value = bulk_value(held, int(tag, 16))
    except _Refused as refused:
        return _error(refused.status_code, refused.message)
    except NotFound as exc:
        return _error(404, str(exc))
    boundary = uuid.uuid4().hex
    body = multipart_frames("application/octet-stream", held.transfer_syntax_uid, [value], boundary)
    return Response(
        body, media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}'
    )


def _rendered(
    request: Request,
    session: Session,
    ids: tuple[str, str, str],
    frame: int,
    window: str | None,
) -> Response:
    accept = request.headers.get("accept", "")
    wanted = [part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()]
    choice = next(
        (kind for kind in wanted if kind in MEDIA_TYPES),
        "image/png" if not wanted or "*/*" in wanted or "image/*" in wanted else None,
    )
    if choice is None:
        return _error(406, "rendered frames are image/png or image/jpeg")
    try:
        (held,) = _held(request, session, *ids)
        body = render(held.path, frame, choice, parse_window(window))
    except _Refused as refused:
        return _error(refused.status_code, refused.message)
    except RenderError as exc:
        return _error(400, str(exc))
    return Response(body, media_type=choice)


WindowParam = Annotated[
    str | None,
    Query(description="center,width[,linear]: the VOI window (else the instance's own)."),
]
_RENDERED_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"description": "The frame as an 8-bit image.", "content": {"image/png": {}}},
    400: {"description": "A bad window, or a frame that cannot be decoded."},
    404: {"description": "Nothing held under these UIDs."},
}


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered",
    responses=_RENDERED_RESPONSES,
    response_class=Response,
)
def rendered_instance(
    request: Request,
    caller: ReadCaller,
    session: DbSession,
    study: StudyUid,
    series: SeriesUid,
    instance: InstanceUid,
    window: WindowParam = None,
) -> Response:
    """WADO-RS: the instance's first frame rendered (PNG or JPEG), for thumbnails."""
    return _rendered(request, session, (study, series, instance), 1, window)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
    responses=_RENDERED_RESPONSES,
    response_class=Response,
)
def rendered_frame(
    request: Request,
    caller: ReadCaller,
    session: DbSession,
    study: StudyUid,
    series: SeriesUid,
    instance: InstanceUid,
    frame: Annotated[int, Path(ge=1, description="The frame number, from 1.")],
    window: WindowParam = None,
) -> Response:
    """WADO-RS: one frame rendered (PNG or JPEG)."""
    return _rendered(request, session, (study, series, instance), frame, window)
