"""Where a worker finds images and leaves results (``worker_images``).

``shared-disk`` (the default, one host or shared storage): the spool and ``results/`` of
``data_dir``, as triage serve sees them. ``dicomweb`` (a worker on a machine that does not
see ``data_dir``): a series is fetched by WADO-RS from triage serve into this worker's own
``data_dir/cache`` for the job and removed after it; a result file is handed to triage serve
(``PUT /api/results/{file_id}``) before its row is recorded, and fetched back
(``GET``) by the worker that delivers it. Network errors are RetryableError: the job or
delivery is tried again with the usual backoff.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import httpx
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from triage.config import Settings
from triage.errors import RetryableError
from triage.storage.spool import Spool, write_durably

TIMEOUT = httpx.Timeout(60.0, connect=10.0)
DICOM_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class ImageStore:
    """The images and results of one worker, on the shared disk or over HTTP."""

    def __init__(self, settings: Settings, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool
        self.remote = settings.worker_images == "dicomweb"
        self.results = settings.data_dir / "results"
        self.cache = settings.data_dir / "cache"

    # -- images ---------------------------------------------------------------------------------

    @contextmanager
    def job_files(self) -> Iterator[JobFiles]:
        """What one job reads; over HTTP, its downloads are removed when the block ends."""
        files = JobFiles(self, self.cache / uuid.uuid4().hex if self.remote else None)
        try:
            yield files
        finally:
            if files.directory is not None:
                shutil.rmtree(files.directory, ignore_errors=True)

    # -- results --------------------------------------------------------------------------------

    def keep_result(self, file_id: str, data: bytes) -> None:
        """Make a result file durable where deliveries will read it."""
        self._keep(Path(f"{file_id}.dcm"), data, what=f"result {file_id}")

    def keep_key_image(self, file_id: str, png: bytes) -> None:
        """Make a key image durable where the API serves it from."""
        self._keep(Path("key-images") / f"{file_id}.png", png, what=f"key image {file_id}")

    def _keep(self, relative: Path, data: bytes, *, what: str) -> None:
        """``data`` durable at ``results/relative`` (through its folder's ``tmp``), on the
        shared disk, or handed to triage serve (``PUT /api/results/<relative without suffix>``)."""
        if not self.remote:
            final = self.results / relative
            temporary = final.parent / "tmp" / f"{final.stem}.part"
            temporary.parent.mkdir(parents=True, exist_ok=True)
            write_durably(final, data, temporary=temporary)
            return
        with self._client() as client:
            path = f"/api/results/{relative.with_suffix('').as_posix()}"
            reply = _call(client, "PUT", path, content=data)
        if reply.status_code != 204:
            raise RetryableError(f"triage serve refused {what}: HTTP {reply.status_code}")

    @contextmanager
    def result_path(self, file_id: str) -> Iterator[Path]:
        """A readable path to a result file for as long as the block runs."""
        if not self.remote:
            yield self.results / f"{file_id}.dcm"
            return
        directory = self.cache / f"result-{uuid.uuid4().hex}"
        directory.mkdir(parents=True)
        try:
            path = directory / f"{file_id}.dcm"
            with self._client() as client, path.open("wb") as out:
                try:
                    with client.stream("GET", f"/api/results/{file_id}") as reply:
                        if reply.status_code != 200:
                            raise RetryableError(
                                f"triage serve has no result {file_id}: HTTP {reply.status_code}"
                            )
                        for piece in reply.iter_bytes():
                            out.write(piece)
                except httpx.HTTPError as exc:
                    raise RetryableError(f"triage serve unreachable: {type(exc).__name__}") from exc
            yield path
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _client(self) -> httpx.Client:
        token = self.settings.worker_token
        assert token is not None  # Settings checks it for dicomweb
        ca = self.settings.serve_ca_file
        return httpx.Client(
            base_url=self.settings.serve_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token.get_secret_value()}"},
            verify=str(ca) if ca else True,
            timeout=TIMEOUT,
            follow_redirects=False,
        )


class JobFiles:
    """The files of the series one job looks at."""

    def __init__(self, store: ImageStore, directory: Path | None) -> None:
        self.store = store
        self.directory = directory

    def series(self, study_uid: str, series_uid: str, file_ids: list[str]) -> list[Path]:
        """The paths of a series' instances: spool files, or fetched by WADO-RS."""
        if self.directory is None:
            return [self.store.spool.path_for(file_id) for file_id in file_ids]
        target = self.directory / series_uid
        if target.exists():
            return sorted(target.iterdir())
        target.mkdir(parents=True)
        url = f"/dicom-web/studies/{study_uid}/series/{series_uid}"
        with self.store._client() as client:
            try:
                with client.stream("GET", url, headers={"Accept": DICOM_AS_STORED}) as reply:
                    if reply.status_code != 200:
                        raise RetryableError(
                            f"WADO-RS of series {series_uid} answered HTTP {reply.status_code}"
                        )
                    paths = _save_parts(reply, target)
            except httpx.HTTPError as exc:
                raise RetryableError(f"triage serve unreachable: {type(exc).__name__}") from exc
        if len(paths) < len(file_ids):
            raise RetryableError(
                f"WADO-RS gave {len(paths)} of the series' {len(file_ids)} instances"
            )
        return paths


def _call(client: httpx.Client, method: str, url: str, *, content: bytes) -> httpx.Response:
    try:
        return client.request(method, url, content=content)
    except httpx.HTTPError as exc:
        raise RetryableError(f"triage serve unreachable: {type(exc).__name__}") from exc


class _Parts:
    """Writes each part of a multipart body to its own numbered file in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.paths: list[Path] = []
        self.file: BinaryIO | None = None

    def begin(self) -> None:
        path = self.directory / f"{len(self.paths):05d}.dcm"
        self.paths.append(path)
        self.file = path.open("wb")

    def data(self, chunk: bytes, start: int, end: int) -> None:
        assert self.file is not None
        self.file.write(chunk[start:end])

    def end(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _save_parts(reply: httpx.Response, directory: Path) -> list[Path]:
    """Each part of a multipart/related answer into its own file, as it streams in."""
    boundary = ""
    for item in reply.headers.get("content-type", "").split(";"):
        name, _, value = item.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise RetryableError("WADO-RS answer without a multipart boundary")
    parts = _Parts(directory)
    parser = MultipartParser(
        boundary.encode(),
        {"on_part_begin": parts.begin, "on_part_data": parts.data, "on_part_end": parts.end},
    )
    try:
        for piece in reply.iter_bytes():
            parser.write(piece)
    except MultipartParseError as exc:
        raise RetryableError(f"unreadable WADO-RS answer: {exc}") from exc
    finally:
        parts.end()
    return parts.paths
