"""Routing rules: which models apply to a completed study. Pure: no I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from triage.config import RoutingRule


@dataclass(frozen=True)
class StudyFacts:
    """What rules look at, gathered from the study's index rows."""

    modalities: frozenset[str] = field(default_factory=frozenset)
    body_parts: frozenset[str] = field(default_factory=frozenset)
    study_description: str = ""
    series_descriptions: frozenset[str] = field(default_factory=frozenset)
    calling_ae: str = ""


def _search(pattern: str | None, values: Iterable[str]) -> bool:
    if pattern is None:
        return True
    compiled = re.compile(pattern, re.IGNORECASE)
    return any(compiled.search(value) for value in values)


def rule_matches(rule: RoutingRule, facts: StudyFacts) -> bool:
    """Every condition the rule gives must hold; a condition left out always holds."""
    if rule.modalities and not {m.upper() for m in rule.modalities} & facts.modalities:
        return False
    return (
        _search(rule.body_part, facts.body_parts)
        and _search(rule.study_description, [facts.study_description])
        and _search(rule.series_description, facts.series_descriptions)
        and _search(rule.calling_ae, [facts.calling_ae])
    )


def select_models(rules: Iterable[RoutingRule], facts: StudyFacts) -> list[str]:
    """Model names of every matching rule, each once, in rule order."""
    selected: dict[str, None] = {}
    for rule in rules:
        if rule_matches(rule, facts):
            selected.update(dict.fromkeys(rule.models))
    return list(selected)
