"""Score drift: has the distribution of a model's study scores moved from its reference?

Each model run yields a study-level ``score`` finding, a probability in [0, 1]. When a model is
made, the distribution of those scores on its validation set is binned and kept in its sidecar as
``"score_reference"``::

    "score_reference": {
      "edges": [0.0, 0.003, 0.03, 0.5, 0.99, 1.0],
      "proportions": [0.195, 0.2325, 0.095, 0.05, 0.4275],
      "cases": 400,
      "measured_on": "free text: which cases, seeds, prevalence"
    }

``edges`` rise strictly from 0 to 1 and make ``len(edges) - 1`` bins, each closed on the left
and open on the right except the last, which holds 1.0; ``proportions`` are the share of the
reference cases in each bin (non-negative, summing to 1 within 1e-3); ``cases`` is how many
scores they were measured on, M. Recent scores of the same model version, N of them, are binned
the same way and compared with the Population Stability Index:

    PSI = sum over bins i of (p_i - q_i) * ln(p_i / q_i)

with p_i the reference share and q_i the recent share of bin i. Every term is >= 0 (p - q and
ln(p/q) share their sign), so PSI >= 0, and it is 0 when the shares agree; it is the symmetric
Kullback-Leibler divergence, KL(p||q) + KL(q||p). An empty bin would make it infinite, so both
sides are smoothed by half a case per bin (the Jeffreys / Krichevsky-Trofimov estimate):
p_i = (M * share_i + 1/2) / (M + k/2) and q_i = (n_i + 1/2) / (N + k/2) over k bins. An empty
recent bin then costs about p_i * ln(2 N p_i) instead of infinity, and samples of the same size
with the same counts still give exactly 0. The usual reading: under 0.1 no shift, 0.1-0.25 some,
over 0.25 significant; `DEFAULT_THRESHOLD` alarms above 0.25.

How big is PSI when nothing has changed? If the reference (M cases) and the recent sample (N
cases) are drawn from the same distribution, then to second order in q - p
PSI ~ sum (p_i - q_i)^2 / p_i, and (p_i - q_i) has the multinomial covariance times
(1/N + 1/M), so

    PSI ~ (1/N + 1/M) * chi-square with k - 1 degrees of freedom,
    E[PSI] ~ (k - 1) * (1/N + 1/M),

and the false-alarm rate at 0.25 is about P(chi2_{k-1} > 0.25 / (1/N + 1/M)). (This is twice the
(k - 1) / 2N often quoted for one-sided KL: PSI counts both directions. It holds while every bin
expects a few cases; the smoothing pulls sparse bins in, so then PSI is a little smaller.)

Bins. Textbook PSI uses ten equal-width bins. The reference model's scores are bimodal: normal
heads score 0.0008-0.67 (median 0.005, 95 % under 0.17), lesions mostly 0.99-1.0 (86 %; 57 %
exactly 1.0, the sigmoid saturated in float32), so eight of those ten bins hold 0.25-2.5 % each,
a single case landing in one of them adds 0.03 (N = 50) to 0.06 (N = 30) to PSI, and 1/N + 1/M
is multiplied by 9 degrees of freedom. Hence `DEFAULT_EDGES` = 0, 0.003, 0.03, 0.5, 0.99, 1:
five bins placed where the scores are; two for the normal mode, split at 0.003 (its 40th
percentile: a noisier scanner first shows as normal heads creeping up out of the lowest bin),
one for "suspicious, below the operating point (0.58)", one for 0.5-0.99 and one for the
saturated lesion mode (fainter lesions leave it first). On the reference model's 400 validation
phantoms (half with a lesion) they hold 19.5, 23.25, 9.5, 5 and 42.75 %. A model whose scores
lie elsewhere keeps its own edges in its reference; these are only the default of `measure`.

Unshifted false-alarm rate at PSI > 0.25, reference and sample both drawn from those shares,
M = 400 (20,000 simulated pairs; chi-square approximation in brackets; E[PSI] = 4 (1/N + 1/M)):

    N      E[PSI]  99th pct  P(PSI > 0.25)   ten equal bins   five bins, 1e-4 floor
    30     0.13    0.42      9.9 % (13.7 %)  30 %             33 %
    50     0.085   0.29      2.2 % (2.5 %)   7.1 %            10 %
    75     0.061   0.21      0.4 % (0.3 %)   1.4 %            2.4 %
    100    0.049   0.17      0.07 % (0.05 %) 0.18 %           0.7 %
    200    0.030   0.10      0 (0)           0                0

(the last two columns: ten equal-width bins with the same smoothing; these five bins with a
1e-4 floor on empty bins instead of the half case). So `DEFAULT_MIN_SAMPLES` = 100: with 100
recent scores an unshifted sample stays under 0.17 in 99 % of draws and alarms about once in
1,500 checks; with 50 it alarms once in 45. Below the minimum there is no verdict at all.
The same five bins still see real shifts (the reference model on test phantoms at 256 x 256:
40 unshifted 0.005, 30 with noise x15 0.47, 30 with lesions 40 HU fainter 1.17; 40 with noise x8
0.35, where ten equal bins give 0.33 and 0, 0.005, 0.05, 0.5, 0.99, 1 only 0.16).

What PSI cannot tell apart: the score distribution depends on the share of studies with a finding
as much as on the model. The reference is measured at a stated prevalence (``measured_on``); a
site whose worklist holds many fewer positive studies will see the saturated bin shrink and PSI
rise without any change in the model or the scanners.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

FIELD = "score_reference"
DEFAULT_EDGES: tuple[float, ...] = (0.0, 0.003, 0.03, 0.5, 0.99, 1.0)
DEFAULT_THRESHOLD = 0.25  # the usual "significant shift"
DEFAULT_MIN_SAMPLES = 100  # see the module docs: ~0.07% false alarms at 0.25
SMOOTHING_CASES = 0.5  # added to every bin's count on both sides, so empty bins stay finite
SUM_TOLERANCE = 1e-3  # proportions written by hand may be rounded

_KEYS = frozenset({"edges", "proportions", "cases", "measured_on"})


def _fail(what: str) -> ValueError:
    return ValueError(f"{FIELD}: {what}")


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_edges(edges: Sequence[float]) -> tuple[float, ...]:
    """`edges` as a tuple, or ValueError unless they rise strictly from 0 to 1 (two at least)."""
    if isinstance(edges, str | bytes) or not all(_real(e) for e in edges):
        raise _fail(f"edges must be a list of numbers, not {edges!r}")
    values = tuple(float(e) for e in edges)
    if len(values) < 2 or values[0] != 0.0 or values[-1] != 1.0:
        raise _fail(f"edges must start at 0 and end at 1, not {list(values)}")
    if any(not b > a for a, b in itertools.pairwise(values)):
        raise _fail(f"edges must rise strictly, not {list(values)}")
    return values


def bin_counts(scores: Iterable[float], edges: Sequence[float]) -> tuple[int, ...]:
    """How many `scores` fall in each bin [edges[i], edges[i+1]); the last bin includes 1."""
    counts = [0] * (len(edges) - 1)
    for score in scores:
        value = float(score)
        if not 0.0 <= value <= 1.0:  # NaN fails this too
            raise ValueError(f"a score must lie in [0, 1], not {value}")
        counts[min(bisect.bisect_right(edges, value) - 1, len(counts) - 1)] += 1
    return tuple(counts)


def _smoothed(weights: Sequence[float], total: float) -> list[float]:
    denominator = total + SMOOTHING_CASES * len(weights)
    return [(w + SMOOTHING_CASES) / denominator for w in weights]


@dataclass(frozen=True)
class ScoreReference:
    """A model version's binned score distribution on its validation set (see module docs)."""

    edges: tuple[float, ...]
    proportions: tuple[float, ...]
    cases: int
    measured_on: str = ""

    def __post_init__(self) -> None:
        edges = validate_edges(self.edges)
        proportions = self.proportions
        if isinstance(proportions, str | bytes) or not all(_real(p) for p in proportions):
            raise _fail(f"proportions must be a list of numbers, not {proportions!r}")
        if len(proportions) != len(edges) - 1:
            raise _fail(
                f"proportions must be one fewer than edges ({len(edges) - 1}), "
                f"not {len(proportions)}"
            )
        if any(not (math.isfinite(p) and p >= 0) for p in proportions):
            raise _fail(f"proportions must be finite and non-negative, not {list(proportions)}")
        if abs(math.fsum(proportions) - 1.0) > SUM_TOLERANCE:
            raise _fail(f"proportions must sum to 1, not {math.fsum(proportions):.6g}")
        if not _real(self.cases) or self.cases != int(self.cases) or self.cases < 1:
            raise _fail(f"cases must be a whole number >= 1, not {self.cases!r}")
        if not isinstance(self.measured_on, str):
            raise _fail(f"measured_on must be text, not {self.measured_on!r}")
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "proportions", tuple(float(p) for p in proportions))
        object.__setattr__(self, "cases", int(self.cases))

    @classmethod
    def measure(
        cls,
        scores: Sequence[float],
        edges: Sequence[float] = DEFAULT_EDGES,
        *,
        measured_on: str = "",
    ) -> ScoreReference:
        """The reference of `scores` (at least one) binned by `edges`."""
        if not scores:
            raise ValueError("a score reference needs at least one score")
        counts = bin_counts(scores, validate_edges(edges))
        return cls(
            edges=tuple(edges),
            proportions=tuple(c / len(scores) for c in counts),
            cases=len(scores),
            measured_on=measured_on,
        )

    @classmethod
    def from_sidecar(cls, value: Mapping[str, Any] | None) -> ScoreReference | None:
        """Parse a sidecar's ``"score_reference"``; None (absent) gives None.

        Raises ValueError, with a one-line message naming the field, for anything malformed.
        """
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise _fail(f"must be an object, not {type(value).__name__}")
        unknown = sorted(str(key) for key in value if key not in _KEYS)
        if unknown:
            raise _fail(f"unknown keys {unknown}; expected {sorted(_KEYS)}")
        missing = sorted(key for key in ("edges", "proportions", "cases") if key not in value)
        if missing:
            raise _fail(f"missing {missing}")
        for key in ("edges", "proportions"):
            if not isinstance(value[key], list | tuple):
                raise _fail(f"{key} must be a list of numbers, not {value[key]!r}")
        return cls(
            edges=tuple(value["edges"]),
            proportions=tuple(value["proportions"]),
            cases=value["cases"],
            measured_on=value.get("measured_on", ""),
        )

    def to_sidecar(self) -> dict[str, Any]:
        """The JSON object `from_sidecar` reads back."""
        return {
            "edges": list(self.edges),
            "proportions": list(self.proportions),
            "cases": self.cases,
            "measured_on": self.measured_on,
        }

    @property
    def bins(self) -> int:
        return len(self.proportions)


def psi(reference: ScoreReference, scores: Sequence[float]) -> float:
    """Population Stability Index of `scores` against `reference` (module docs: formula, noise).

    sum over bins of (p_i - q_i) * ln(p_i / q_i), both shares smoothed by half a case per bin.
    """
    if not scores:
        raise ValueError("PSI needs at least one score")
    counts = bin_counts(scores, reference.edges)
    weights = [p * reference.cases for p in reference.proportions]
    p = _smoothed(weights, math.fsum(weights))
    q = _smoothed(counts, len(scores))
    return math.fsum((pi - qi) * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


@dataclass(frozen=True)
class DriftCheck:
    """One comparison of recent scores with the reference; `alarm` only with enough samples."""

    psi: float | None  # None when there were no scores at all
    samples: int
    threshold: float
    min_samples: int

    @property
    def enough_samples(self) -> bool:
        return self.samples >= self.min_samples

    @property
    def verdict(self) -> Literal["drift", "stable"] | None:
        """ "drift" above the threshold, "stable" at or below it, None with too few samples."""
        if not self.enough_samples or self.psi is None:
            return None
        return "drift" if self.psi > self.threshold else "stable"

    @property
    def alarm(self) -> bool:
        return self.verdict == "drift"


def check_drift(
    reference: ScoreReference,
    scores: Sequence[float],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> DriftCheck:
    """PSI of `scores` against `reference`; it alarms above `threshold` from `min_samples` on.

    Below `min_samples` the PSI is still reported (when there is any score) but gives no verdict.
    """
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive number, not {threshold}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be at least 1, not {min_samples}")
    return DriftCheck(
        psi=psi(reference, scores) if scores else None,
        samples=len(scores),
        threshold=threshold,
        min_samples=min_samples,
    )
