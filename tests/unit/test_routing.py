from __future__ import annotations

import pytest

from triage.config import RoutingRule
from triage.ingest.routing import StudyFacts, rule_matches, select_models

HEAD_CT = StudyFacts(
    modalities=frozenset({"CT"}),
    body_parts=frozenset({"HEAD"}),
    study_description="CT HEAD WO CONTRAST",
    series_descriptions=frozenset({"AXIAL 5MM", "SCOUT"}),
    calling_ae="CT_SCANNER_1",
)


@pytest.mark.parametrize(
    ("rule", "matches"),
    [
        (RoutingRule(name="any", models=["m"]), True),
        (RoutingRule(name="ct", models=["m"], modalities=["ct"]), True),
        (RoutingRule(name="mr", models=["m"], modalities=["MR"]), False),
        (RoutingRule(name="brain", models=["m"], body_part="HEAD|BRAIN"), True),
        (RoutingRule(name="chest", models=["m"], body_part="CHEST"), False),
        (RoutingRule(name="desc", models=["m"], study_description="head"), True),
        (RoutingRule(name="series", models=["m"], series_description="^axial"), True),
        (RoutingRule(name="series-no", models=["m"], series_description="^coronal"), False),
        (RoutingRule(name="ae", models=["m"], calling_ae="^CT_SCANNER_"), True),
        (RoutingRule(name="ae-no", models=["m"], calling_ae="^MR_"), False),
        (
            RoutingRule(
                name="all", models=["m"], modalities=["CT"], body_part="HEAD", calling_ae="CT_"
            ),
            True,
        ),
        (RoutingRule(name="one-off", models=["m"], modalities=["CT"], body_part="KNEE"), False),
    ],
)
def test_rule_matches(rule: RoutingRule, matches: bool) -> None:
    assert rule_matches(rule, HEAD_CT) is matches


def test_select_models_in_rule_order_once_each() -> None:
    rules = [
        RoutingRule(name="a", models=["ich", "fracture"], modalities=["CT"]),
        RoutingRule(name="b", models=["fracture", "stroke"], body_part="HEAD"),
        RoutingRule(name="c", models=["lung"], body_part="CHEST"),
    ]
    assert select_models(rules, HEAD_CT) == ["ich", "fracture", "stroke"]
    assert select_models(rules, StudyFacts(modalities=frozenset({"MR"}))) == []
