"""Model loaders, one per on-disk format, registered by decorator."""

from __future__ import annotations

from collections.abc import Callable

import torch

from triage.catalog import CatalogEntry
from workers.models.interface import LoadedModel

Loader = Callable[[CatalogEntry, torch.device], LoadedModel]
LOADERS: dict[str, Loader] = {}


def loader(model_format: str) -> Callable[[Loader], Loader]:
    """Register a loader for descriptions whose ``format`` is ``model_format``."""

    def register(function: Loader) -> Loader:
        LOADERS[model_format] = function
        return function

    return register
