"""Device choice and CUDA out-of-memory handling, with the CUDA checks injected."""

from __future__ import annotations

import pytest
import torch

from triage.errors import PermanentError
from workers.models.devices import choose_device, with_oom_fallback


def test_cuda_when_present_cpu_otherwise() -> None:
    assert choose_device(cuda_available=lambda: True) == torch.device("cuda")
    assert choose_device(cuda_available=lambda: False) == torch.device("cpu")
    assert choose_device("cpu", cuda_available=lambda: True) == torch.device("cpu")
    assert choose_device("cuda", cuda_available=lambda: False) == torch.device("cpu")


def test_out_of_memory_frees_the_cache_and_retries_smaller() -> None:
    tried: list[int] = []
    emptied: list[bool] = []

    def run(batch: int) -> str:
        tried.append(batch)
        if batch > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return f"ran with {batch}"

    result = with_oom_fallback(run, (4, 2, 1), empty_cache=lambda: emptied.append(True))
    assert result == "ran with 1"
    assert tried == [4, 2, 1]
    assert len(emptied) == 2


def test_out_of_memory_at_every_size_fails_the_job_cleanly() -> None:
    def run(batch: int) -> str:
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at {batch}")

    with pytest.raises(PermanentError, match="batch size 1"):
        with_oom_fallback(run, (2, 1), empty_cache=lambda: None)
    # Other errors are not swallowed.
    with pytest.raises(ZeroDivisionError):
        with_oom_fallback(lambda batch: batch // 0, (1,), empty_cache=lambda: None)
