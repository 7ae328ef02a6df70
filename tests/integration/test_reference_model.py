"""The shipped reference model, loaded from its TorchScript file and sidecar, on fresh phantoms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workers.models.reference.evaluate import load_model, metrics, run_cases
from workers.models.reference.network import predict
from workers.models.reference.phantom import TEST_SEEDS, generate_phantom

MODEL_DIR = Path(__file__).parents[2] / "workers/models/reference/ct-head-hyperdensity"
# A slice of the test range apart from the one the model card reports.
FIRST_SEED = TEST_SEEDS.start + 50_000
CASES = 40


def test_sidecar_describes_the_model() -> None:
    model = load_model(MODEL_DIR, torch.device("cpu"))
    sidecar = model.sidecar
    assert sidecar["name"] == "ct-head-hyperdensity"
    assert sidecar["format"] == "torchscript"
    assert sidecar["pipeline"] == "lesion-segmentation"
    assert sidecar["applies_to"]["modalities"] == ["CT"]
    assert set(sidecar["outputs"]) == {"score", "detections", "mask"}
    finding = dict(sidecar["finding"])
    comment = finding.pop("comment")
    assert finding == {"code": "1386000", "scheme": "SCT", "meaning": "Intracranial hemorrhage"}
    # Trained on synthetic data, and it says so where its finding is described.
    assert "synthetic" in comment
    assert "no real case" in comment
    assert 0 < model.threshold < 1


def test_prediction_is_on_the_input_grid() -> None:
    model = load_model(MODEL_DIR, torch.device("cpu"))
    # A lesion of at least 10 mL (chosen by its truth, not by the model's answer) must be found.
    phantoms = (
        generate_phantom(seed, lesion=True, matrix=256) for seed in range(FIRST_SEED - 1, 0, -1)
    )
    phantom = next(p for p in phantoms if sum(lesion.volume_ml for lesion in p.lesions) >= 10)
    prediction = predict(
        phantom.hu,
        phantom.spacing_mm,
        model.net,
        torch.device("cpu"),
        preprocessing=model.preprocessing,
        postprocessing=model.postprocessing,
    )
    assert prediction.mask.shape == phantom.hu.shape
    assert 0 <= prediction.study_probability <= 1
    assert prediction.lesions, "a lesion of the phantom was missed"
    voxel_ml = float(np.prod(phantom.spacing_mm)) / 1000
    assert sum(lesion.volume_ml for lesion in prediction.lesions) == pytest.approx(
        prediction.mask.sum() * voxel_ml
    )
    largest = prediction.lesions[0]
    assert all(largest.volume_ml >= lesion.volume_ml for lesion in prediction.lesions)
    assert all(0 <= c < n for c, n in zip(largest.centroid_voxel, phantom.hu.shape, strict=True))


@pytest.mark.slow
def test_sensitivity_and_specificity_on_fresh_phantoms() -> None:
    model = load_model(MODEL_DIR, torch.device("cpu"))
    seeds = range(FIRST_SEED, FIRST_SEED + CASES)
    cases = run_cases(
        model.net,
        seeds,
        has_lesion=lambda seed: seed % 2 == 0,
        matrix=lambda seed: 512 if seed % 10 == 0 else 256,
        preprocessing=model.preprocessing,
        postprocessing=model.postprocessing,
    )
    assert sum(case.matrix == 512 for case in cases) >= 4
    result = metrics(cases, model.threshold)
    assert result.sensitivity >= 0.9, result
    assert result.specificity >= 0.9, result
