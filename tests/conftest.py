"""Fixtures every test builds on: free ports, data directories, fresh databases, services.

Under CI=true a missing service fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, create_engine, text

from triage.config import Settings
from triage.db import migrate
from triage.db.session import SessionFactory, create_db_engine, make_session_factory
from triage.ingest.pipeline import Ingestor
from triage.metrics import IngestMetrics
from triage.receiver.scp import AssociationEnded, DicomListener
from triage.storage.spool import Spool

# CI runners set CI to "true" (GitHub, GitLab) or "1" (others); .ci/run sets it too.
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")
POSTGRES_URL = os.environ.get(
    "TRIAGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("TRIAGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def service_missing(what: str) -> None:
    """Skip on a developer machine; fail under CI, where every service must be there."""
    if IN_CI:
        pytest.fail(f"{what} is not available (CI=true: services are required)")
    pytest.skip(f"{what} is not available")


@pytest.fixture(autouse=True)
def _no_triage_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests pass settings explicitly; a developer's TRIAGE_* variables must not leak in."""
    for name in list(os.environ):
        if name.startswith("TRIAGE_") and not name.startswith("TRIAGE_TEST_"):
            monkeypatch.delenv(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'triage.sqlite'}"


@pytest.fixture(scope="session")
def postgres_admin_engine() -> Iterator[Engine]:
    engine = create_engine(POSTGRES_URL, pool_pre_ping=True)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:
        engine.dispose()
        service_missing(f"PostgreSQL at {POSTGRES_URL}")
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(postgres_admin_engine: Engine) -> Iterator[str]:
    """A URL whose connections see only a fresh schema, dropped when the test ends."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with postgres_admin_engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with postgres_admin_engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Runs the test once on SQLite and once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


def migrated_engine(url: str) -> Iterator[Engine]:
    """An engine on ``url`` with the schema upgraded; disposed when the fixture ends."""
    engine = create_db_engine(url)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated database on each backend."""
    yield from migrated_engine(database_url)


@pytest.fixture
def session_factory(engine: Engine) -> SessionFactory:
    return make_session_factory(engine)


@pytest.fixture
def settings(data_dir: Path, sqlite_url: str) -> Settings:
    """Embedded-default settings on free ports in a temporary data directory."""
    return Settings(
        data_dir=data_dir,
        database_url=sqlite_url,
        dicom_port=free_port(),
        http_port=free_port(),
        study_quiet_seconds=5,
        association_grace_seconds=0.5,
        spool_min_free_mb=1,
    )


@pytest.fixture
def redis_url() -> Iterator[str]:
    """Redis database 15, emptied before and after the test."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        service_missing(f"Redis at {REDIS_URL}")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@dataclass
class IngestStack:
    """The receiving side of triage in-process: database, spool and ingestor, on ``settings``."""

    settings: Settings
    engine: Engine
    session_factory: SessionFactory
    spool: Spool
    registry: CollectorRegistry
    metrics: IngestMetrics
    ingestor: Ingestor
    listeners: list[DicomListener] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings) -> IngestStack:
        engine = create_db_engine(settings.database_url)
        migrate.upgrade(engine)
        factory = make_session_factory(engine)
        spool = Spool.for_settings(settings)
        registry = CollectorRegistry()
        metrics = IngestMetrics(registry)
        ingestor = Ingestor(
            spool=spool,
            engine=create_db_engine(settings.database_url, rebuildable=True),
            metrics=metrics,
        )
        return cls(settings, engine, factory, spool, registry, metrics, ingestor)

    def ingest(self, *paths: Path, calling_ae: str | None = "TEST") -> None:
        for path in paths:
            self.ingestor.ingest(path.read_bytes(), calling_ae=calling_ae, source="test")

    def listener(self, *, on_association_end: AssociationEnded | None = None) -> DicomListener:
        """A started DICOM listener on this stack; ``stack_factory`` stops it at teardown."""
        listener = DicomListener(
            self.settings,
            ingestor=self.ingestor,
            session_factory=self.session_factory,
            metrics=self.metrics,
            on_association_end=on_association_end,
        )
        listener.start()
        self.listeners.append(listener)
        return listener


StackFactory = Callable[[Settings], IngestStack]


@pytest.fixture
def stack_factory() -> Iterator[StackFactory]:
    """Builds IngestStacks; at teardown stops their listeners and disposes of their engines."""
    stacks: list[IngestStack] = []

    def build(settings: Settings) -> IngestStack:
        stacks.append(IngestStack.build(settings))
        return stacks[-1]

    yield build
    for listener in [listener for stack in stacks for listener in stack.listeners]:
        listener.stop()
    for stack in stacks:
        stack.ingestor.close()
        stack.ingestor.engine.dispose()
        stack.engine.dispose()
