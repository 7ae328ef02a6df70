"""A MONAI bundle built by the tests: a randomly initialised 2D DenseNet radiograph classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import DenseNet121
from monai.transforms import Resize, ScaleIntensity
from pydicom import dcmread

from triage.config import RoutingRule, Settings

INFERENCE = {
    "network_def": {
        "_target_": "DenseNet121",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 2,
    },
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "ScaleIntensity"},
            {"_target_": "Resize", "spatial_size": [128, 128]},
        ],
    },
}


def densenet_bundle(root: Path, *, name: str = "cxr-densenet", version: str = "0.1.0") -> Path:
    """Write a bundle directory (metadata, inference config, weights) and return its path."""
    bundle = root / name
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    metadata = {
        "name": name,
        "version": version,
        "monai_version": "1.6.1",
        "description": "Untrained 2D DenseNet121, for testing the bundle path only.",
        "triage": {
            "applies_to": {"modalities": ["CR", "DX"], "body_parts": ["CHEST"]},
            "series": {"orientation": None, "min_slices": 1, "modalities": ["CR", "DX"]},
            "outputs": ["score"],
            "operating_point": {"probability_threshold": 0.5},
            "positive_class": 1,
            "finding": {"scheme": "SCT", "code": "36118008", "meaning": "Pneumothorax"},
        },
    }
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    (bundle / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=2))
    torch.manual_seed(0)
    network = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


def bundle_probability(bundle: Path, image: Path) -> float:
    """The positive class's probability for one radiograph, computed without triage: pydicom's
    pixels, the MONAI transforms written in INFERENCE, the saved weights and a softmax."""
    pixels = dcmread(image).pixel_array.astype(np.float32)
    tensor = Resize(spatial_size=[128, 128])(ScaleIntensity()(torch.as_tensor(pixels[None])))
    network = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    with torch.inference_mode():
        logits = network(torch.as_tensor(tensor)[None].float())
    return float(torch.softmax(logits, dim=1)[0, 1])


def cxr_settings(settings: Settings, models_dir: Path) -> Settings:
    """``settings`` with the test bundle installed and routing CR studies to it."""
    densenet_bundle(models_dir)
    rule = RoutingRule(name="cxr", models=["cxr-densenet"], modalities=["CR"])
    return settings.model_copy(update={"models_dir": models_dir, "routing_rules": [rule]})
