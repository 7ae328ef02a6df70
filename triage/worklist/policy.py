"""Worklist priority: which study a radiologist should read next, and why.

Every study on the reading worklist sits in one of three tiers, read in this order: **critical**,
**urgent**, **routine**. Within a tier, the study that has used up the largest share of its target
turnaround comes first. Each study carries a short reason that says why it is where it is, for
example ``critical AI finding: hyperdensity 12 mL, p=0.97; ROUTINE order``.

How a study's tier is decided, in this order:

1. **A critical AI finding puts the study in the critical tier.** A finding counts when its type
   is marked critical (an intracranial hemorrhage, say) and the model called it positive at its
   operating point, with a probability at or above the model's threshold. The order's priority does
   not matter then. Negative findings, findings below the threshold and findings of types not
   marked critical never move a study up.
2. **Otherwise the order's priority decides.** It is read from the DICOM Requested Procedure
   Priority (0040,1003) or Scheduled Procedure Step Priority (0074,1200): STAT and HIGH are urgent;
   ROUTINE, MEDIUM, LOW and an order with no priority are routine.
3. **Waiting time ages every study.** Each tier has a target turnaround, counted from when the
   study arrived: 15 minutes for critical, 60 minutes for urgent, 24 hours for routine. The score is
   the share of that target already used: 0 on arrival, 0.5 halfway, 1.0 when due, above 1 once
   overdue. It only grows while a study waits, so in each tier older studies move ahead of newer
   ones and none is left behind for ever.
4. **An overdue study moves up one tier.** When a study's target runs out, it escalates: routine
   becomes urgent, urgent becomes critical. In its new tier its target clock starts again at the
   moment it escalated (a routine study escalated at 24 h is due as urgent at 25 h), and it is
   ordered among that tier's studies by that clock. By waiting alone a study climbs one tier at
   most. A critical study that is overdue has nowhere higher to go: it stays critical, its score
   keeps growing past 1 so it moves ahead of the critical studies that are still within their
   target, and its reason says it is overdue.
5. **At equal waiting time the more severe finding comes first.** Waiting is counted in whole
   minutes of the clock, from the start of the minute in which a study arrived (or escalated),
   so studies that came in during the same minute have waited equally long; among them, the
   one whose most severe critical finding has the higher probability, then the larger volume,
   is read first. A 90 mL hemorrhage is not put below a 0.8 mL one because it arrived a second
   later, yet a study never falls behind one that arrived in a later minute: nothing starves.
6. **Remaining ties are broken by arrival, then by Study Instance UID**, so the same studies
   are always listed in the same order.

Whether the AI analysis is still pending or has failed never changes the tier; the reason says so,
so that a reader knows that a missing AI flag means "not analysed" rather than "negative".

For PACS administrators, everything above is set in `PolicyConfig`: the targets per tier (and, if
wanted, shorter or longer targets for some modalities, for example CT), which order priorities
are urgent, the tier for an order with no priority, and how many tiers waiting may climb (0 turns
escalation off; 2 lets a routine study reach critical). A priority change is worth recording when
the tier, the reason or the due time changes, or the score crosses a quarter of the target
(`describe_change`); the service records each one with the old and new values.

Everything here is pure: no I/O, no clock reads (the caller passes ``now``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TypeVar

from triage.domain import Tier

# Most urgent first: a tier's position here is its tier_rank.
TIERS: tuple[Tier, ...] = (Tier.CRITICAL, Tier.URGENT, Tier.ROUTINE)

# The length of WorklistEntry.reason and PriorityChange.reason.
REASON_MAX_CHARS = 500

# describe_change reports a score change each time the score crosses a multiple of this.
SCORE_BAND = 0.25

# How many critical findings a reason names before it only counts the rest.
_FINDINGS_NAMED = 3


def tier_rank(tier: Tier) -> int:
    """0 for critical, 1 for urgent, 2 for routine: lower is read first."""
    return TIERS.index(tier)


class OrderPriority(enum.StrEnum):
    """The defined terms of Requested Procedure Priority and Scheduled Procedure Step Priority."""

    STAT = "STAT"
    HIGH = "HIGH"
    ROUTINE = "ROUTINE"
    MEDIUM = "MEDIUM"
    LOW = "LOW"

    @classmethod
    def parse(cls, value: str | OrderPriority | None) -> OrderPriority | None:
        """Read a DICOM value; an absent or empty one means the order gave no priority."""
        if value is None or isinstance(value, OrderPriority):
            return value
        text = value.strip().upper()
        if not text:
            return None
        try:
            return cls(text)
        except ValueError:
            terms = ", ".join(cls)
            raise ValueError(f"order priority {value!r} is not one of {terms}") from None


class AnalysisState(enum.StrEnum):
    """Where the AI analysis of a study stands; shown in the reason, never changes the tier."""

    PENDING = "pending"
    ANALYZED = "analyzed"
    FAILED = "failed"


def _require_aware(name: str, moment: datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")


@dataclass(frozen=True, kw_only=True)
class Turnaround:
    """Target turnaround per tier: how long a study may wait in a tier before it is overdue."""

    critical: timedelta = timedelta(minutes=15)
    urgent: timedelta = timedelta(minutes=60)
    routine: timedelta = timedelta(hours=24)

    def __post_init__(self) -> None:
        for tier in TIERS:
            if self.for_tier(tier) < timedelta(minutes=1):
                raise ValueError(f"the {tier} target turnaround must be at least one minute")

    def for_tier(self, tier: Tier) -> timedelta:
        match tier:
            case Tier.CRITICAL:
                return self.critical
            case Tier.URGENT:
                return self.urgent
            case Tier.ROUTINE:
                return self.routine


DEFAULT_TURNAROUND = Turnaround()

DEFAULT_ORDER_PRIORITY_TIERS: Mapping[OrderPriority, Tier] = MappingProxyType(
    {
        OrderPriority.STAT: Tier.URGENT,
        OrderPriority.HIGH: Tier.URGENT,
        OrderPriority.ROUTINE: Tier.ROUTINE,
        OrderPriority.MEDIUM: Tier.ROUTINE,
        OrderPriority.LOW: Tier.ROUTINE,
    }
)


@dataclass(frozen=True, init=False)
class PolicyConfig:
    """The tunable part of the policy; the defaults are the ones the module docstring describes.

    Parameters
    ----------
    turnaround
        Target turnaround per tier: critical 15 min, urgent 60 min, routine 24 h.
    modality_turnaround
        Targets for studies of some modalities, for example ``{"CT": Turnaround(routine=8 h)}``.
        A study with several modalities gets, per tier, the shortest target among those listed;
        a study with none listed gets ``turnaround``. Empty by default.
    order_priority_tiers
        The tier each order priority puts a study in; entries given replace the defaults (STAT and
        HIGH urgent, ROUTINE, MEDIUM and LOW routine), the others keep them.
    no_order_priority_tier
        The tier of a study whose order gave no priority: routine.
    escalation_steps
        How many tiers a study may climb by waiting past its target, 0 to 2: 1 by default, so a
        routine study can become urgent and an urgent one critical, but routine never critical.
    """

    turnaround: Turnaround
    modality_turnaround: Mapping[str, Turnaround]
    order_priority_tiers: Mapping[OrderPriority, Tier]
    no_order_priority_tier: Tier
    escalation_steps: int

    def __init__(
        self,
        *,
        turnaround: Turnaround = DEFAULT_TURNAROUND,
        modality_turnaround: Mapping[str, Turnaround] | None = None,
        order_priority_tiers: Mapping[OrderPriority, Tier] | Mapping[str, str] | None = None,
        no_order_priority_tier: str | Tier = Tier.ROUTINE,
        escalation_steps: int = 1,
    ) -> None:
        if not 0 <= escalation_steps <= len(TIERS) - 1:
            raise ValueError(f"escalation_steps must be 0 to {len(TIERS) - 1}")
        by_modality: dict[str, Turnaround] = {}
        for modality, targets in (modality_turnaround or {}).items():
            key = modality.strip().upper()
            if not key:
                raise ValueError("a modality in modality_turnaround is empty")
            by_modality[key] = targets
        order_tiers = dict(DEFAULT_ORDER_PRIORITY_TIERS)
        for order, tier in (order_priority_tiers or {}).items():
            parsed = OrderPriority.parse(order)
            if parsed is None:
                raise ValueError("an order priority in order_priority_tiers is empty")
            order_tiers[parsed] = Tier(tier)
        object.__setattr__(self, "turnaround", turnaround)
        object.__setattr__(self, "modality_turnaround", MappingProxyType(by_modality))
        object.__setattr__(self, "order_priority_tiers", MappingProxyType(order_tiers))
        object.__setattr__(self, "no_order_priority_tier", Tier(no_order_priority_tier))
        object.__setattr__(self, "escalation_steps", escalation_steps)

    def target(self, tier: Tier, modalities: Iterable[str]) -> timedelta:
        """The target turnaround in ``tier`` for a study of these (normalised) modalities."""
        overrides = [
            self.modality_turnaround[modality].for_tier(tier)
            for modality in modalities
            if modality in self.modality_turnaround
        ]
        return min(overrides, default=self.turnaround.for_tier(tier))

    def order_tier(self, order_priority: OrderPriority | None) -> Tier:
        """The tier the order's priority alone puts a study in."""
        if order_priority is None:
            return self.no_order_priority_tier
        return self.order_priority_tiers[order_priority]


@dataclass(frozen=True, kw_only=True)
class FindingSignal:
    """One model output as the policy sees it.

    ``positive`` is the model's own call at its operating point; ``threshold`` is that operating
    point on the probability scale; ``critical`` says whether this finding type is one that must be
    read first.
    """

    model: str
    label: str
    probability: float
    positive: bool
    threshold: float
    critical: bool
    volume_ml: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} is not between 0 and 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold} is not between 0 and 1")
        if self.volume_ml is not None and not (
            math.isfinite(self.volume_ml) and self.volume_ml >= 0.0
        ):
            raise ValueError(f"volume_ml {self.volume_ml} is not a finite volume")

    @property
    def flags_critical(self) -> bool:
        """Whether this finding lifts its study to the critical tier."""
        return self.critical and self.positive and self.probability >= self.threshold


def _split_modalities(modalities: str | Iterable[str]) -> tuple[str, ...]:
    # A DICOM multi-valued string such as Modalities in Study separates values with a backslash.
    values = modalities.split("\\") if isinstance(modalities, str) else modalities
    return tuple(sorted({value.strip().upper() for value in values} - {""}))


@dataclass(frozen=True, init=False)
class StudySignals:
    """Everything the policy looks at for one study.

    ``received_at`` starts the turnaround clock (when the study's first instance arrived);
    ``modalities`` takes a list or a backslash-separated DICOM value such as ``"CT\\SR"``.
    """

    study_uid: str
    received_at: datetime
    modalities: tuple[str, ...]
    order_priority: OrderPriority | None
    findings: tuple[FindingSignal, ...]
    analysis: AnalysisState

    def __init__(
        self,
        *,
        study_uid: str,
        received_at: datetime,
        modalities: str | Iterable[str] = (),
        order_priority: str | OrderPriority | None = None,
        findings: Iterable[FindingSignal] = (),
        analysis: str | AnalysisState = AnalysisState.PENDING,
    ) -> None:
        if not study_uid:
            raise ValueError("study_uid is empty")
        _require_aware("received_at", received_at)
        object.__setattr__(self, "study_uid", study_uid)
        object.__setattr__(self, "received_at", received_at)
        object.__setattr__(self, "modalities", _split_modalities(modalities))
        object.__setattr__(self, "order_priority", OrderPriority.parse(order_priority))
        object.__setattr__(self, "findings", tuple(findings))
        object.__setattr__(self, "analysis", AnalysisState(analysis))


@dataclass(frozen=True, init=False)
class Priority:
    """Where a study stands on the worklist, and why.

    ``score`` is the share of the current tier's target turnaround used (1.0 = due now); higher is
    read first within a tier. ``due_at`` is when that target runs out.
    """

    study_uid: str
    received_at: datetime
    tier: Tier
    score: float
    due_at: datetime
    reason: str
    severity: tuple[float, float]

    def __init__(
        self,
        *,
        study_uid: str,
        received_at: datetime,
        tier: str | Tier,
        score: float,
        due_at: datetime,
        reason: str,
        severity: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        if not math.isfinite(score):
            raise ValueError(f"score {score} is not finite")
        _require_aware("received_at", received_at)
        _require_aware("due_at", due_at)
        object.__setattr__(self, "study_uid", study_uid)
        object.__setattr__(self, "received_at", received_at)
        object.__setattr__(self, "tier", Tier(tier))
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "due_at", due_at)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "severity", severity)

    @property
    def tier_rank(self) -> int:
        return tier_rank(self.tier)

    @property
    def sort_key(self) -> tuple[int, float, float, float, datetime, str]:
        """Ascending order is reading order: tier, then score (highest first), severity
        (probability, then volume, highest first), arrival, UID."""
        probability, volume = self.severity
        return (
            self.tier_rank,
            -self.score,
            -probability,
            -volume,
            self.received_at,
            self.study_uid,
        )


def _duration(span: timedelta) -> str:
    hours, minutes = divmod(int(span.total_seconds() // 60), 60)
    if hours == 0:
        return f"{minutes} min"
    if minutes == 0:
        return f"{hours} h"
    return f"{hours} h {minutes} min"


def _describe_finding(finding: FindingSignal) -> str:
    if finding.volume_ml is None:
        return f"{finding.label}, p={finding.probability:.2f}"
    volume = finding.volume_ml
    shown = f"{volume:.0f}" if volume >= 10 else f"{volume:.2g}"
    return f"{finding.label} {shown} mL, p={finding.probability:.2f}"


def _describe_findings(flagged: list[FindingSignal]) -> str:
    noun = "finding" if len(flagged) == 1 else "findings"
    named = " and ".join(_describe_finding(finding) for finding in flagged[:_FINDINGS_NAMED])
    unnamed = len(flagged) - _FINDINGS_NAMED
    more = f" and {unnamed} more" if unnamed > 0 else ""
    return f"critical AI {noun}: {named}{more}"


def _describe_order(order_priority: OrderPriority | None) -> str:
    return "no order priority" if order_priority is None else f"{order_priority} order"


def _describe_analysis(analysis: AnalysisState, flagged: bool) -> str | None:
    match analysis:
        case AnalysisState.PENDING:
            return "AI analysis pending"
        case AnalysisState.FAILED:
            return "AI analysis failed"
        case AnalysisState.ANALYZED:
            return None if flagged else "no critical AI finding"


def _clip(text: str) -> str:
    if len(text) <= REASON_MAX_CHARS:
        return text
    return text[: REASON_MAX_CHARS - 1] + "…"


def compute_priority(signals: StudySignals, *, now: datetime, config: PolicyConfig) -> Priority:
    """The study's tier, score, due time and reason at ``now``, by the rules in the module doc."""
    _require_aware("now", now)
    flagged = sorted(
        (finding for finding in signals.findings if finding.flags_critical),
        key=lambda finding: (-finding.probability, finding.label, finding.model),
    )
    tier = Tier.CRITICAL if flagged else config.order_tier(signals.order_priority)
    causes = [_describe_findings(flagged)] if flagged else []
    causes.append(_describe_order(signals.order_priority))

    # The clock of the current tier starts at arrival, and again at each escalation.
    entered = signals.received_at
    target = config.target(tier, signals.modalities)
    overdue: list[str] = []
    for _ in range(config.escalation_steps):
        if tier is TIERS[0] or now <= entered + target:
            break
        higher = TIERS[tier_rank(tier) - 1]
        overdue.append(f"past {tier} target {_duration(target)}, escalated to {higher}")
        entered += target
        tier = higher
        target = config.target(tier, signals.modalities)
    due_at = entered + target
    # Waiting counts in whole minutes of the clock (rule 5).
    counted_from = entered.replace(second=0, microsecond=0)
    counted_to = now.replace(second=0, microsecond=0)
    if now > due_at:
        limit = "already the top tier" if tier is TIERS[0] else "no further escalation"
        overdue.append(f"past {tier} target {_duration(target)} ({limit})")

    analysis = _describe_analysis(signals.analysis, bool(flagged))
    notes = [analysis] if analysis else []
    worst = max(
        ((finding.probability, finding.volume_ml or 0.0) for finding in flagged),
        default=(0.0, 0.0),
    )
    return Priority(
        study_uid=signals.study_uid,
        received_at=signals.received_at,
        tier=tier,
        score=max(counted_to - counted_from, timedelta(0)) / target,
        due_at=due_at,
        reason=_clip("; ".join(overdue + causes + notes)),
        severity=worst,
    )


_Item = TypeVar("_Item")


def order_worklist(items: Iterable[tuple[_Item, Priority]]) -> list[tuple[_Item, Priority]]:
    """The worklist in reading order, most urgent first; each study may appear once."""
    ordered = sorted(items, key=lambda item: item[1].sort_key)
    seen: set[str] = set()
    for _, priority in ordered:
        if priority.study_uid in seen:
            raise ValueError(f"study {priority.study_uid} appears twice on the worklist")
        seen.add(priority.study_uid)
    return ordered


def describe_change(old: Priority | None, new: Priority) -> str | None:
    """Why the priority changed from ``old`` (None: not on the worklist yet), or None if it didn't.

    A change is worth recording when the tier, the reason or the due time changes, or when the
    score crosses a multiple of `SCORE_BAND` (a quarter of the target turnaround).
    """
    if old is None:
        return f"added as {new.tier}: {new.reason}"
    if old.study_uid != new.study_uid:
        raise ValueError(f"cannot compare study {old.study_uid} with study {new.study_uid}")
    if old.tier is not new.tier:
        direction = "raised" if new.tier_rank < old.tier_rank else "lowered"
        return f"{direction} from {old.tier} to {new.tier}: {new.reason}"
    if old.reason != new.reason:
        return f"still {new.tier}: {new.reason}"
    if old.due_at != new.due_at:
        due = new.due_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return f"now due {due}: {new.reason}"
    band = math.floor(new.score / SCORE_BAND)
    if math.floor(old.score / SCORE_BAND) != band:
        return f"{band * SCORE_BAND:.0%} of {new.tier} target used: {new.reason}"
    return None
