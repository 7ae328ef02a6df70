"""docs/conformance.md against a real ``triage serve``: the SOP Classes and Transfer Syntaxes it
lists are exactly those the listener accepts in association negotiation."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, build_context
from pynetdicom.sop_class import ModalityWorklistInformationFind

from tests.conftest import free_port
from tests.helpers.process import VENV_BIN, port_open, running

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)


def listed(section: str) -> list[str]:
    """The UIDs in the table under the heading that starts with ``section``."""
    text = DOC.read_text()
    start = text.index(f"##### {section}")
    end = text.index("\n#####", start + 1)
    return re.findall(r"^\|[^|]+\| `([0-9.]+)` \|$", text[start:end], flags=re.MULTILINE)


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    root = tmp_path_factory.mktemp("conformance")
    dicom_port = free_port()
    env = {
        "TRIAGE_DATA_DIR": str(root / "data"),
        "TRIAGE_DICOM_PORT": str(dicom_port),
        "TRIAGE_HTTP_PORT": str(free_port()),
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        "TRIAGE_WORKERS": "0",
    }
    with running(
        [str(VENV_BIN / "triage"), "serve"],
        env=env,
        log_file=root / "serve.log",
        ready=lambda: port_open(dicom_port),
    ):
        yield dicom_port


def accepted(port: int, contexts: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """(abstract syntax, transfer syntax) pairs the listener accepts, proposed one per context."""
    found: set[tuple[str, str]] = set()
    for first in range(0, len(contexts), MAX_CONTEXTS):
        ae = AE(ae_title="CONFORMANCE")
        ae.requested_contexts = [
            build_context(abstract, transfer)
            for abstract, transfer in contexts[first : first + MAX_CONTEXTS]
        ]
        assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
        assert assoc.is_established
        found |= {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        }
        assoc.release()
    return found


def test_the_sop_classes_listed_are_those_accepted(port: int) -> None:
    classes = listed("4.2.1.3")
    assert len(classes) > 100
    assert len(set(classes)) == len(classes)
    not_storage = str(ModalityWorklistInformationFind)
    proposed = [(uid, IMPLICIT_LE) for uid in [*classes, not_storage]]
    assert {abstract for abstract, _ in accepted(port, proposed)} == set(classes)


def test_the_transfer_syntaxes_listed_are_those_accepted(port: int) -> None:
    syntaxes = listed("4.2.1.4")
    assert IMPLICIT_LE in syntaxes
    unknown = "1.2.840.10008.1.2.4.1000"  # no such transfer syntax
    proposed = [(CT_IMAGE_STORAGE, uid) for uid in [*syntaxes, unknown]]
    assert {transfer for _, transfer in accepted(port, proposed)} == set(syntaxes)
