"""What a worker process holds: settings, its own database engine and its warm models.

Built in the parent before Celery forks; the engine and models are created on first use, so
each process gets its own connections and picks its own device.
"""

from __future__ import annotations

from functools import cached_property

from sqlalchemy import Engine

from triage.broker import TaskSender
from triage.config import Settings
from triage.db.session import SessionFactory, create_db_engine, make_session_factory
from triage.storage.spool import Spool
from workers.models.registry import ModelRegistry
from workers.remote import ImageStore


class WorkerContext:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def engine(self) -> Engine:
        return create_db_engine(self.settings.database_url)

    @cached_property
    def session_factory(self) -> SessionFactory:
        return make_session_factory(self.engine)

    @cached_property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.settings)

    @cached_property
    def spool(self) -> Spool:
        return Spool.for_settings(self.settings)

    @cached_property
    def images(self) -> ImageStore:
        """Where this worker reads images and leaves results (``worker_images``)."""
        return ImageStore(self.settings, self.spool)

    @cached_property
    def sender(self) -> TaskSender:
        return TaskSender(self.settings)

    @property
    def masks_dir(self) -> str:
        return str(self.settings.data_dir / "masks")
