"""The one retry policy: exponential, capped, jitter over the upper half of each wait."""

from __future__ import annotations

import random

import pytest

from triage.retry import Backoff


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [(1, 2.5, 5.0), (2, 5.0, 10.0), (3, 10.0, 20.0), (7, 150.0, 300.0), (8, 150.0, 300.0)],
)
def test_each_wait_is_half_to_all_of_base_doubled_per_attempt_up_to_the_cap(
    attempt: int, low: float, high: float
) -> None:
    backoff = Backoff(base_seconds=5.0, max_seconds=300.0)
    draws = [backoff.delay(attempt, random.Random(seed)) for seed in range(200)]
    assert all(low <= d <= high for d in draws)
    # Jitter spreads the waits over the whole band, not one point of it.
    assert min(draws) < low + (high - low) * 0.1
    assert max(draws) > high - (high - low) * 0.1


def test_the_same_seed_gives_the_same_wait() -> None:
    backoff = Backoff(base_seconds=0.5, max_seconds=10.0)
    assert backoff.delay(3, random.Random(7)) == backoff.delay(3, random.Random(7))


def test_sub_second_bases_still_wait() -> None:
    assert Backoff(base_seconds=0.2, max_seconds=1.0).delay(1) >= 0.1
