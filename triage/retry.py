"""How every retry in triage waits: analysis jobs, result deliveries and notifications.

One policy, set by two settings: the first retry waits about ``retry_backoff_seconds``, each next
one twice as long, never more than ``retry_backoff_max_seconds``. Each wait is drawn between half
and all of that nominal value, so retries that failed together (a PACS that went down with forty
results owed) spread out instead of returning together, yet none comes back at once. How many
attempts each kind of work gets is its own setting (``job_max_attempts``,
``delivery_max_attempts``).

Celery's own ``retry_backoff``/``retry_jitter`` are not used for the Celery tasks: their jitter
draws from zero to the nominal wait in whole seconds (a retry may come back at once, and a base
under a second rounds to no wait at all), and a delivery's wait must also outlast its
destination's pause. The tasks pass this policy's delay to ``task.retry(countdown=...)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

_RNG: random.Random = random.Random()  # noqa: S311 - jitter, not secrecy


class BackoffSettings(Protocol):
    """The settings the policy reads (``triage.config.Settings`` has them)."""

    @property
    def retry_backoff_seconds(self) -> float: ...

    @property
    def retry_backoff_max_seconds(self) -> float: ...


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff, capped, with jitter over the upper half of each wait."""

    base_seconds: float
    max_seconds: float

    @classmethod
    def from_settings(cls, settings: BackoffSettings) -> Backoff:
        return cls(settings.retry_backoff_seconds, settings.retry_backoff_max_seconds)

    def nominal(self, attempt: int) -> float:
        """The longest wait after failed attempt ``attempt`` (1 for the first)."""
        return min(self.max_seconds, self.base_seconds * 2.0 ** max(attempt - 1, 0))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt``: between half and all of
        ``nominal(attempt)``. ``rng`` is for tests that want a seeded draw."""
        ceiling = self.nominal(attempt)
        draw: float = (rng or _RNG).uniform(ceiling / 2, ceiling)
        return draw
