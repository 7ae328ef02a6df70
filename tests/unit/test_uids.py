"""UIDs: deterministic result UIDs under 2.25, random ones, and validation of received ones."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triage.dicom import uids
from triage.dicom.uids import ResultUid

STUDY = "1.2.826.0.1.3680043.8.498.1"


def _result_uid(kind: str | ResultUid = ResultUid.SEG_INSTANCE, **overrides: str) -> str:
    fields = {"study_uid": STUDY, "model_name": "ich-detector", "model_version": "1.0.0"}
    fields.update(overrides)
    return uids.result_uid(kind=kind, **fields)


def test_result_uid_is_deterministic_and_under_the_uuid_arc() -> None:
    first = _result_uid()
    assert first == _result_uid()
    assert first.startswith("2.25.")
    assert uids.is_valid_uid(first)


def test_result_uid_accepts_the_kind_as_text() -> None:
    assert _result_uid("sr-series") == _result_uid(ResultUid.SR_SERIES)
    with pytest.raises(ValueError, match="not-a-kind"):
        _result_uid("not-a-kind")


@pytest.mark.parametrize(
    "overrides",
    [
        {"study_uid": STUDY + "2"},
        {"model_name": "other-detector"},
        {"model_version": "1.0.1"},
    ],
)
def test_result_uid_changes_with_each_field(overrides: dict[str, str]) -> None:
    assert _result_uid(**overrides) != _result_uid()


def test_every_kind_has_its_own_uid() -> None:
    assert len({_result_uid(kind) for kind in ResultUid}) == len(ResultUid)


def test_fields_do_not_run_into_each_other() -> None:
    assert _result_uid(model_name="a b", model_version="c") != _result_uid(
        model_name="a", model_version="b c"
    )


def test_tracking_uid_is_deterministic_per_finding() -> None:
    def tracking(index: int) -> str:
        return uids.tracking_uid(
            study_uid=STUDY, model_name="m", model_version="1", finding_index=index
        )

    assert tracking(0) == tracking(0)
    assert tracking(0) != tracking(1)
    with pytest.raises(ValueError, match="negative"):
        tracking(-1)


def test_device_uid_depends_on_the_model_version_only() -> None:
    device = uids.device_uid(model_name="m", model_version="1")
    assert device == uids.device_uid(model_name="m", model_version="1")
    assert device != uids.device_uid(model_name="m", model_version="2")
    assert uids.is_valid_uid(device)


def test_new_uid_is_random_and_valid() -> None:
    first, second = uids.new_uid(), uids.new_uid()
    assert first != second
    assert uids.is_valid_uid(first)
    assert first.startswith("2.25.")


@pytest.mark.parametrize(
    "value",
    ["1.2.840.10008.1.2", "0", "0.0", "2.25.0", "1.20.300", "1." + "2" * 62],
)
def test_valid_uids(value: str) -> None:
    assert uids.is_valid_uid(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        ".1",
        "1.",
        "1..2",
        "01.2",
        "1.02",
        "00",
        "1.2a",
        "1.2 ",
        " 1.2",
        "1.2\n",
        "1.2\x00",
        "1,2",
        "-1.2",
        "1." + "2" * 63,
        "../etc/passwd",
        "\uff11.\uff12",  # full-width digits
    ],
)
def test_invalid_uids(value: str) -> None:
    assert not uids.is_valid_uid(value)


@given(study=st.text(), model=st.text(), version=st.text(), kind=st.sampled_from(ResultUid))
def test_result_uid_is_always_a_valid_uid(
    study: str, model: str, version: str, kind: ResultUid
) -> None:
    assert uids.is_valid_uid(
        uids.result_uid(study_uid=study, model_name=model, model_version=version, kind=kind)
    )
