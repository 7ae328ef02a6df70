"""Device choice and CUDA out-of-memory handling, with the CUDA check injectable for tests."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from triage.errors import PermanentError

log = logging.getLogger(__name__)

T = TypeVar("T")


def choose_device(
    preferred: str = "auto", *, cuda_available: Callable[[], bool] = torch.cuda.is_available
) -> torch.device:
    """CUDA when present (or asked for), otherwise the CPU."""
    if preferred == "cpu":
        return torch.device("cpu")
    if cuda_available():
        return torch.device("cuda")
    if preferred == "cuda":
        log.warning("CUDA asked for but not available; using the CPU")
    return torch.device("cpu")


def with_oom_fallback(
    run: Callable[[int], T],
    batch_sizes: Sequence[int],
    *,
    empty_cache: Callable[[], None] = torch.cuda.empty_cache,
) -> T:
    """Run with the first batch size; after a CUDA out-of-memory error free the cache and try
    the next, smaller one. When none fits, fail the job cleanly: the worker stays usable."""
    for batch_size in batch_sizes:
        try:
            return run(batch_size)
        except torch.cuda.OutOfMemoryError:
            empty_cache()
            log.warning("CUDA out of memory; retrying", extra={"batch_size": batch_size})
    raise PermanentError(f"CUDA out of memory even with batch size {batch_sizes[-1]}")


def autocast(device: torch.device) -> torch.autocast:
    """Mixed precision on CUDA; a no-op context on the CPU."""
    return torch.autocast(device_type=device.type, enabled=device.type == "cuda")
