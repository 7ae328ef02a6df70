"""Result files over HTTP, for workers that do not see the data directory
(``worker_images = "dicomweb"``): a worker hands back each SEG and SR it built
(``PUT /api/results/{file_id}``) before it records the row, and a worker that delivers one
fetches it (``GET``). Tokens of role worker or admin."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from triage.api.deps import WorkerCaller
from triage.config import Settings
from triage.dicom.header import parse_header
from triage.errors import DicomInputError
from triage.storage.spool import write_durably

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/results", tags=["workers"])

FileId = Annotated[str, PathParam(pattern="^[0-9a-f]{32}$", description="The result's file id.")]
MAX_RESULT_BYTES = 1 << 30
"""The largest result file taken (a SEG of a very large volume stays far below)."""
MAX_KEY_IMAGE_BYTES = 16 << 20


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def results_dir(settings: Settings) -> Path:
    return settings.data_dir / "results"


async def _keep(directory: Path, name: str, data: bytes) -> None:
    """Write ``directory/name`` durably (through ``directory/tmp``), off the event loop."""
    temporary = directory / "tmp" / f"{Path(name).stem}.part"
    temporary.parent.mkdir(parents=True, exist_ok=True)
    await run_in_threadpool(write_durably, directory / name, data, temporary=temporary)


def key_images_dir(settings: Settings) -> Path:
    """Where the key images (PNG previews of positive findings) are kept."""
    return settings.data_dir / "results" / "key-images"


@router.put(
    "/key-images/{file_id}",
    status_code=204,
    response_class=Response,
    responses={400: {"description": "Not a PNG image."}, 413: {"description": "Too large."}},
)
async def put_key_image(request: Request, caller: WorkerCaller, file_id: FileId) -> Response:
    """Keep a key image a worker rendered (durable before the answer)."""
    data = await request.body()
    if len(data) > MAX_KEY_IMAGE_BYTES:
        return JSONResponse({"detail": "key image too large"}, status_code=413)
    if not data.startswith(PNG_SIGNATURE):
        return JSONResponse({"detail": "not a PNG image"}, status_code=400)
    await _keep(key_images_dir(request.app.state.settings), f"{file_id}.png", data)
    return Response(status_code=204)


@router.put(
    "/{file_id}",
    status_code=204,
    response_class=Response,
    responses={400: {"description": "Not a DICOM file."}, 413: {"description": "Too large."}},
)
async def put_result(request: Request, caller: WorkerCaller, file_id: FileId) -> Response:
    """Keep a result file (durable before the answer); sending it again replaces it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_RESULT_BYTES:
        return JSONResponse({"detail": "result file too large"}, status_code=413)
    data = await request.body()
    if len(data) > MAX_RESULT_BYTES:
        return JSONResponse({"detail": "result file too large"}, status_code=413)
    try:
        parse_header(data)
    except DicomInputError as exc:
        return JSONResponse({"detail": f"not a DICOM file: {exc}"}, status_code=400)
    await _keep(results_dir(request.app.state.settings), f"{file_id}.dcm", data)
    log.info("result file received", extra={"file_id": file_id, "caller": caller.name})
    return Response(status_code=204)


@router.get(
    "/{file_id}",
    response_class=FileResponse,
    responses={200: {"content": {"application/dicom": {}}}, 404: {"description": "No such file."}},
)
def get_result(request: Request, caller: WorkerCaller, file_id: FileId) -> Response:
    """A result file, as kept."""
    path = results_dir(request.app.state.settings) / f"{file_id}.dcm"
    if not path.is_file():
        return JSONResponse({"detail": "no such result file"}, status_code=404)
    return FileResponse(path, media_type="application/dicom")
