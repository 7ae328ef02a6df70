r"""Train the reference model on synthetic phantoms (CPU, about a quarter of an hour on 2 cores).

    python -m workers.models.reference.train --seed 0 \
        --out workers/models/reference/ct-head-hyperdensity

Phantoms from the training seed range are generated on the fly, reconstructed at a 128x128 matrix
for speed (noise scaled as if averaged from the native pixels), and put through the same
preprocessing as at inference. A small pool is refreshed by one phantom every other step; each
step trains on crops from it, most of those from lesion phantoms centred near the lesion. Then the
traced network picks its operating point on native-resolution studies from the validation range,
its score reference for drift monitoring is measured on others (`reference_scores`), and
`model.ts` and `model.json` are written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from triage.drift import FIELD as SCORE_REFERENCE_FIELD
from triage.drift import ScoreReference
from workers.models.reference import reference_scores
from workers.models.reference.evaluate import choose_threshold, metrics, run_cases
from workers.models.reference.network import (
    POSTPROCESSING,
    PREPROCESSING,
    ProbabilityNetwork,
    build_network,
    network_input,
    working_grid,
)
from workers.models.reference.phantom import TRAINING_SEEDS, VALIDATION_SEEDS, generate_phantom
from workers.models.reference.resample import FloatArray, apply_separable

logger = logging.getLogger(__name__)

NAME, VERSION = "ct-head-hyperdensity", "1.0.0"
TRAIN_MATRIX = 128
LESION_SHARE = 0.6  # of training phantoms
CENTRED_SHARE = 0.7  # of crops from a phantom with a lesion, centred near the lesion
CROP = (64, 80, 80)  # BatchNorm in eval mode makes crop training valid for whole-grid inference
POOL_SIZE = 48
REFRESH_EVERY = 2  # steps per fresh phantom: generating one costs about a training step
BATCH_SIZE = 4
LEARNING_RATE = 2e-3
POSITIVE_WEIGHT = 5.0  # lesion voxels are rare: weight them up in the cross-entropy


@dataclass(frozen=True)
class Example:
    """One phantom on the working grid: input channels, soft target, where to crop from."""

    inputs: FloatArray
    target: FloatArray
    lesion_voxels: npt.NDArray[np.int64]
    head_voxels: npt.NDArray[np.int64]


def make_example(seed: int, lesion: bool) -> Example:
    """Network input and soft target (lesion fraction) of one phantom on the working grid."""
    phantom = generate_phantom(seed, lesion=lesion, matrix=TRAIN_MATRIX)
    grid = working_grid(phantom.hu, phantom.spacing_mm)
    inputs = network_input(phantom.hu, grid)
    target = np.clip(apply_separable(phantom.mask, grid.to_working), 0, 1)[None]
    head = np.argwhere(inputs[1, ::4, ::4, ::4] > 0.05) * 4
    return Example(inputs, target, np.argwhere(target[0] > 0.5), head)


def crop(example: Example, rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
    """A training crop, left-right mirrored half of the time."""
    centred = example.lesion_voxels.size and rng.random() < CENTRED_SHARE
    voxels = example.lesion_voxels if centred else example.head_voxels
    centre = voxels[rng.integers(len(voxels))] + rng.integers(-12, 13, size=3)
    limits = np.array(example.inputs.shape[1:]) - CROP
    start = np.clip(centre - np.array(CROP) // 2, 0, limits)
    box = (slice(None), *(slice(int(s), int(s) + n) for s, n in zip(start, CROP, strict=True)))
    inputs, target = example.inputs[box], example.target[box]
    if rng.random() < 0.5:  # mirror images are equally plausible heads
        inputs, target = inputs[..., ::-1], target[..., ::-1]
    return np.ascontiguousarray(inputs), np.ascontiguousarray(target)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted cross-entropy and soft Dice over the whole batch (so lesion-free crops count)."""
    probability = torch.sigmoid(logits)
    overlap = (probability * target).sum()
    dice = 1 - (2 * overlap + 1) / (probability.sum() + target.sum() + 1)
    weight = torch.tensor(POSITIVE_WEIGHT)
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight), dice


def train(seed: int, steps: int) -> torch.nn.Module:
    """Fit the UNet on crops from a pool of phantoms refreshed as it goes; eval mode, logits."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    def fresh() -> Example:
        phantom_seed = int(rng.integers(TRAINING_SEEDS.start, TRAINING_SEEDS.stop))
        return make_example(phantom_seed, lesion=bool(rng.random() < LESION_SHARE))

    pool = [fresh() for _ in range(POOL_SIZE)]
    net = build_network()
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=steps, pct_start=0.1
    )
    net.train()
    started, running = time.monotonic(), np.zeros(2)
    for step in range(1, steps + 1):
        if step % REFRESH_EVERY == 0:
            pool[(step // REFRESH_EVERY) % POOL_SIZE] = fresh()
        chosen = rng.choice(POOL_SIZE, size=BATCH_SIZE, replace=False)
        crops = [crop(pool[int(i)], rng) for i in chosen]
        inputs = torch.from_numpy(np.stack([x for x, _ in crops]))
        target = torch.from_numpy(np.stack([y for _, y in crops]))
        bce, dice = dice_bce_loss(net(inputs), target)
        optimizer.zero_grad()
        (bce + dice).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        schedule.step()
        values = np.array([float(bce.detach()), float(dice.detach())])
        running = 0.95 * running + 0.05 * values if step > 1 else values
        if step % 25 == 0 or step == steps:
            elapsed = time.monotonic() - started
            logger.info("step %d/%d bce %.4f dice %.4f (%.0f s)", step, steps, *running, elapsed)
    return net.eval()


def export(net: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Trace the probability network at the working grid's input shape and save it."""
    example = torch.zeros((1, len(PREPROCESSING.windows_hu), *PREPROCESSING.shape))
    with torch.no_grad():
        traced = torch.jit.trace(ProbabilityNetwork(net).eval(), example)  # type: ignore[no-untyped-call]
    torch.jit.save(traced, str(path))
    loaded: torch.nn.Module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    return loaded.eval()


def sidecar(
    *,
    seed: int,
    steps: int,
    out: Path,
    threshold: float,
    validation: dict[str, Any],
    score_reference: ScoreReference | None = None,
) -> dict[str, Any]:
    """The model description the registry reads (see MODEL_CARD.md for the prose)."""
    description: dict[str, Any] = {
        "name": NAME,
        "version": VERSION,
        "format": "torchscript",
        "file": "model.ts",
        "pipeline": "lesion-segmentation",
        "applies_to": {
            "modalities": ["CT"],
            "body_parts": ["HEAD", "BRAIN"],
            "description_patterns": ["(?i)head", "(?i)brain", "(?i)cran"],
        },
        "input": "HU volume (slices, rows, columns) with spacing in mm; axial, slices sorted",
        "preprocessing": PREPROCESSING.as_dict(),
        "postprocessing": POSTPROCESSING.as_dict(),
        "network_output": "lesion probability per voxel of the working grid, mirror-averaged",
        "outputs": ["score", "detections", "mask"],
        "operating_point": {
            "study_probability_threshold": threshold,
            "chosen_on": validation,
        },
        "finding": {
            "code": "1386000",
            "scheme": "SCT",
            "meaning": "Intracranial hemorrhage",
            "comment": "The finding type the synthetic lesions imitate; no real case was seen.",
        },
        "training": {
            "seed": seed,
            "steps": steps,
            "batch_size": BATCH_SIZE,
            "crop": list(CROP),
            "command": (
                f"python -m workers.models.reference.train --seed {seed} --steps {steps} "
                f"--out {out}"
            ),
            "data": (
                "Synthetic head CT phantoms from workers.models.reference.phantom, seeds drawn "
                f"from [{TRAINING_SEEDS.start}, {TRAINING_SEEDS.stop}), {LESION_SHARE:.0%} with "
                "one or two hyperdense lesions (intraparenchymal or extra-axial, 50-90 HU, "
                f"1-60 mL), reconstructed at {TRAIN_MATRIX}x{TRAIN_MATRIX}"
            ),
        },
        "intended_use": "Reference model for testing the pipeline. Synthetic data only; "
        "NOT for clinical use.",
    }
    if score_reference is not None:
        description[SCORE_REFERENCE_FIELD] = score_reference.to_sidecar()
    return description


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--validation-count", type=int, default=60)
    parser.add_argument(
        "--reference-count",
        type=int,
        default=reference_scores.COUNT,
        help="validation studies for the score reference (0: none; about 2 s each)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(2)
    started = time.monotonic()
    net = train(args.seed, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    shipped = export(net, args.out / "model.ts")
    seeds = range(VALIDATION_SEEDS.start, VALIDATION_SEEDS.start + args.validation_count)
    cases = run_cases(shipped, seeds, has_lesion=lambda seed: (seed - seeds.start) % 2 == 0)
    threshold = choose_threshold(cases)
    result = metrics(cases, threshold)
    validation = {
        "seeds": [seeds.start, seeds.stop],
        "cases": result.cases,
        "sensitivity": result.sensitivity,
        "specificity": result.specificity,
        "auc": result.auc,
    }
    reference = None
    if args.reference_count > 0:
        first = reference_scores.FIRST_SEED
        reference = reference_scores.measure(shipped, range(first, first + args.reference_count))
    description = sidecar(
        seed=args.seed,
        steps=args.steps,
        out=args.out,
        threshold=threshold,
        validation=validation,
        score_reference=reference,
    )
    (args.out / "model.json").write_text(json.dumps(description, indent=2) + "\n")
    logger.info("validation %s; total %.0f s", validation, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
