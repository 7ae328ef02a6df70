r"""Measure the shipped model on fresh synthetic studies from the test seed range.

    python -m workers.models.reference.evaluate \
        --model-dir workers/models/reference/ct-head-hyperdensity \
        --first-seed 100000 --count 60 [--json]

Even cases carry a lesion, odd ones none. Every phantom is generated at its native matrix (a good
share are 512x512) and goes through `predict` with the TorchScript file and the sidecar's settings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from workers.models.reference.network import Postprocessing, Preprocessing, predict
from workers.models.reference.phantom import TEST_SEEDS, generate_phantom

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One synthetic study's truth and the model's answer."""

    seed: int
    has_lesion: bool
    study_probability: float
    matrix: int
    detected_lesions: int


@dataclass(frozen=True)
class Metrics:
    """Study-level results at one threshold; AUC is threshold-free."""

    threshold: float
    cases: int
    true_positives: int
    false_negatives: int
    true_negatives: int
    false_positives: int
    sensitivity: float
    specificity: float
    auc: float


@dataclass(frozen=True)
class ShippedModel:
    """The TorchScript network and the sidecar settings it must run with."""

    net: torch.nn.Module
    sidecar: dict[str, Any]
    preprocessing: Preprocessing
    postprocessing: Postprocessing

    @property
    def threshold(self) -> float:
        return float(self.sidecar["operating_point"]["study_probability_threshold"])


def load_model(model_dir: Path, device: torch.device) -> ShippedModel:
    """Load `model.ts` and `model.json` from a model directory."""
    sidecar = json.loads((model_dir / "model.json").read_text())
    net: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
        str(model_dir / sidecar["file"]), map_location=device
    )
    return ShippedModel(
        net=net.eval(),
        sidecar=sidecar,
        preprocessing=Preprocessing.from_dict(sidecar["preprocessing"]),
        postprocessing=Postprocessing.from_dict(sidecar["postprocessing"]),
    )


def run_cases(
    net: torch.nn.Module,
    seeds: Iterable[int],
    *,
    has_lesion: Callable[[int], bool],
    matrix: Callable[[int], int | None] = lambda _: None,
    preprocessing: Preprocessing | None = None,
    postprocessing: Postprocessing | None = None,
    device: torch.device | None = None,
    noise_scale: float = 1.0,
    lesion_contrast_hu: float = 0.0,
) -> list[Case]:
    """Generate each seed's phantom (lesion as `has_lesion` says) and predict on it.

    `noise_scale` and `lesion_contrast_hu` shift the phantoms away from the training data (see
    `generate_phantom`), e.g. to check that drift monitoring notices.
    """
    settings: dict[str, Any] = {}
    if preprocessing is not None:
        settings["preprocessing"] = preprocessing
    if postprocessing is not None:
        settings["postprocessing"] = postprocessing
    cases = []
    for seed in seeds:
        phantom = generate_phantom(
            seed,
            lesion=has_lesion(seed),
            matrix=matrix(seed),
            noise_scale=noise_scale,
            lesion_contrast_hu=lesion_contrast_hu,
        )
        prediction = predict(
            phantom.hu, phantom.spacing_mm, net, device or torch.device("cpu"), **settings
        )
        cases.append(
            Case(
                seed=seed,
                has_lesion=phantom.has_lesion,
                study_probability=prediction.study_probability,
                matrix=phantom.hu.shape[2],
                detected_lesions=len(prediction.lesions),
            )
        )
    return cases


def auc(cases: Sequence[Case]) -> float:
    """ROC AUC as Mann-Whitney: the chance that a positive outscores a negative (ties half)."""
    positives = [c.study_probability for c in cases if c.has_lesion]
    negatives = [c.study_probability for c in cases if not c.has_lesion]
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def metrics(cases: Sequence[Case], threshold: float) -> Metrics:
    """Confusion counts, sensitivity and specificity with `study_probability >= threshold`."""
    tp = sum(c.has_lesion and c.study_probability >= threshold for c in cases)
    fn = sum(c.has_lesion and c.study_probability < threshold for c in cases)
    tn = sum(not c.has_lesion and c.study_probability < threshold for c in cases)
    fp = sum(not c.has_lesion and c.study_probability >= threshold for c in cases)
    return Metrics(
        threshold=threshold,
        cases=len(cases),
        true_positives=tp,
        false_negatives=fn,
        true_negatives=tn,
        false_positives=fp,
        sensitivity=tp / (tp + fn) if tp + fn else float("nan"),
        specificity=tn / (tn + fp) if tn + fp else float("nan"),
        auc=auc(cases),
    )


def choose_threshold(cases: Sequence[Case]) -> float:
    """The cut between adjacent scores maximising min(sensitivity, specificity), then their sum."""
    scores = sorted({c.study_probability for c in cases})
    candidates = [(a + b) / 2 for a, b in itertools.pairwise(scores)] or scores

    def quality(threshold: float) -> tuple[float, float]:
        result = metrics(cases, threshold)
        return min(result.sensitivity, result.specificity), result.sensitivity + result.specificity

    return max(candidates, key=quality)


def format_table(result: Metrics, cases: Sequence[Case]) -> str:
    """A plain-text report: the metrics, then the confusion matrix."""
    large = sum(c.matrix >= 512 for c in cases)
    lines = [
        f"cases               {result.cases} ({large} at 512x512)",
        f"threshold           {result.threshold:.4f}",
        f"sensitivity         {result.sensitivity:.3f}",
        f"specificity         {result.specificity:.3f}",
        f"AUC                 {result.auc:.3f}",
        "",
        "                    predicted +   predicted -",
        f"lesion              {result.true_positives:>11}   {result.false_negatives:>11}",
        f"no lesion           {result.false_positives:>11}   {result.true_negatives:>11}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--first-seed", type=int, default=TEST_SEEDS.start)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    seeds = range(args.first_seed, args.first_seed + args.count)
    if seeds.start < TEST_SEEDS.start or seeds.stop > TEST_SEEDS.stop:
        parser.error(f"seeds must lie in the test range [{TEST_SEEDS.start}, {TEST_SEEDS.stop})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = load_model(args.model_dir, torch.device("cpu"))
    started = time.monotonic()
    cases = run_cases(
        model.net,
        seeds,
        has_lesion=lambda seed: (seed - seeds.start) % 2 == 0,
        preprocessing=model.preprocessing,
        postprocessing=model.postprocessing,
    )
    logger.info("evaluated %d cases in %.0f s", len(cases), time.monotonic() - started)
    result = metrics(cases, model.threshold)
    if args.json:
        report = {
            "model": model.sidecar["name"],
            "version": model.sidecar["version"],
            "seeds": [seeds.start, seeds.stop],
            "metrics": asdict(result),
            "cases": [asdict(case) for case in cases],
        }
        print(json.dumps(report, indent=2))
    else:
        print(format_table(result, cases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
