"""A real Orthanc as a test peer: the PACS that auto-routes studies to triage and takes results.

``OrthancPeer`` runs Orthanc (with the DICOMweb plugin) on loopback with its own HTTP and DICOM
ports and its own storage under the test's temporary directory, and talks to it over REST.
``stop()`` and ``start()`` keep the storage, so a test can take the PACS away while work is
pending and bring the same PACS back.

Fixtures: ``orthanc`` knows triage's listener from the ``settings`` fixture as modality
``TRIAGE``; ``orthanc_factory(aet=..., modalities=...)`` makes peers configured otherwise. Every
peer is stopped at teardown, also when the test fails. A test module makes them visible by name
(an assignment, so ruff sees no unused import shadowed by the test's parameter)::

    from tests.helpers import orthanc as peers

    orthanc = peers.orthanc
    orthanc_factory = peers.orthanc_factory

Without Orthanc and its DICOMweb plugin (``apt-get install -y orthanc orthanc-dicomweb``) the test
is skipped, or fails under CI=true.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.conftest import free_port, service_missing
from tests.helpers.process import port_open, running
from triage.config import Settings

ORTHANC_BINARY = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT = 30.0
REST_TIMEOUT = 60.0  # a synchronous C-STORE of a study answers within this

# name -> (AE title, host, port), as in Orthanc's "DicomModalities"
Modalities = Mapping[str, tuple[str, str, int]]


class OrthancError(RuntimeError):
    """Orthanc answered a REST call with an error, or reported a failed operation."""

    def __init__(self, message: str, *, status_code: int | None, answer: Any) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.answer = answer


def orthanc_available() -> bool:
    return shutil.which(ORTHANC_BINARY) is not None and DICOMWEB_PLUGIN.is_file()


class OrthancPeer(AbstractContextManager["OrthancPeer"]):
    """One Orthanc process on loopback; a context manager that starts and stops it."""

    def __init__(
        self,
        work_dir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Modalities | None = None,
        name: str = "TEST-PACS",
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        if not orthanc_available():
            service_missing(f"Orthanc ({ORTHANC_BINARY} and {DICOMWEB_PLUGIN})")
        self.work_dir = work_dir
        self.aet = aet
        self.modalities: dict[str, tuple[str, str, int]] = dict(modalities or {})
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.storage_dir = work_dir / "storage"
        self.config_file = work_dir / "orthanc.json"
        self.log_file = work_dir / "orthanc.log"
        self._name = name
        self._extra_config = dict(extra_config or {})
        self._process: ExitStack | None = None
        self._client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.http_port}", timeout=REST_TIMEOUT
        )

    # -- process ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def is_running(self) -> bool:
        return self._process is not None

    def config(self) -> dict[str, Any]:
        return {
            "Name": self._name,
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "TcpNoDelay": True,
            "DicomModalities": {name: list(peer) for name, peer in self.modalities.items()},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            **self._extra_config,
        }

    def start(self) -> None:
        """Start Orthanc (again, on the same ports and storage) and wait for its REST API."""
        if self._process is not None:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        self.config_file.write_text(json.dumps(self.config(), indent=2))
        stack = ExitStack()
        stack.enter_context(
            running(
                [ORTHANC_BINARY, "--verbose", str(self.config_file)],
                log_file=self.log_file,
                ready=self._ready,
                timeout=START_TIMEOUT,
            )
        )
        self._process = stack

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; the storage stays for ``start()``."""
        process, self._process = self._process, None
        if process is not None:
            process.close()

    def _ready(self) -> bool:
        try:
            answer = self._client.get("/system", timeout=1.0)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and port_open(self.dicom_port)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._client.close()

    # -- REST -------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One REST call; the decoded JSON answer. Raises OrthancError on an HTTP error."""
        answer = self._client.request(method, path, **kwargs)
        if answer.is_error:
            try:
                body: Any = answer.json()
            except ValueError:
                body = answer.text
            raise OrthancError(
                f"Orthanc {method} {path} answered {answer.status_code}: {body}",
                status_code=answer.status_code,
                answer=body,
            )
        return answer.json() if answer.content else None

    def system(self) -> dict[str, Any]:
        return dict(self.request("GET", "/system"))

    def upload(self, path: Path) -> str:
        """Store one DICOM file in Orthanc; its Orthanc instance id."""
        answer = self.request(
            "POST",
            "/instances",
            content=path.read_bytes(),
            headers={"Content-Type": "application/dicom"},
        )
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(
                f"upload of {path} failed: {answer}", status_code=None, answer=answer
            )
        return str(answer["ID"])

    def upload_all(self, paths: list[Path]) -> list[str]:
        return [self.upload(path) for path in paths]

    def study_ids(self) -> list[str]:
        return [str(i) for i in self.request("GET", "/studies")]

    def instances_of_study(self, orthanc_study_id: str) -> list[str]:
        """Orthanc instance ids of one study."""
        answer = self.request("GET", f"/studies/{orthanc_study_id}/instances")
        return [str(instance["ID"]) for instance in answer]

    def find_study(self, study_uid: str) -> str | None:
        """The Orthanc id of the study with this Study Instance UID, or None."""
        for match in self.request("POST", "/tools/lookup", content=study_uid):
            if match.get("Type") == "Study":
                return str(match["ID"])
        return None

    def send_study_to(self, modality: str, orthanc_study_id: str) -> dict[str, Any]:
        """Make Orthanc C-STORE a study to one of its modalities, as auto-routing would.

        Synchronous: returns Orthanc's report once the association is closed. Raises
        OrthancError if Orthanc answers an error or reports any instance as failed.
        """
        answer = self.request("POST", f"/modalities/{modality}/store", content=orthanc_study_id)
        report = dict(answer)
        failed = int(report.get("FailedInstancesCount", 0))
        sent = int(report.get("InstancesCount", 0))
        if failed or not sent:
            raise OrthancError(
                f"Orthanc sent {sent} instance(s) to {modality}, {failed} failed: {report}",
                status_code=None,
                answer=report,
            )
        return report

    def instance_dataset(self, sop_instance_uid: str) -> Dataset:
        """The stored instance with this SOP Instance UID, as Orthanc keeps it."""
        for match in self.request("POST", "/tools/lookup", content=sop_instance_uid):
            if match.get("Type") == "Instance":
                answer = self._client.get(f"/instances/{match['ID']}/file")
                answer.raise_for_status()
                return dcmread(BytesIO(answer.content))
        raise OrthancError(f"no instance {sop_instance_uid}", status_code=None, answer=None)

    def qido(self, path: str, params: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """A QIDO-RS search below the DICOMweb root, e.g. ``qido("studies/1.2.3/instances")``."""
        answer = self.request(
            "GET",
            f"/dicom-web/{path.lstrip('/')}",
            params=dict(params or {}),
            headers={"Accept": "application/dicom+json"},
        )
        return list(answer or [])


OrthancFactory = Callable[..., OrthancPeer]


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[OrthancFactory]:
    """``orthanc_factory(aet=..., modalities=..., extra_config=...)``: started peers, each in
    its own directory under tmp_path, all stopped at teardown."""
    with ExitStack() as stack:
        count = 0

        def make(**kwargs: Any) -> OrthancPeer:
            nonlocal count
            count += 1
            peer = OrthancPeer(tmp_path / f"orthanc-{count}", **kwargs)
            stack.callback(peer.close)
            peer.start()
            return peer

        yield make


@pytest.fixture
def orthanc(orthanc_factory: OrthancFactory, settings: Settings) -> OrthancPeer:
    """An Orthanc (AE ORTHANC) that knows triage's listener from ``settings`` as ``TRIAGE``."""
    return orthanc_factory(
        modalities={"TRIAGE": (settings.ae_title, "127.0.0.1", settings.dicom_port)}
    )
