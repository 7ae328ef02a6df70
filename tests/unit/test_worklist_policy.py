from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triage.domain import Tier
from triage.worklist.policy import (
    REASON_MAX_CHARS,
    AnalysisState,
    FindingSignal,
    OrderPriority,
    PolicyConfig,
    Priority,
    StudySignals,
    Turnaround,
    compute_priority,
    describe_change,
    order_worklist,
)

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
CONFIG = PolicyConfig()
RANKS = {Tier.CRITICAL: 0, Tier.URGENT: 1, Tier.ROUTINE: 2}
PROPERTIES = settings(max_examples=60, deadline=None)


def finding(
    *,
    label: str = "hyperdensity",
    probability: float = 0.97,
    positive: bool = True,
    threshold: float = 0.5,
    critical: bool = True,
    volume_ml: float | None = 12.0,
) -> FindingSignal:
    return FindingSignal(
        model="ich-ct",
        label=label,
        probability=probability,
        positive=positive,
        threshold=threshold,
        critical=critical,
        volume_ml=volume_ml,
    )


def study(
    uid: str = "1.2.3",
    *,
    received_at: datetime = T0,
    order_priority: str | None = None,
    findings: tuple[FindingSignal, ...] = (),
    analysis: AnalysisState = AnalysisState.ANALYZED,
    modalities: str = "CT",
) -> StudySignals:
    return StudySignals(
        study_uid=uid,
        received_at=received_at,
        modalities=modalities,
        order_priority=order_priority,
        findings=findings,
        analysis=analysis,
    )


def priority_after(
    signals: StudySignals, wait: timedelta, config: PolicyConfig = CONFIG
) -> Priority:
    return compute_priority(signals, now=signals.received_at + wait, config=config)


# Examples: tiers


def test_critical_positive_finding_lifts_a_routine_study_to_critical() -> None:
    priority = priority_after(study(findings=(finding(),)), timedelta(minutes=5))
    assert priority.tier is Tier.CRITICAL
    assert priority.tier_rank == 0
    assert priority.due_at == T0 + timedelta(minutes=15)
    assert priority.score == pytest.approx(5 / 15)
    assert priority.reason == "critical AI finding: hyperdensity 12 mL, p=0.97; no order priority"


@pytest.mark.parametrize(
    "uncounted",
    [
        pytest.param(finding(probability=0.4, threshold=0.5), id="below-threshold"),
        pytest.param(finding(positive=False), id="negative-at-operating-point"),
        pytest.param(finding(critical=False), id="finding-type-not-critical"),
    ],
)
def test_findings_that_do_not_count_leave_a_study_routine(uncounted: FindingSignal) -> None:
    priority = priority_after(study(findings=(uncounted,)), timedelta(minutes=5))
    assert priority.tier is Tier.ROUTINE
    assert "critical AI finding:" not in priority.reason


def test_several_critical_findings_are_named_strongest_first() -> None:
    findings = (
        finding(label="a", probability=0.6, volume_ml=None),
        finding(label="b", probability=0.9, volume_ml=3.25),
        finding(label="c", probability=0.7, volume_ml=150.4),
        finding(label="d", probability=0.8),
        finding(label="e", probability=0.65),
    )
    reason = priority_after(study(findings=findings), timedelta(0)).reason
    assert reason.startswith(
        "critical AI findings: b 3.2 mL, p=0.90 and d 12 mL, p=0.80 and c 150 mL, p=0.70 and 2 more"
    )


@pytest.mark.parametrize(
    ("order_priority", "tier", "shown"),
    [
        ("STAT", Tier.URGENT, "STAT order"),
        (" stat ", Tier.URGENT, "STAT order"),
        ("HIGH", Tier.URGENT, "HIGH order"),
        ("ROUTINE", Tier.ROUTINE, "ROUTINE order"),
        ("MEDIUM", Tier.ROUTINE, "MEDIUM order"),
        ("LOW", Tier.ROUTINE, "LOW order"),
        (None, Tier.ROUTINE, "no order priority"),
        ("", Tier.ROUTINE, "no order priority"),
    ],
)
def test_order_priority_sets_the_tier(order_priority: str | None, tier: Tier, shown: str) -> None:
    priority = priority_after(study(order_priority=order_priority), timedelta(minutes=1))
    assert priority.tier is tier
    assert priority.reason == f"{shown}; no critical AI finding"


def test_an_unknown_order_priority_is_refused_at_the_boundary() -> None:
    with pytest.raises(ValueError, match="'ASAP' is not one of STAT, HIGH"):
        study(order_priority="ASAP")


def test_order_priority_tiers_override_only_the_entries_given() -> None:
    config = PolicyConfig(order_priority_tiers={"medium": "urgent"})
    assert config.order_tier(OrderPriority.MEDIUM) is Tier.URGENT
    assert config.order_tier(OrderPriority.STAT) is Tier.URGENT
    assert config.order_tier(OrderPriority.LOW) is Tier.ROUTINE
    assert config.order_tier(None) is Tier.ROUTINE
    assert PolicyConfig(no_order_priority_tier="urgent").order_tier(None) is Tier.URGENT


@pytest.mark.parametrize(
    ("analysis", "note"),
    [
        (AnalysisState.PENDING, "AI analysis pending"),
        (AnalysisState.FAILED, "AI analysis failed"),
        (AnalysisState.ANALYZED, "no critical AI finding"),
    ],
)
def test_analysis_state_is_told_but_never_changes_the_tier(
    analysis: AnalysisState, note: str
) -> None:
    priority = priority_after(study(order_priority="HIGH", analysis=analysis), timedelta(0))
    assert priority.tier is Tier.URGENT
    assert priority.reason == f"HIGH order; {note}"


# Examples: waiting and escalation


def test_score_is_the_share_of_the_target_used() -> None:
    signals = study()
    assert priority_after(signals, timedelta(0)).score == 0.0
    assert priority_after(signals, timedelta(hours=6)).score == pytest.approx(0.25)
    at_target = priority_after(signals, timedelta(hours=24))
    assert at_target.tier is Tier.ROUTINE
    assert at_target.score == 1.0


def test_routine_study_past_its_target_escalates_once_with_a_fresh_clock() -> None:
    priority = priority_after(study(), timedelta(hours=24, minutes=30))
    assert priority.tier is Tier.URGENT
    assert priority.due_at == T0 + timedelta(hours=25)
    assert priority.score == pytest.approx(0.5)
    assert priority.reason.startswith("past routine target 24 h, escalated to urgent; ")

    later = priority_after(study(), timedelta(hours=30))
    assert later.tier is Tier.URGENT
    assert later.reason.startswith(
        "past routine target 24 h, escalated to urgent; "
        "past urgent target 1 h (no further escalation); "
    )


def test_stat_study_past_its_target_becomes_critical() -> None:
    priority = priority_after(study(order_priority="STAT"), timedelta(minutes=70))
    assert priority.tier is Tier.CRITICAL
    assert priority.due_at == T0 + timedelta(minutes=75)
    assert priority.reason.startswith("past urgent target 1 h, escalated to critical; STAT order")


def test_critical_study_past_its_target_stays_on_top_and_says_so() -> None:
    priority = priority_after(study(findings=(finding(),)), timedelta(minutes=30))
    assert priority.tier is Tier.CRITICAL
    assert priority.score == pytest.approx(2.0)
    assert priority.reason.startswith("past critical target 15 min (already the top tier); ")


@pytest.mark.parametrize(
    ("steps", "tier"), [(0, Tier.ROUTINE), (1, Tier.URGENT), (2, Tier.CRITICAL)]
)
def test_escalation_steps_bound_how_far_waiting_climbs(steps: int, tier: Tier) -> None:
    config = PolicyConfig(escalation_steps=steps)
    assert priority_after(study(), timedelta(hours=26), config).tier is tier


def test_modality_override_takes_the_shortest_target_of_the_study() -> None:
    config = PolicyConfig(
        modality_turnaround={
            "ct": Turnaround(routine=timedelta(hours=8)),
            "PT": Turnaround(routine=timedelta(hours=12)),
        }
    )
    assert (
        priority_after(study(modalities="PT\\CT"), timedelta(hours=9), config).tier is Tier.URGENT
    )
    assert priority_after(study(modalities="PT"), timedelta(hours=9), config).tier is Tier.ROUTINE
    assert priority_after(study(modalities="MR"), timedelta(hours=23), config).tier is Tier.ROUTINE


def test_a_receipt_time_in_the_future_counts_as_just_received() -> None:
    priority = compute_priority(study(), now=T0 - timedelta(minutes=5), config=CONFIG)
    assert (priority.tier, priority.score) == (Tier.ROUTINE, 0.0)


def test_reason_fits_the_database_column() -> None:
    findings = tuple(finding(label="x" * 200, probability=0.9 - i / 100) for i in range(5))
    reason = priority_after(study(findings=findings), timedelta(hours=1)).reason
    assert len(reason) == REASON_MAX_CHARS
    assert reason.endswith("…")


# Examples: validation at the boundary


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: study(received_at=datetime(2024, 5, 1)), id="naive-received-at"),
        pytest.param(lambda: study(uid=""), id="empty-uid"),
        pytest.param(lambda: finding(probability=1.5), id="probability"),
        pytest.param(lambda: finding(threshold=float("nan")), id="threshold"),
        pytest.param(lambda: finding(volume_ml=-1.0), id="volume"),
        pytest.param(lambda: Turnaround(urgent=timedelta(0)), id="turnaround"),
        pytest.param(lambda: PolicyConfig(escalation_steps=3), id="escalation-steps"),
        pytest.param(lambda: PolicyConfig(order_priority_tiers={"STAT": "soon"}), id="tier"),
        pytest.param(
            lambda: StudySignals(study_uid="1.2", received_at=T0, analysis="done"), id="analysis"
        ),
    ],
)
def test_bad_values_are_refused(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        build()


def test_now_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError, match="now must be a timezone-aware"):
        compute_priority(study(), now=datetime(2024, 5, 1, 9), config=CONFIG)


# Examples: ordering and change descriptions


def test_worklist_order_critical_then_urgent_then_routine_oldest_first() -> None:
    now = T0 + timedelta(hours=1)
    signals = [
        study("1.1", received_at=T0),
        study("1.2", received_at=T0 + timedelta(minutes=50), order_priority="STAT"),
        study("1.3", received_at=T0 + timedelta(minutes=55), findings=(finding(),)),
        study("1.4", received_at=T0 + timedelta(minutes=10), order_priority="HIGH"),
        study("1.0", received_at=T0),
    ]
    items = [(s, compute_priority(s, now=now, config=CONFIG)) for s in signals]
    ordered = [s.study_uid for s, _ in order_worklist(items)]
    assert ordered == ["1.3", "1.4", "1.2", "1.0", "1.1"]


def test_at_equal_waiting_time_the_larger_finding_is_read_first() -> None:
    # Issue 19: a 0.76 mL finding sat above a 90 mL one because it arrived a second earlier.
    small = study(
        "1.1", received_at=T0 + timedelta(seconds=10), findings=(finding(volume_ml=0.76),)
    )
    large = study("1.2", received_at=T0 + timedelta(seconds=11), findings=(finding(volume_ml=90),))
    now = T0 + timedelta(minutes=3, seconds=20)
    items = [(s, compute_priority(s, now=now, config=CONFIG)) for s in (small, large)]
    assert [s.study_uid for s, _ in order_worklist(items)] == ["1.2", "1.1"]


def test_severity_is_probability_first_then_volume() -> None:
    likely = study("1.1", findings=(finding(probability=0.99, volume_ml=1.0),))
    larger = study("1.2", findings=(finding(probability=0.90, volume_ml=60.0),))
    now = T0 + timedelta(minutes=2)
    items = [(s, compute_priority(s, now=now, config=CONFIG)) for s in (larger, likely)]
    assert [s.study_uid for s, _ in order_worklist(items)] == ["1.1", "1.2"]


def test_severity_never_puts_a_later_minute_ahead() -> None:
    earlier = study(
        "1.1", received_at=T0 - timedelta(seconds=5), findings=(finding(volume_ml=0.5),)
    )
    later = study("1.2", received_at=T0 + timedelta(seconds=5), findings=(finding(volume_ml=90),))
    now = T0 + timedelta(minutes=4)
    items = [(s, compute_priority(s, now=now, config=CONFIG)) for s in (later, earlier)]
    assert [s.study_uid for s, _ in order_worklist(items)] == ["1.1", "1.2"]


def test_a_study_may_appear_once_on_the_worklist() -> None:
    priority = priority_after(study(), timedelta(0))
    with pytest.raises(ValueError, match="appears twice"):
        order_worklist([("a", priority), ("b", priority)])


def test_describe_change() -> None:
    signals = study()
    first = priority_after(signals, timedelta(hours=1))
    assert (
        describe_change(None, first)
        == "added as routine: no order priority; no critical AI finding"
    )
    assert describe_change(first, priority_after(signals, timedelta(hours=2))) is None
    assert describe_change(first, priority_after(signals, timedelta(hours=13))) == (
        "50% of routine target used: no order priority; no critical AI finding"
    )
    escalated = priority_after(signals, timedelta(hours=25))
    assert describe_change(first, escalated) == (
        "raised from routine to urgent: past routine target 24 h, escalated to urgent; "
        "no order priority; no critical AI finding"
    )
    flagged = priority_after(study(findings=(finding(),)), timedelta(minutes=1))
    lowered = describe_change(flagged, first)
    assert lowered is not None
    assert lowered.startswith("lowered from critical to routine: ")
    failed = priority_after(study(analysis=AnalysisState.FAILED), timedelta(hours=1))
    assert describe_change(first, failed) == (
        "still routine: no order priority; AI analysis failed"
    )
    other = priority_after(study("9.9"), timedelta(hours=1))
    with pytest.raises(ValueError, match="cannot compare"):
        describe_change(first, other)


def test_describe_change_sees_no_change_after_a_round_trip_through_stored_values() -> None:
    # The service rebuilds the old priority from a WorklistEntry row: tier as text, UTC times.
    new = compute_priority(
        study(received_at=T0.astimezone(timezone(timedelta(hours=2)))),
        now=T0 + timedelta(hours=3),
        config=CONFIG,
    )
    stored = Priority(
        study_uid=new.study_uid,
        received_at=new.received_at.astimezone(UTC),
        tier=str(new.tier),
        score=new.score,
        due_at=new.due_at.astimezone(UTC),
        reason=new.reason,
    )
    assert describe_change(stored, new) is None
    moved = Priority(
        study_uid=new.study_uid,
        received_at=new.received_at,
        tier=new.tier,
        score=new.score,
        due_at=new.due_at + timedelta(hours=1),
        reason=new.reason,
    )
    assert describe_change(moved, new) == (
        "now due 2024-05-02 08:00 UTC: no order priority; no critical AI finding"
    )


# Properties

ZONES = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5))])
WAITS = st.integers(min_value=0, max_value=4 * 24 * 3600).map(lambda s: timedelta(seconds=s))
ROUTINE_ORDERS = st.sampled_from([None, "ROUTINE", "MEDIUM", "LOW"])
ANY_ORDER = st.one_of(st.none(), st.sampled_from(list(OrderPriority)))
MODALITIES = st.lists(st.sampled_from(["CT", "MR", "CR", "PT"]), max_size=2)
UNIT = st.floats(min_value=0.0, max_value=1.0)


@st.composite
def received_times(draw: st.DrawFn) -> datetime:
    # Few distinct instants, so that ties on arrival are common.
    minutes = draw(st.integers(min_value=0, max_value=6)) * 30
    return (T0 + timedelta(minutes=minutes)).astimezone(draw(ZONES))


@st.composite
def findings(draw: st.DrawFn, *, flagging: bool | None = None) -> FindingSignal:
    """Any finding; with ``flagging`` one that does (True) or does not (False) flag critical."""
    candidate = FindingSignal(
        model=draw(st.sampled_from(["ich-ct", "pe-cta", "nodule-ct"])),
        label=draw(st.sampled_from(["hyperdensity", "embolus", "nodule"])),
        probability=draw(UNIT),
        positive=draw(st.booleans()),
        threshold=draw(UNIT),
        critical=draw(st.booleans()),
        volume_ml=draw(st.none() | st.floats(min_value=0.0, max_value=500.0)),
    )
    if flagging is True:
        low, high = sorted((candidate.probability, candidate.threshold))
        return replace(candidate, probability=high, threshold=low, positive=True, critical=True)
    if flagging is False and candidate.flags_critical:
        return replace(candidate, positive=False)
    return candidate


@st.composite
def configs(draw: st.DrawFn) -> PolicyConfig:
    minutes = st.integers(min_value=1, max_value=48 * 60).map(lambda m: timedelta(minutes=m))
    override = st.builds(Turnaround, critical=minutes, urgent=minutes, routine=minutes)
    return PolicyConfig(
        turnaround=draw(override),
        modality_turnaround=draw(st.dictionaries(st.sampled_from(["CT", "PT"]), override)),
        escalation_steps=draw(st.integers(min_value=0, max_value=2)),
    )


@st.composite
def studies(
    draw: st.DrawFn,
    *,
    uid: str = "1.2.3",
    received_at: datetime | None = None,
    order: st.SearchStrategy[str | OrderPriority | None] = ANY_ORDER,
    finding_list: st.SearchStrategy[list[FindingSignal]] | None = None,
    modalities: list[str] | None = None,
) -> StudySignals:
    return StudySignals(
        study_uid=uid,
        received_at=received_at if received_at is not None else draw(received_times()),
        modalities=modalities if modalities is not None else draw(MODALITIES),
        order_priority=draw(order),
        findings=draw(
            finding_list if finding_list is not None else st.lists(findings(), max_size=3)
        ),
        analysis=draw(st.sampled_from(list(AnalysisState))),
    )


@PROPERTIES
@given(data=st.data(), config=configs(), wait=WAITS, received_at=received_times())
def test_critical_positive_outranks_routine_negative_received_together(
    data: st.DataObject, config: PolicyConfig, wait: timedelta, received_at: datetime
) -> None:
    modalities = data.draw(MODALITIES)
    flagged = data.draw(
        studies(
            uid="2.2",
            received_at=received_at,
            modalities=modalities,
            finding_list=st.lists(findings(flagging=True), min_size=1, max_size=2),
        )
    )
    negative = data.draw(
        studies(
            uid="1.1",
            received_at=received_at,
            modalities=modalities,
            order=ROUTINE_ORDERS,
            finding_list=st.lists(findings(flagging=False), max_size=2),
        )
    )
    now = received_at + wait
    high = compute_priority(flagged, now=now, config=config)
    low = compute_priority(negative, now=now, config=config)
    assert high.tier is Tier.CRITICAL
    assert high.sort_key < low.sort_key
    ordered = order_worklist([(negative, low), (flagged, high)])
    assert [s.study_uid for s, _ in ordered] == ["2.2", "1.1"]


@PROPERTIES
@given(
    signals=studies(),
    wait=WAITS,
    critical=st.integers(min_value=1, max_value=120),
    urgent=st.integers(min_value=1, max_value=600),
    routine=st.integers(min_value=1, max_value=3000),
    steps=st.integers(min_value=1, max_value=2),
)
def test_no_study_stays_past_its_target_without_escalating(
    signals: StudySignals, wait: timedelta, critical: int, urgent: int, routine: int, steps: int
) -> None:
    targets = {Tier.CRITICAL: critical, Tier.URGENT: urgent, Tier.ROUTINE: routine}
    config = PolicyConfig(
        turnaround=Turnaround(
            critical=timedelta(minutes=critical),
            urgent=timedelta(minutes=urgent),
            routine=timedelta(minutes=routine),
        ),
        escalation_steps=steps,
    )
    flagged = any(f.flags_critical for f in signals.findings)
    base = Tier.CRITICAL if flagged else config.order_tier(signals.order_priority)
    target = timedelta(minutes=targets[base])
    priority = priority_after(signals, wait, config)
    if wait > target:
        assert priority.tier_rank < RANKS[base] or priority.tier is Tier.CRITICAL
        assert f"past {base} target" in priority.reason
    else:
        assert priority.tier is base
        assert "past " not in priority.reason
        assert priority.due_at == signals.received_at + target


@PROPERTIES
@given(data=st.data(), config=configs(), wait=WAITS)
def test_worklist_order_is_total_and_stable(
    data: st.DataObject, config: PolicyConfig, wait: timedelta
) -> None:
    count = data.draw(st.integers(min_value=2, max_value=8))
    signals = [data.draw(studies(uid=f"1.2.{n}")) for n in range(count)]
    now = T0 + wait
    items = [(s, compute_priority(s, now=now, config=config)) for s in signals]
    keys = [p.sort_key for _, p in items]
    for a, b in itertools.permutations(keys, 2):
        assert (a < b) != (b < a)  # total and antisymmetric over distinct studies
    for a, b, c in itertools.permutations(keys, 3):
        if a < b and b < c:
            assert a < c
    ordered = order_worklist(items)
    assert order_worklist(data.draw(st.permutations(items))) == ordered
    for (_, first), (_, second) in itertools.pairwise(ordered):
        assert first.tier_rank <= second.tier_rank
        if first.tier is second.tier:
            assert first.score >= second.score


@PROPERTIES
@given(signals=studies(), config=configs(), first=WAITS, more=WAITS)
def test_waiting_longer_never_lowers_priority(
    signals: StudySignals, config: PolicyConfig, first: timedelta, more: timedelta
) -> None:
    earlier = priority_after(signals, first, config)
    later = priority_after(signals, first + more, config)
    assert later.sort_key <= earlier.sort_key


@PROPERTIES
@given(
    signals=studies(finding_list=st.lists(findings(flagging=False), min_size=1, max_size=3)),
    config=configs(),
    wait=WAITS,
)
def test_negative_findings_never_raise_a_study(
    signals: StudySignals, config: PolicyConfig, wait: timedelta
) -> None:
    without = StudySignals(
        study_uid=signals.study_uid,
        received_at=signals.received_at,
        modalities=signals.modalities,
        order_priority=signals.order_priority,
        analysis=signals.analysis,
    )
    with_findings = priority_after(signals, wait, config)
    order_only = priority_after(without, wait, config)
    assert with_findings.sort_key == order_only.sort_key
    assert with_findings.due_at == order_only.due_at


@PROPERTIES
@given(signals=studies(), config=configs(), wait=WAITS)
def test_describe_change_is_silent_only_when_nothing_changed(
    signals: StudySignals, config: PolicyConfig, wait: timedelta
) -> None:
    priority = priority_after(signals, wait, config)
    assert describe_change(priority, priority) is None
    later = priority_after(signals, wait + timedelta(days=3), config)
    if later.tier is not priority.tier or later.reason != priority.reason:
        assert describe_change(priority, later) is not None


@PROPERTIES
@given(
    data=st.data(),
    config=configs(),
    wait=WAITS,
    minute=st.integers(min_value=0, max_value=3),
    seconds=st.tuples(st.integers(0, 59), st.integers(0, 59)),
)
def test_within_a_minute_severity_orders_and_across_minutes_arrival_does(
    data: st.DataObject,
    config: PolicyConfig,
    wait: timedelta,
    minute: int,
    seconds: tuple[int, int],
) -> None:
    """Two critical studies of the same modalities: arrived in the same minute, the more severe
    one is read first; arrived in different minutes, the earlier one is, however severe the
    later one (nothing starves)."""
    modalities = data.draw(MODALITIES)
    flagging = st.lists(findings(flagging=True), min_size=1, max_size=2)
    first_at = T0 + timedelta(seconds=seconds[0])
    second_at = T0 + timedelta(minutes=minute, seconds=seconds[1])
    a = data.draw(
        studies(uid="1.1", received_at=first_at, modalities=modalities, finding_list=flagging)
    )
    b = data.draw(
        studies(uid="1.2", received_at=second_at, modalities=modalities, finding_list=flagging)
    )
    now = second_at + wait
    pa, pb = (compute_priority(s, now=now, config=config) for s in (a, b))
    if pa.tier is not pb.tier:
        return  # one escalated past the other; tiers come first
    if minute == 0:
        if pa.severity != pb.severity:
            assert (pa.sort_key < pb.sort_key) == (pa.severity > pb.severity)
    else:
        assert pa.sort_key < pb.sort_key
