r"""Measure the shipped model's score reference (for drift monitoring) on validation phantoms.

    python -m workers.models.reference.reference_scores \
        --model-dir workers/models/reference/ct-head-hyperdensity [--write]

Runs the TorchScript file with the sidecar's settings, as `evaluate` does, on `--count` studies
from the validation seed range (by default 60,000-60,399: apart from the 50,000-50,059 the
operating point is chosen on), each at its native matrix, even seeds with a lesion and odd ones
without (a prevalence of one half, as in `evaluate`). Their study scores, binned by
`triage.drift.DEFAULT_EDGES`, become the sidecar's ``"score_reference"`` (see `triage.drift`).
Prints it as JSON; `--write` also puts it into `model.json`, replacing the one there or appending
it as the last key, the rest unchanged. Re-run it whenever the model is retrained (`train` runs
it too). About 2 s a study on 2 CPU cores: 12 minutes for the default 400.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from triage.drift import DEFAULT_EDGES, FIELD, ScoreReference
from workers.models.reference.evaluate import load_model, run_cases
from workers.models.reference.network import Postprocessing, Preprocessing
from workers.models.reference.phantom import VALIDATION_SEEDS

logger = logging.getLogger(__name__)

FIRST_SEED = VALIDATION_SEEDS.start + 10_000
COUNT = 400
LESION_PREVALENCE = 0.5  # even seeds from the first one carry a lesion


def measure(
    net: torch.nn.Module,
    seeds: range,
    *,
    preprocessing: Preprocessing | None = None,
    postprocessing: Postprocessing | None = None,
    edges: Sequence[float] = DEFAULT_EDGES,
) -> ScoreReference:
    """The score reference of `net` on the phantoms of `seeds` (validation range, native matrix)."""
    if seeds.start < VALIDATION_SEEDS.start or seeds.stop > VALIDATION_SEEDS.stop:
        raise ValueError(
            f"seeds must lie in the validation range [{VALIDATION_SEEDS.start}, "
            f"{VALIDATION_SEEDS.stop})"
        )
    cases = run_cases(
        net,
        seeds,
        has_lesion=lambda seed: (seed - seeds.start) % 2 == 0,
        preprocessing=preprocessing,
        postprocessing=postprocessing,
    )
    lesions = sum(case.has_lesion for case in cases)
    return ScoreReference.measure(
        [case.study_probability for case in cases],
        edges,
        measured_on=(
            "synthetic head CT phantoms from workers.models.reference.phantom, validation seeds "
            f"{seeds.start}-{seeds.stop - 1}, native matrices, {lesions} of {len(cases)} with a "
            f"lesion (prevalence {lesions / len(cases):.2f}); "
            "python -m workers.models.reference.reference_scores"
        ),
    )


def with_reference(sidecar: dict[str, Any], reference: ScoreReference) -> dict[str, Any]:
    """`sidecar` with its score reference replaced in place, or appended as the last key."""
    return {**sidecar, FIELD: reference.to_sidecar()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED, help=f"default {FIRST_SEED}")
    parser.add_argument("--count", type=int, default=COUNT, help=f"studies, default {COUNT}")
    parser.add_argument(
        "--write", action="store_true", help="write the reference into the model's model.json"
    )
    args = parser.parse_args(argv)
    seeds = range(args.first_seed, args.first_seed + args.count)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if seeds.start < VALIDATION_SEEDS.start or seeds.stop > VALIDATION_SEEDS.stop:
        parser.error(
            f"seeds must lie in the validation range [{VALIDATION_SEEDS.start}, "
            f"{VALIDATION_SEEDS.stop})"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = load_model(args.model_dir, torch.device("cpu"))
    started = time.monotonic()
    reference = measure(
        model.net,
        seeds,
        preprocessing=model.preprocessing,
        postprocessing=model.postprocessing,
    )
    logger.info("measured %d cases in %.0f s", reference.cases, time.monotonic() - started)
    print(json.dumps({FIELD: reference.to_sidecar()}, indent=2))
    if args.write:
        path = args.model_dir / "model.json"
        sidecar = with_reference(json.loads(path.read_text()), reference)
        path.write_text(json.dumps(sidecar, indent=2) + "\n")
        logger.info("wrote %s into %s", FIELD, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
