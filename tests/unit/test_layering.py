"""The layering rules of docs/ARCHITECTURE.md hold, and an import that breaks one fails
`lint-imports` (run by `make test`) with the broken contract named."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.process import VENV_BIN

ROOT = Path(__file__).resolve().parents[2]


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports analyses the packages found from its working directory first.
    return subprocess.run(
        [str(VENV_BIN / "lint-imports"), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_of_the_sources(destination: Path) -> Path:
    def not_python(directory: str, names: list[str]) -> list[str]:
        return [
            name
            for name in names
            if (not name.endswith(".py") and not (Path(directory) / name).is_dir())
            or name == "__pycache__"
        ]

    for package in ("triage", "workers"):
        shutil.copytree(ROOT / package, destination / package, ignore=not_python)
    shutil.copy(ROOT / "pyproject.toml", destination / "pyproject.toml")
    return destination


def test_the_repository_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "chain"),
    [
        # triage never imports workers
        ("triage/peers.py", "import workers.context", "triage.peers -> workers.context"),
        # the worklist policy is pure: no database code
        ("triage/worklist/policy.py", "import sqlalchemy", "triage.worklist.policy -> sqlalchemy"),
        # DICOM encoding opens no connections
        ("triage/dicom/uids.py", "import httpx", "triage.dicom.uids -> httpx"),
        # the database layer does not reach up into the HTTP API
        ("triage/db/base.py", "import triage.api.app", "triage.db.base -> triage.api.app"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    tmp_path: Path, module: str, line: str, chain: str
) -> None:
    root = copy_of_the_sources(tmp_path)
    assert lint_imports(root).returncode == 0  # the copy is as clean as the repository
    with (root / module).open("a") as source:
        source.write(f"\n{line}  # noqa: E402,F401\n")
    result = lint_imports(root)
    assert result.returncode == 1
    assert "1 broken" in result.stdout
    assert chain in result.stdout
    broken = [row for row in result.stdout.splitlines() if row.rstrip().endswith("BROKEN")]
    assert broken, result.stdout


def test_the_worklist_policy_loads_without_sqlalchemy() -> None:
    code = "import sys, triage.worklist.policy; assert 'sqlalchemy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
