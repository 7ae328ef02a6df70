"""The ``lesion-segmentation`` pipeline: a TorchScript network producing a voxel probability map
on a working grid (the reference model's), turned into a mask, lesions and a study score."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from triage.catalog import CatalogEntry, ModelDescription
from triage.errors import PermanentError
from workers.models.devices import autocast, with_oom_fallback
from workers.models.interface import Code, DetectedFinding, ModelOutput, threshold_of
from workers.models.loaders import loader
from workers.models.reference.network import (
    Postprocessing,
    Preprocessing,
    lesions_on_input,
    network_input,
    study_probability,
    working_grid,
)
from workers.volume import Volume

LESION_SEGMENT = 1


@dataclass
class LesionSegmentationModel:
    description: ModelDescription
    device: torch.device
    network: torch.jit.ScriptModule
    preprocessing: Preprocessing
    postprocessing: Postprocessing

    def warm_up(self) -> None:
        channels = len(self.preprocessing.windows_hu)
        inputs = torch.zeros((1, channels, *self.preprocessing.shape))
        # TorchScript's profiling executor optimises a graph on its second call.
        for _ in range(2):
            with torch.inference_mode(), autocast(self.device):
                self.network(inputs.to(self.device))

    def run(self, volume: Volume) -> ModelOutput:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        spacing = volume.spacing_mm
        grid = working_grid(volume.voxels, spacing, self.preprocessing)
        inputs = torch.from_numpy(network_input(volume.voxels, grid, self.preprocessing))[None]
        timings["preprocess"] = time.perf_counter() - started

        started = time.perf_counter()

        def forward(_batch: int) -> torch.Tensor:
            with torch.inference_mode(), autocast(self.device):
                return self.network(inputs.to(self.device))[0, 0].float().cpu()  # type: ignore[no-any-return]

        probability = with_oom_fallback(forward, (1,)).numpy()
        timings["model"] = time.perf_counter() - started

        started = time.perf_counter()
        mask, lesions = lesions_on_input(
            probability, grid, spacing, volume.voxels.shape, self.postprocessing
        )
        score = study_probability(probability, self.preprocessing.spacing_mm, self.postprocessing)
        threshold = threshold_of(self.description, "study_probability_threshold")
        code = Code.from_description(self.description)
        positive = score >= threshold
        findings = [DetectedFinding("score", self.description.name, code, score, positive)]
        if positive:
            findings += [
                DetectedFinding(
                    "lesion",
                    f"lesion {index}",
                    code,
                    lesion.max_probability,
                    True,
                    volume_ml=lesion.volume_ml,
                    centroid_voxel=lesion.centroid_voxel,
                    segment=LESION_SEGMENT,
                )
                for index, lesion in enumerate(lesions, start=1)
            ]
        timings["postprocess"] = time.perf_counter() - started
        return ModelOutput(findings, mask if positive else None, timings)


@loader("torchscript")
def load_torchscript(entry: CatalogEntry, device: torch.device) -> LesionSegmentationModel:
    description = entry.description
    assert description is not None
    assert description.file is not None
    pipeline = (description.model_extra or {}).get("pipeline")
    if pipeline != "lesion-segmentation":
        raise PermanentError(f"unknown TorchScript pipeline {pipeline!r}")
    network = torch.jit.load(str(entry.path.parent / description.file), map_location=device)  # type: ignore[no-untyped-call]
    extra = description.model_extra or {}
    return LesionSegmentationModel(
        description,
        device,
        network.eval(),
        Preprocessing.from_dict(extra["preprocessing"]),
        Postprocessing.from_dict(extra["postprocessing"]),
    )
