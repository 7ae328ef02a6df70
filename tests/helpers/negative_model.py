"""A ``python``-format model that finds nothing: a later version of a model whose re-run turns
an earlier positive result negative (the retraction tests)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from triage.catalog import CatalogEntry, ModelDescription
from workers.models.interface import Code, DetectedFinding, ModelOutput
from workers.volume import Volume


@dataclass
class NegativeModel:
    description: ModelDescription
    device: torch.device

    def warm_up(self) -> None:
        return None

    def run(self, volume: Volume) -> ModelOutput:
        code = Code.from_description(self.description)
        score = DetectedFinding("score", self.description.name, code, 0.02, False)
        return ModelOutput([score], None, {"model": 0.0})


def load(entry: CatalogEntry, device: torch.device) -> NegativeModel:
    assert entry.description is not None
    return NegativeModel(entry.description, device)
