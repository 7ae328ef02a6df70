"""The models of one worker process: found through the catalog, loaded on first use, kept warm.

A model that fails to load is reported with its reason; the others keep working.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from triage.catalog import CatalogEntry, scan_models
from triage.config import Settings
from triage.errors import PermanentError
from workers.models import bundle, lesion, python  # noqa: F401  (register their loaders)
from workers.models.devices import choose_device
from workers.models.interface import LoadedModel
from workers.models.loaders import LOADERS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelStatus:
    name: str
    version: str | None
    format: str | None
    applies_to: str
    path: str
    state: str  # "loaded", "not loaded" or "error"
    device: str | None = None
    error: str | None = None


class ModelRegistry:
    def __init__(self, settings: Settings, *, device: torch.device | None = None) -> None:
        self.settings = settings
        self._device = device
        self._entries = scan_models(settings)
        self._loaded: dict[tuple[str, str], LoadedModel] = {}
        self._errors: dict[str, str] = {}

    @property
    def device(self) -> torch.device:
        """Chosen at first use, so a forked worker decides in its own process."""
        if self._device is None:
            self._device = choose_device()
            log.info("models will run on %s", self._device)
        return self._device

    def _entry(self, name: str, version: str) -> CatalogEntry:
        for entry in self._entries:
            description = entry.description
            if description and (description.name, description.version) == (name, version):
                if entry.error:
                    raise PermanentError(f"model {name} {version}: {entry.error}")
                return entry
        raise PermanentError(f"model {name} {version} is not installed")

    def is_loaded(self, name: str, version: str) -> bool:
        """Whether ``get`` would return the model without loading it."""
        return (name, version) in self._loaded

    def get(self, name: str, version: str) -> LoadedModel:
        """The loaded model, loading it the first time. Raises PermanentError if it cannot be."""
        key = (name, version)
        if key in self._loaded:
            return self._loaded[key]
        entry = self._entry(name, version)
        assert entry.description is not None
        try:
            model = LOADERS[entry.description.format](entry, self.device)
        except PermanentError:
            raise
        except Exception as exc:
            self._errors[str(entry.path)] = f"{type(exc).__name__}: {exc}"
            raise PermanentError(f"model {name} {version} failed to load: {exc}") from exc
        self._loaded[key] = model
        log.info("model loaded", extra={"model": name, "version": version})
        return model

    def warm_all(self) -> dict[str, float]:
        """Load every installed model and run it once, so that a worker is warm before it
        takes its first job; seconds per model. One that fails is logged and left out: its
        jobs will fail with the reason."""
        warmed = {}
        for entry in self._entries:
            description = entry.description
            if description is None or entry.error:
                continue
            started = time.perf_counter()
            try:
                self.get(description.name, description.version).warm_up()
            except Exception as exc:
                log.warning(
                    "model not warmed: %s",
                    exc,
                    extra={"model": description.name, "version": description.version},
                )
                continue
            warmed[f"{description.name} {description.version}"] = round(
                time.perf_counter() - started, 3
            )
        return warmed

    def load_all(self) -> list[ModelStatus]:
        """Try to load every model found and say how each went (for ``models list``)."""
        statuses = []
        for entry in self._entries:
            description = entry.description
            error = entry.error
            state = "error" if error else "not loaded"
            if description is not None and error is None:
                try:
                    self.get(description.name, description.version)
                    state = "loaded"
                except PermanentError as exc:
                    state, error = "error", str(exc)
            applies = ""
            if description is not None:
                a = description.applies_to
                applies = " ".join(filter(None, ["/".join(a.modalities), "/".join(a.body_parts)]))
            statuses.append(
                ModelStatus(
                    name=entry.name,
                    version=description.version if description else None,
                    format=description.format if description else None,
                    applies_to=applies,
                    path=str(entry.path),
                    state=state,
                    device=str(self.device) if state == "loaded" else None,
                    error=error,
                )
            )
        return statuses
