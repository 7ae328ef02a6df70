"""Score drift: the PSI arithmetic, the sidecar's score reference and the alarm's rules."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from triage.drift import (
    DEFAULT_EDGES,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_THRESHOLD,
    ScoreReference,
    bin_counts,
    check_drift,
    psi,
)

HALVES = (0.0, 0.5, 1.0)
SIDECAR = Path(__file__).parents[2] / "workers/models/reference/ct-head-hyperdensity/model.json"


def reference(
    proportions: tuple[float, ...], cases: int, edges: tuple[float, ...] = HALVES
) -> ScoreReference:
    return ScoreReference(edges=edges, proportions=proportions, cases=cases, measured_on="test")


def test_identical_distributions_give_zero() -> None:
    scores = [0.001, 0.002, 0.01, 0.2, 0.6, 0.995, 1.0, 1.0]
    measured = ScoreReference.measure(scores)
    assert psi(measured, scores) == 0.0
    assert psi(measured, list(reversed(scores))) == 0.0
    # The same shares from a sample of another size: only the smoothing differs, barely.
    assert 0 < psi(measured, scores * 10) < 0.01


def test_a_case_computed_by_hand() -> None:
    # Reference: 8 cases, 6 below 0.5 and 2 above; recent: 2 below and 6 above.
    # Smoothed by half a case per bin (2 bins: denominators 8 + 1 = 9):
    #   p = (6.5/9, 2.5/9), q = (2.5/9, 6.5/9)
    #   PSI = (4/9) ln(6.5/2.5) + (-4/9) ln(2.5/6.5) = (8/9) ln 2.6 = 0.8493435...
    ref = reference((0.75, 0.25), cases=8)
    recent = [0.1, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert psi(ref, recent) == pytest.approx(8 / 9 * math.log(2.6), rel=1e-12)
    assert psi(ref, recent) == pytest.approx(0.8493435, abs=1e-6)


def test_large_samples_approach_the_unsmoothed_formula() -> None:
    p = (0.5, 0.3, 0.2)
    ref = reference(p, cases=10**9, edges=(0.0, 0.1, 0.9, 1.0))
    recent = [0.05] * 4000 + [0.5] * 3000 + [0.95] * 3000  # q = (0.4, 0.3, 0.3)
    q = (0.4, 0.3, 0.3)
    exact = sum((a - b) * math.log(a / b) for a, b in zip(p, q, strict=True))
    assert psi(ref, recent) == pytest.approx(exact, rel=1e-3)


def test_empty_bins_stay_finite() -> None:
    ref = reference((1.0, 0.0), cases=100)
    everything_moved = psi(ref, [0.9] * 50)
    assert math.isfinite(everything_moved)
    assert everything_moved > 2  # but it is plainly a shift
    # An empty bin on the recent side costs little when the reference bin is small.
    ref = reference((0.95, 0.05), cases=400)
    assert psi(ref, [0.1] * 40) < 0.1


def test_psi_never_negative_and_grows_with_the_shift() -> None:
    ref = reference((0.5, 0.5), cases=400)
    values = [psi(ref, [0.1] * (50 - high) + [0.9] * high) for high in range(25, 51, 5)]
    assert values[0] == pytest.approx(0, abs=1e-4)
    assert all(v >= 0 for v in values)
    assert values == sorted(values)


def test_bins_are_closed_on_the_left_and_the_last_holds_one() -> None:
    assert bin_counts([0.0, 0.49, 0.5, 0.99, 1.0], HALVES) == (2, 3)
    assert bin_counts([0.003, 0.0029, 1.0], DEFAULT_EDGES)[:2] == (1, 1)
    for bad in (-0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="score"):
            bin_counts([bad], HALVES)
    with pytest.raises(ValueError, match="at least one"):
        psi(reference((0.5, 0.5), cases=2), [])


def test_measure_and_the_sidecar_round_trip() -> None:
    measured = ScoreReference.measure([0.001, 0.01, 0.2, 0.7, 1.0], measured_on="five scores")
    assert measured.edges == DEFAULT_EDGES
    assert measured.proportions == (0.2, 0.2, 0.2, 0.2, 0.2)
    assert measured.cases == 5
    value = json.loads(json.dumps(measured.to_sidecar()))
    assert value == {
        "edges": list(DEFAULT_EDGES),
        "proportions": [0.2] * 5,
        "cases": 5,
        "measured_on": "five scores",
    }
    assert ScoreReference.from_sidecar(value) == measured
    assert ScoreReference.from_sidecar(None) is None
    with pytest.raises(ValueError, match="at least one"):
        ScoreReference.measure([])


GOOD: dict[str, Any] = {
    "edges": [0.0, 0.5, 1.0],
    "proportions": [0.4, 0.6],
    "cases": 10,
    "measured_on": "seeds 1-10",
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"edges": [0.1, 0.5, 1.0]}, "edges must start at 0 and end at 1"),
        ({"edges": [0.0, 0.5, 0.9]}, "edges must start at 0 and end at 1"),
        ({"edges": [0.0, 0.6, 0.5, 1.0], "proportions": [0.3, 0.3, 0.4]}, "rise strictly"),
        ({"edges": [0.0, 0.5, 0.5, 1.0], "proportions": [0.3, 0.3, 0.4]}, "rise strictly"),
        ({"edges": [0.0]}, "start at 0 and end at 1"),
        ({"edges": "0,1"}, "edges must be a list"),
        ({"edges": [0.0, "0.5", 1.0]}, "edges must be a list of numbers"),
        ({"proportions": [0.4, 0.3, 0.3]}, "one fewer than edges"),
        ({"proportions": [1.0]}, "one fewer than edges"),
        ({"proportions": [1.2, -0.2]}, "non-negative"),
        ({"proportions": [0.4, float("nan")]}, "non-negative"),
        ({"proportions": [0.4, 0.5]}, "sum to 1"),
        ({"proportions": [True, False]}, "list of numbers"),
        ({"cases": 0}, "cases must be a whole number"),
        ({"cases": 2.5}, "cases must be a whole number"),
        ({"cases": True}, "cases must be a whole number"),
        ({"measured_on": 7}, "measured_on must be text"),
        ({"counts": [4, 6]}, "unknown keys"),
    ],
)
def test_bad_sidecar_values_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        ScoreReference.from_sidecar({**GOOD, **change})
    text = str(raised.value)
    assert text.startswith("score_reference: ")
    assert "\n" not in text


@pytest.mark.parametrize("value", [[0.0, 1.0], "edges", 3])
def test_a_sidecar_value_that_is_no_object_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="score_reference: must be an object"):
        ScoreReference.from_sidecar(value)


@pytest.mark.parametrize("key", ["edges", "proportions", "cases"])
def test_a_missing_key_is_named(key: str) -> None:
    value = {k: v for k, v in GOOD.items() if k != key}
    with pytest.raises(ValueError, match=f"score_reference: missing \\['{key}'\\]"):
        ScoreReference.from_sidecar(value)


def test_rounded_proportions_are_accepted_and_measured_on_is_optional() -> None:
    parsed = ScoreReference.from_sidecar(
        {"edges": [0, 0.25, 0.5, 1], "proportions": [0.333, 0.333, 0.333], "cases": 3}
    )
    assert parsed is not None
    assert parsed.edges == (0.0, 0.25, 0.5, 1.0)
    assert parsed.measured_on == ""
    assert psi(parsed, [0.1, 0.3, 0.7]) == pytest.approx(0, abs=1e-3)


def test_the_check_gives_no_verdict_below_the_minimum() -> None:
    ref = reference((0.5, 0.5), cases=400)
    shifted = [0.9] * 20
    few = check_drift(ref, shifted, min_samples=50)
    assert few.psi is not None
    assert few.psi > DEFAULT_THRESHOLD  # measured, reported, but no verdict
    assert few.samples == 20
    assert few.verdict is None
    assert not few.alarm
    none = check_drift(ref, [])
    assert none.psi is None
    assert none.verdict is None
    assert not none.alarm


def test_the_check_alarms_above_the_threshold() -> None:
    ref = reference((0.5, 0.5), cases=400)
    shifted = check_drift(ref, [0.9] * 40 + [0.1] * 10, min_samples=50)
    assert shifted.enough_samples
    assert shifted.verdict == "drift"
    assert shifted.alarm
    assert shifted.threshold == DEFAULT_THRESHOLD
    stable = check_drift(ref, [0.9] * 25 + [0.1] * 25, min_samples=50)
    assert stable.verdict == "stable"
    assert not stable.alarm
    # The threshold is the caller's: the same scores alarm at a stricter one.
    assert shifted.psi is not None
    assert not check_drift(ref, [0.9] * 40 + [0.1] * 10, threshold=shifted.psi + 0.01).alarm
    with pytest.raises(ValueError, match="threshold"):
        check_drift(ref, [0.5], threshold=0)
    with pytest.raises(ValueError, match="min_samples"):
        check_drift(ref, [0.5], min_samples=0)


def test_the_default_bins_rarely_alarm_without_a_shift() -> None:
    """The module's claim: with the shipped reference's shares and the default minimum sample,
    an unshifted sample against a reference measured again on as many cases alarms about once
    in 1,500 checks (simulated there with 20,000 pairs; here 2,000, so at most a few)."""
    shipped = ScoreReference.from_sidecar(json.loads(SIDECAR.read_text())["score_reference"])
    assert shipped is not None
    assert shipped.edges == DEFAULT_EDGES
    assert min(shipped.proportions) >= 0.01  # no bin that only a stray case would fill
    rng = random.Random(0)

    def draw(count: int) -> list[float]:
        # A score from a bin chosen by its reference share, uniform within the bin.
        bins = rng.choices(range(shipped.bins), weights=shipped.proportions, k=count)
        return [rng.uniform(shipped.edges[b], shipped.edges[b + 1]) for b in bins]

    trials = 2000
    alarms = 0
    for _ in range(trials):
        remeasured = ScoreReference.measure(draw(shipped.cases))
        alarms += check_drift(remeasured, draw(DEFAULT_MIN_SAMPLES)).alarm
    assert alarms / trials < 0.005
