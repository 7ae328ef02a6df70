"""A short mutation run: hand-picked mutants of the values the standard fixes and of the layers a
quiet regression would hurt most, each run against the tests that should kill it.

    .venv/bin/python scripts/mutants.py            # every mutant (about 6 minutes on 2 cores)
    .venv/bin/python scripts/mutants.py --list     # what each mutant changes
    .venv/bin/python scripts/mutants.py status-a700 retry-delivery

A mutant is one exact text replacement in one file; the run checks the text is still there (so a
refactoring cannot silently retire a mutant), runs pytest on the named tests with the file
changed, and puts the file back whatever happens. A mutant is *killed* when pytest fails. The
report lists the survivors and the exit status is 1 when there is one. PostgreSQL and Redis must be
running for the worker mutants (`scripts/services` starts them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = ROOT / ".venv" / "bin" / "pytest"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


RECEIVER_TESTS = ("tests/integration/test_receiver.py",)
RESULT_TESTS = ("tests/unit/test_result_builders.py",)
POLICY_TESTS = ("tests/unit/test_worklist_policy.py",)

MUTANTS = (
    Mutant(
        "status-a700",
        "triage/dicom/status.py",
        "OUT_OF_RESOURCES = 0xA700",
        "OUT_OF_RESOURCES = 0xC001",
        RECEIVER_TESTS,
        "Refused: Out of Resources is 0xA7xx (PS3.4 B.2.3)",
    ),
    Mutant(
        "status-a900",
        "triage/dicom/status.py",
        "DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900",
        "DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xC000",
        RECEIVER_TESTS,
        "Error: Data Set does not match SOP Class is 0xA9xx (PS3.4 B.2.3)",
    ),
    Mutant(
        "status-c000",
        "triage/dicom/status.py",
        "CANNOT_UNDERSTAND = 0xC000",
        "CANNOT_UNDERSTAND = 0xA900",
        RECEIVER_TESTS,
        "Error: Cannot understand is 0xCxxx (PS3.4 B.2.3)",
    ),
    Mutant(
        "status-0122",
        "triage/dicom/status.py",
        "SOP_CLASS_NOT_SUPPORTED = 0x0122",
        "SOP_CLASS_NOT_SUPPORTED = 0x0211",
        (*RECEIVER_TESTS, "tests/integration/test_upper_layer.py"),
        "Refused: SOP Class not supported is 0x0122 (PS3.7 C.5)",
    ),
    Mutant(
        "loinc-ct-head",
        "triage/results/inputs.py",
        'CT_HEAD = Code("24725-4", "LN", "CT Head")',
        'CT_HEAD = Code("99999-9", "LN", "CT Head")',
        RESULT_TESTS,
        "LOINC 24725-4 is CT Head, the procedure the SR reports",
    ),
    Mutant(
        "ihe-processing-algorithm",
        "triage/results/inputs.py",
        'PROCESSING_ALGORITHM = Code("1630", "99IHE", "Processing Algorithm")',
        'PROCESSING_ALGORITHM = Code("1631", "99IHE", "Processing Algorithm")',
        RESULT_TESTS,
        "IHE AIR's purpose of reference for the algorithm is (1630, 99IHE)",
    ),
    Mutant(
        "sct-present",
        "triage/results/sr.py",
        "PRESENT: Code = codes.SCT.Present",
        "PRESENT: Code = codes.SCT.Absent",
        RESULT_TESTS,
        "a positive finding is reported as SCT 52101004 Present",
    ),
    Mutant(
        "ucum-millilitre",
        "triage/results/sr.py",
        'MILLILITRE = Code("ml", "UCUM", "milliliter")',
        'MILLILITRE = Code("l", "UCUM", "milliliter")',
        RESULT_TESTS,
        "a finding's volume is in UCUM ml",
    ),
    Mutant(
        "socket-open-after-abort",
        "triage/receiver/upper.py",
        "            self.sock.sendall(_pdu(A_ABORT_TYPE, bytes([0, 0, source, reason])))\n",
        "            self.sock.sendall(_pdu(A_ABORT_TYPE, bytes([0, 0, source, reason])))\n"
        "            time.sleep(12)\n",
        ("tests/integration/test_upper_layer.py",),
        "after an A-ABORT the connection is closed (PS3.8 Sta13), not held open",
    ),
    Mutant(
        "policy-score-order",
        "triage/worklist/policy.py",
        "return (self.tier_rank, -self.score, self.received_at, self.study_uid)",
        "return (self.tier_rank, self.score, self.received_at, self.study_uid)",
        POLICY_TESTS,
        "within a tier the study that used more of its target is read first",
    ),
    Mutant(
        "policy-tier-order",
        "triage/worklist/policy.py",
        "TIERS: tuple[Tier, ...] = (Tier.CRITICAL, Tier.URGENT, Tier.ROUTINE)",
        "TIERS: tuple[Tier, ...] = (Tier.URGENT, Tier.CRITICAL, Tier.ROUTINE)",
        POLICY_TESTS,
        "critical studies are read before urgent ones",
    ),
    Mutant(
        "bundle-positive-class",
        "workers/models/bundle.py",
        "score = float(probabilities[self.positive_class])",
        "score = float(probabilities[0])",
        ("tests/integration/test_models.py",),
        "a bundle's score is the probability of its positive class",
    ),
    Mutant(
        "retry-delivery",
        "workers/tasks.py",
        "            raise task.retry(countdown=outcome.retry_in)\n",
        "            pass\n",
        (
            "tests/integration/test_workers.py::"
            "test_a_delivery_is_retried_by_its_own_task_with_the_settings_backoff",
        ),
        "a delivery that failed transiently is retried by its own Celery task",
    ),
)


def run(mutant: Mutant, verbose: bool) -> tuple[bool, float]:
    """Apply ``mutant``, run its tests, restore the file; (killed, seconds)."""
    path = ROOT / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(
            f"mutant {mutant.name}: its text is not in {mutant.path} exactly once; "
            "update the mutant to the current code"
        )
    started = time.monotonic()
    try:
        path.write_text(original.replace(mutant.old, mutant.new))
        result = subprocess.run(
            [str(PYTEST), "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
            cwd=ROOT,
            capture_output=not verbose,
            text=True,
            check=False,
        )
    finally:
        path.write_text(original)
    return result.returncode not in (0, 5), time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("-v", "--verbose", action="store_true", help="show pytest's output")
    args = parser.parse_args()
    known = {mutant.name: mutant for mutant in MUTANTS}
    if args.list:
        for mutant in MUTANTS:
            print(f"{mutant.name:26} {mutant.path}: {mutant.why}")
        return 0
    unknown = [name for name in args.names if name not in known]
    if unknown:
        print(f"unknown mutant(s): {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    chosen = [known[name] for name in args.names] or list(MUTANTS)
    survivors = []
    for mutant in chosen:
        killed, seconds = run(mutant, args.verbose)
        verdict = "killed  " if killed else "SURVIVED"
        print(f"{verdict} {mutant.name:26} {seconds:6.1f} s", flush=True)
        if not killed:
            survivors.append(mutant)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants killed")
    for mutant in survivors:
        print(f"survivor: {mutant.name} ({mutant.path}): {mutant.why}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
