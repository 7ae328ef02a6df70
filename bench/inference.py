"""bench/inference: where the time goes when a worker analyses a 32-slice 512x512 head CT, stage
by stage, on this machine.

One run writes a synthetic head CT series (the reference phantom: a test seed whose scan has 32
slices of 5 mm, rendered at 512x512, with a lesion) as DICOM files, loads the model the way a
worker does (``ModelRegistry(settings).get``), and for one warm-up and ``--runs`` timed runs does
what ``analyze_study`` does between picking the series and storing the findings:

- load/decode: ``workers.volume.load_volume(paths)`` (read, decode, sort, orient);
- preprocess, model, postprocess: the model's own ``ModelOutput.timings`` from ``run(volume)``;
- results: ``result_input`` + ``build_objects`` (the SR, and the SEG when positive);
- key image: ``workers.keyimage.render_key_image`` of the first lesion's segment in the run's mask
  (the captioned PNG preview for the worklist), not part of the total; its target is < 100 ms.

Beside load/decode it times a reference in the same runs: pydicom ``dcmread`` of the same files
and a stack of their pixel arrays, no sorting or orientation. It prints median, min and max per
stage, and whether the key image meets its target; it never asserts a speed.

    .venv/bin/python -m bench.inference [--runs 5] [--json] [--models-dir DIR] [--key-image PNG]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import dcmread

import triage.catalog
from bench.common import argument_parser, emit, machine, median, today, without_env
from triage.config import Settings
from triage.errors import PermanentError
from workers.keyimage import KeyImage, render_key_image
from workers.models.interface import LoadedModel, ModelOutput
from workers.models.reference.phantom import (
    TEST_SEEDS,
    acquisition_for,
    generate_phantom,
    phantom_uids,
    write_dicom_series,
)
from workers.models.registry import ModelRegistry
from workers.results import build_objects, result_input
from workers.volume import Volume, load_volume

MODEL = "ct-head-hyperdensity"
SLICES, MATRIX = 32, 512
STAGES = ("load_decode", "preprocess", "model", "postprocess", "results")
REFERENCE = "reference_read_decode"
KEY_IMAGE = "key_image"  # timed in the same runs, outside the total (the worker does not render it)
TARGETS_MS = {KEY_IMAGE: 100.0}  # a stage's median must stay below this


def pick_seed(slices: int = SLICES) -> int:
    """The first held-out test seed whose native scan has exactly ``slices`` slices.

    ``generate_phantom`` takes a matrix but not a slice count (that follows from the head's
    height and the slice thickness), so picking the seed keeps the phantom's own geometry.
    """
    for seed in TEST_SEEDS:
        if acquisition_for(seed).slice_count == slices:
            return seed
    raise RuntimeError(f"no test seed scans {slices} slices")


def write_series(directory: Path, seed: int) -> tuple[list[Path], dict[str, Any]]:
    """The phantom of ``seed`` at 512x512 with a lesion, as one DICOM file per slice."""
    phantom = generate_phantom(seed, lesion=True, matrix=MATRIX)
    study_uid, series_uid = phantom_uids(seed)
    paths = write_dicom_series(phantom, directory, study_uid=study_uid, series_uid=series_uid)
    slices, rows, columns = phantom.hu.shape
    if (slices, rows, columns) != (SLICES, MATRIX, MATRIX):
        raise RuntimeError(f"phantom {seed} is {slices}x{rows}x{columns}, not 32x512x512")
    facts = {
        "seed": seed,
        "study_uid": study_uid,
        "shape": [slices, rows, columns],
        "spacing_mm": [round(value, 4) for value in phantom.spacing_mm],
        "lesions_ml": [round(lesion.volume_ml, 2) for lesion in phantom.lesions],
        "bytes": sum(path.stat().st_size for path in paths),
    }
    return paths, facts


def load_model(data_dir: Path) -> tuple[LoadedModel, Path]:
    """The model as a worker loads it: the catalog's first ``MODEL``, through the registry; and
    where its description lies. Settings are built without the caller's TRIAGE_* variables."""
    with without_env("TRIAGE_"):
        settings = Settings(data_dir=data_dir)
    found = [
        entry
        for entry in triage.catalog.scan_models(settings)
        if entry.description is not None and entry.description.name == MODEL
    ]
    if not found or found[0].description is None:
        raise PermanentError(
            f"model {MODEL} not found in {triage.catalog.BUNDLED_MODELS_DIR}; "
            "give --models-dir with a copy of it"
        )
    model = ModelRegistry(settings).get(MODEL, found[0].description.version)
    return model, found[0].path


def read_decode(paths: Sequence[Path]) -> np.ndarray[Any, Any]:
    """The reference: read every file and stack its pixels, nothing else."""
    return np.stack([dcmread(path).pixel_array for path in paths])


def key_image(volume: Volume, output: ModelOutput) -> KeyImage | None:
    """The key image of the run's first lesion (its segment in the mask); None without one."""
    segment = next(
        (f.segment for f in output.findings if f.kind == "lesion" and f.segment is not None), None
    )
    if output.mask is None or segment is None:
        return None
    header = volume.datasets[0]
    return render_key_image(
        volume,
        output.mask,
        segment,
        modality=str(header.get("Modality", "")) or None,
        body_part=str(header.get("BodyPartExamined", "")) or None,
    )


def one_run(
    model: LoadedModel, paths: Sequence[Path], study_uid: str
) -> tuple[dict[str, float], dict[str, Any], KeyImage | None]:
    """Every stage once, in the worker's order, plus the reference read and the key image."""
    seconds: dict[str, float] = {}

    def timed(stage: str, action: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = action()
        seconds[stage] = time.perf_counter() - started
        return value

    timed(REFERENCE, lambda: read_decode(paths))
    volume = timed("load_decode", lambda: load_volume(paths))
    output = model.run(volume)
    seconds |= {stage: output.timings[stage] for stage in ("preprocess", "model", "postprocess")}
    objects = timed(
        "results",
        lambda: build_objects(
            result_input(study_uid=study_uid, model=model, volume=volume, output=output)
        ),
    )
    key: KeyImage | None = timed(KEY_IMAGE, lambda: key_image(volume, output))
    if key is None:  # nothing to render: no figure rather than the time to find that out
        del seconds[KEY_IMAGE]
    outcome = {
        "positive": output.positive,
        "score": round(next(f.probability for f in output.findings if f.kind == "score"), 4),
        "lesions": sum(f.kind == "lesion" for f in output.findings),
        "objects": sorted(str(kind) for kind in objects),
        "key_image": None
        if key is None
        else {
            "slice_index": key.slice_index,
            "width": key.width,
            "height": key.height,
            "png_bytes": len(key.png),
        },
    }
    return seconds, outcome, key


def summarize(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    summary = {}
    extra = [KEY_IMAGE] if all(KEY_IMAGE in run for run in runs) else []
    for stage in (*STAGES, "total", REFERENCE, *extra):
        values = [sum(run[s] for s in STAGES) if stage == "total" else run[stage] for run in runs]
        summary[stage] = {
            "median_ms": round(1000 * median(values), 1),
            "min_ms": round(1000 * min(values), 1),
            "max_ms": round(1000 * max(values), 1),
        }
    return summary


def targets(summary: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Each target against the stage's median; ``met`` None where the stage was not measured."""
    lines = []
    for stage, limit in TARGETS_MS.items():
        measured = summary.get(stage)
        lines.append(
            {
                "stage": stage,
                "limit_ms": limit,
                "median_ms": None if measured is None else measured["median_ms"],
                "met": None if measured is None else measured["median_ms"] < limit,
            }
        )
    return lines


def report(
    series: dict[str, Any],
    model: LoadedModel,
    runs: Sequence[dict[str, float]],
    outcome: dict[str, Any],
    *,
    load_before: tuple[float, float, float],
    model_path: Path,
) -> dict[str, Any]:
    summary = summarize(runs)
    return {
        "benchmark": "bench/inference",
        "date": today(),
        "machine": machine(),
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "device": str(model.device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": {
            "name": model.description.name,
            "version": model.description.version,
            "path": str(model_path),
        },
        "series": series,
        "runs": len(runs),
        "stages": summary,
        "ratio_load_decode_over_reference": round(
            summary["load_decode"]["median_ms"] / summary[REFERENCE]["median_ms"], 2
        ),
        "targets": targets(summary),
        "outcome": outcome,
        "samples_ms": [{k: round(1000 * v, 1) for k, v in run.items()} for run in runs],
    }


def print_text(data: dict[str, Any]) -> None:
    series, model = data["series"], data["model"]
    print(f"bench/inference  {data['date']}  {data['machine']}")
    load = data["load_average_1min"]
    print(f"1-min load average: {load['before']:.2f} before, {load['after']:.2f} after")
    print(
        f"model: {model['name']} {model['version']} ({model['path']}); device "
        f"{data['device']}, torch {data['torch']}, {data['torch_threads']} threads"
    )
    shape = "x".join(map(str, series["shape"]))
    spacing = " x ".join(f"{value:g}" for value in series["spacing_mm"])
    print(
        f"series: phantom seed {series['seed']}, {shape} (slices x rows x columns), "
        f"{spacing} mm, {series['bytes'] / 1e6:.1f} MB; lesions {series['lesions_ml']} mL"
    )
    outcome = data["outcome"]
    print(
        f"result: score {outcome['score']}, positive {outcome['positive']}, "
        f"{outcome['lesions']} lesion(s), objects built: {', '.join(outcome['objects'])}"
    )
    print(f"median of {data['runs']} runs after one warm-up; files in the page cache")
    print()
    print(f"{'stage':<34}{'median ms':>11}{'min ms':>9}{'max ms':>9}")
    labels = {
        "load_decode": "load/decode (load_volume)",
        "preprocess": "preprocess",
        "model": "model (network forward)",
        "postprocess": "postprocess",
        "results": "results (result_input+build_objects)",
        "total": "total",
        REFERENCE: "reference: dcmread + stack pixels",
        KEY_IMAGE: "key image (render_key_image)",
    }
    for stage, values in data["stages"].items():
        if stage in ("total", REFERENCE, KEY_IMAGE):
            print("-" * 63)
        print(
            f"{labels[stage]:<34}{values['median_ms']:>11.1f}"
            f"{values['min_ms']:>9.1f}{values['max_ms']:>9.1f}"
        )
    print()
    print(f"load/decode over the reference read: {data['ratio_load_decode_over_reference']:.2f}")
    key = outcome["key_image"]
    if key is not None:
        print(
            f"key image: slice {key['slice_index']}, {key['width']}x{key['height']} PNG, "
            f"{key['png_bytes'] / 1e3:.0f} kB (not in the total)"
        )
    for line in data["targets"]:
        label = labels[line["stage"]].split(" (")[0]
        if line["met"] is None:
            verdict = "not measured (no lesion segmented)"
        else:
            verdict = f"{'met' if line['met'] else 'NOT met'} (median {line['median_ms']:.1f} ms)"
        print(f"target: {label} < {line['limit_ms']:g} ms: {verdict}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argument_parser("bench.inference", __doc__)
    parser.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up (5)")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="where the model is, instead of the bundled workers/models/reference",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--key-image",
        type=Path,
        default=None,
        metavar="PNG",
        help="write the last run's key image there, to look at",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.models_dir is not None and not args.models_dir.is_dir():
        parser.error(f"--models-dir {args.models_dir} is not a directory")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.models_dir is not None:
        # Only in this process, only for this run: the catalog then finds the model there.
        triage.catalog.BUNDLED_MODELS_DIR = args.models_dir.resolve()
    load_before = os.getloadavg()
    progress = not args.json
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as work:
        root = Path(work)
        try:
            model, model_path = load_model(root / "data")
            seed = pick_seed()
            if progress:
                print(f"writing phantom {seed} in {root} ...", file=sys.stderr, flush=True)
            paths, series = write_series(root / "series", seed)
            runs: list[dict[str, float]] = []
            outcome: dict[str, Any] = {}
            key: KeyImage | None = None
            for run in range(args.runs + 1):
                seconds, outcome, key = one_run(model, paths, series["study_uid"])
                if run:
                    runs.append(seconds)
                if progress:
                    label = f"run {run}/{args.runs}" if run else "warm-up"
                    total = sum(seconds[stage] for stage in STAGES)
                    print(f"  {label}: {total:.2f} s", file=sys.stderr, flush=True)
            if args.key_image is not None and key is not None:
                args.key_image.write_bytes(key.png)
        except (PermanentError, RuntimeError, OSError) as exc:
            print(f"bench/inference failed: {exc}", file=sys.stderr)
            return 1
    data = report(
        series,
        model,
        runs,
        outcome,
        load_before=load_before,
        model_path=model_path,
    )
    return emit(data, as_json=args.json, text=print_text)


if __name__ == "__main__":
    sys.exit(main())
