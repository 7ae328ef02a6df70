"""The ``python`` format: a model whose pipeline is Python code the worker can import.

Its sidecar names ``"entry": "module:function"``; the function is called with the catalog entry
and the torch device and returns a ``LoadedModel`` (``description``, ``device``, ``run(volume)``,
``warm_up()``). The module must be importable by the worker process (installed, or on its
``PYTHONPATH``); the sidecar's other keys reach it through ``entry.description.model_extra``.
"""

from __future__ import annotations

import importlib

import torch

from triage.catalog import CatalogEntry, python_entry
from triage.errors import PermanentError
from workers.models.interface import LoadedModel
from workers.models.loaders import loader


@loader("python")
def load_python(entry: CatalogEntry, device: torch.device) -> LoadedModel:
    description = entry.description
    assert description is not None
    found = python_entry(description)
    assert found is not None  # the catalog refuses a malformed entry
    module_name, function = found
    try:
        factory = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise PermanentError(
            f"model {description.name}: cannot import '{module_name}:{function}' ({exc}); "
            "install the module or put it on the worker's PYTHONPATH"
        ) from exc
    model: LoadedModel = factory(entry, device)
    return model
