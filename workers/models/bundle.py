"""MONAI bundle directories: ``configs/metadata.json``, ``configs/inference.json`` and
``models/model.pt`` (a state dict). The ``classification`` pipeline: one image in, class
probabilities out, the positive class's probability as the study score."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.bundle.config_parser import ConfigParser

from triage.catalog import CatalogEntry, ModelDescription
from triage.errors import PermanentError
from workers.models.devices import autocast, with_oom_fallback
from workers.models.interface import Code, DetectedFinding, ModelOutput, threshold_of
from workers.models.loaders import loader
from workers.volume import Volume


@dataclass
class ClassificationBundleModel:
    description: ModelDescription
    device: torch.device
    network: torch.nn.Module
    preprocessing: Any  # a MONAI transform (Compose) from the bundle, or None
    positive_class: int

    def warm_up(self) -> None:
        tensor = torch.zeros((1, 64, 64))  # (channel, rows, columns), as run() passes an image
        if self.preprocessing is not None:
            tensor = torch.as_tensor(self.preprocessing(tensor))
        with torch.inference_mode(), autocast(self.device):
            self.network(tensor[None].float().to(self.device))

    def run(self, volume: Volume) -> ModelOutput:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        image = volume.voxels[volume.voxels.shape[0] // 2][None]  # (channel, rows, columns)
        tensor = torch.as_tensor(np.ascontiguousarray(image))
        if self.preprocessing is not None:
            tensor = torch.as_tensor(self.preprocessing(tensor))
        timings["preprocess"] = time.perf_counter() - started

        started = time.perf_counter()

        def forward(_batch: int) -> torch.Tensor:
            with torch.inference_mode(), autocast(self.device):
                logits = self.network(tensor[None].float().to(self.device))
            return torch.softmax(logits.float(), dim=1)[0].cpu()

        probabilities = with_oom_fallback(forward, (1,))
        timings["model"] = time.perf_counter() - started

        started = time.perf_counter()
        score = float(probabilities[self.positive_class])
        positive = score >= threshold_of(self.description, "probability_threshold")
        code = Code.from_description(self.description)
        findings = [DetectedFinding("score", self.description.name, code, score, positive)]
        timings["postprocess"] = time.perf_counter() - started
        return ModelOutput(findings, None, timings)


@loader("monai-bundle")
def load_bundle(entry: CatalogEntry, device: torch.device) -> ClassificationBundleModel:
    description = entry.description
    assert description is not None
    extra = description.model_extra or {}
    if extra.get("pipeline", "classification") != "classification":
        raise PermanentError(f"unknown bundle pipeline {extra.get('pipeline')!r}")
    parser = ConfigParser()
    parser.read_config(str(entry.path / "configs" / "inference.json"))
    parser["bundle_root"] = str(entry.path)
    network = parser.get_parsed_content("network_def")
    weights = entry.path / "models" / "model.pt"
    network.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    network.to(device).eval()
    preprocessing = (
        parser.get_parsed_content("preprocessing") if "preprocessing" in parser.get() else None
    )
    return ClassificationBundleModel(
        description, device, network, preprocessing, int(extra.get("positive_class", 1))
    )
