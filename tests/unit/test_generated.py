"""The sync modules are generated from their asyncio sources and must match:
``ci/generate_sync.py --check`` fails on a stale, a hand-edited or a missing one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import absurd_sqla

PACKAGE = Path(absurd_sqla.__file__).parent
SCRIPT = PACKAGE.parent / "ci" / "generate_sync.py"
GENERATED = ["_db.py", "_ops.py", "context.py", "_execute.py", "client.py"]


def check(package: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--package", str(package)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_every_generated_module_is_current_and_says_so() -> None:
    result = check(PACKAGE)
    assert result.returncode == 0, result.stdout
    for name in GENERATED:
        first = (PACKAGE / name).read_text().splitlines()[0]
        assert first.startswith("# GENERATED from absurd_sqla/") and "do not edit" in first


def test_the_check_catches_a_hand_edit_a_stale_source_and_a_missing_module(
    tmp_path: Path,
) -> None:
    copy = tmp_path / "absurd_sqla"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert check(copy).returncode == 0

    edited = copy / "_ops.py"
    edited.write_text(edited.read_text().replace("CANCEL_ATTEMPTS = 50", "CANCEL_ATTEMPTS = 5"))
    result = check(copy)
    assert result.returncode == 1 and "absurd_sqla/_ops.py" in result.stdout

    shutil.copy(PACKAGE / "_ops.py", edited)
    source = copy / "context_async.py"
    source.write_text(source.read_text() + "\nSTALE = True\n")
    result = check(copy)
    assert result.returncode == 1 and "absurd_sqla/context.py" in result.stdout

    shutil.copy(PACKAGE / "context_async.py", source)
    (copy / "client.py").unlink()
    result = check(copy)
    assert result.returncode == 1 and "absurd_sqla/client.py" in result.stdout
