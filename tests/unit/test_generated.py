"""The sync modules, and the sync twins of the async behaviour tests, are
generated from their asyncio sources and must match: ``ci/generate_sync.py
--check`` fails on a stale, a hand-edited or a missing one."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import absurd_sqla

PACKAGE = Path(absurd_sqla.__file__).parent
ROOT = PACKAGE.parent
SCRIPT = ROOT / "ci" / "generate_sync.py"
GENERATED = ["_db.py", "_ops.py", "context.py", "_execute.py", "client.py"]
TESTS = {
    "tests/integration/test_async_client.py": "tests/integration/test_gen_sync_client.py",
    "tests/integration/test_async_context.py": "tests/integration/test_gen_sync_context.py",
}


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_sync", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_module_is_current_and_says_so() -> None:
    result = check()
    assert result.returncode == 0, result.stdout
    for name in GENERATED:
        first = (PACKAGE / name).read_text().splitlines()[0]
        assert first.startswith("# GENERATED from absurd_sqla/") and "do not edit" in first
    assert generator().TESTS == TESTS
    for source, target in TESTS.items():
        first = (ROOT / target).read_text().splitlines()[0]
        assert first == f"# GENERATED from {source} by ci/generate_sync.py: do not edit."


def test_the_check_catches_a_hand_edit_a_stale_source_and_a_missing_module(
    tmp_path: Path,
) -> None:
    copy = tmp_path / "absurd_sqla"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert check("--package", str(copy)).returncode == 0

    edited = copy / "_ops.py"
    edited.write_text(edited.read_text().replace("CANCEL_ATTEMPTS = 50", "CANCEL_ATTEMPTS = 5"))
    result = check("--package", str(copy))
    assert result.returncode == 1 and "absurd_sqla/_ops.py" in result.stdout

    shutil.copy(PACKAGE / "_ops.py", edited)
    source = copy / "context_async.py"
    source.write_text(source.read_text() + "\nSTALE = True\n")
    result = check("--package", str(copy))
    assert result.returncode == 1 and "absurd_sqla/context.py" in result.stdout

    shutil.copy(PACKAGE / "context_async.py", source)
    (copy / "client.py").unlink()
    result = check("--package", str(copy))
    assert result.returncode == 1 and "absurd_sqla/client.py" in result.stdout


def test_the_check_catches_a_hand_edited_a_stale_and_a_missing_test_module(
    tmp_path: Path,
) -> None:
    """``--root`` is a repository: its package and its generated tests are checked."""
    shutil.copytree(PACKAGE, tmp_path / "absurd_sqla", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "tests" / "integration").mkdir(parents=True)
    for path in [*TESTS, *TESTS.values()]:
        shutil.copy(ROOT / path, tmp_path / path)
    root = ("--root", str(tmp_path))
    assert check(*root).returncode == 0

    client, context = (tmp_path / target for target in TESTS.values())
    client.write_text(client.read_text().replace("def test_", "def test_edited_", 1))
    result = check(*root)
    assert result.returncode == 1
    assert "tests/integration/test_gen_sync_client.py" in result.stdout
    assert "test_gen_sync_context.py" not in result.stdout

    shutil.copy(ROOT / "tests/integration/test_gen_sync_client.py", client)
    source = tmp_path / "tests/integration/test_async_context.py"
    source.write_text(source.read_text() + "\n\ndef test_new() -> None:\n    pass\n")
    result = check(*root)
    assert result.returncode == 1 and "tests/integration/test_gen_sync_context.py" in result.stdout

    shutil.copy(ROOT / "tests/integration/test_async_context.py", source)
    context.unlink()
    result = check(*root)
    assert result.returncode == 1 and "tests/integration/test_gen_sync_context.py" in result.stdout


ASYNC_TEST = """\
from tests.support import async_app_for, run_async


@run_async  # async only
async def test_both(database_url: str) -> None:
    async with async_app_for(database_url) as app:
        assert await app.list_queues() == ["default"]


# async only: begin
@run_async
async def test_async_only() -> None:
    pass


# async only: end
"""

SYNC_TEST = """\
# GENERATED from tests/t.py by ci/generate_sync.py: do not edit.
# Change tests/t.py and run `python ci/generate_sync.py`.
from tests.support import app_for


def test_both(database_url: str) -> None:
    with app_for(database_url) as app:
        assert app.list_queues() == ["default"]
"""


def test_a_test_module_loses_its_async_only_lines_and_blocks() -> None:
    assert generator().transform("tests/t.py", ASYNC_TEST, test=True) == SYNC_TEST


@pytest.mark.parametrize(
    "text",
    [
        "# async only: begin\nx = 1\n",
        "x = 1\n# async only: end\n",
        "# async only: begin\n# async only: begin\n# async only: end\n",
    ],
    ids=["no-end", "no-begin", "nested"],
)
def test_unbalanced_async_only_blocks_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"tests/t\.py:\d"):
        generator().transform("tests/t.py", text, test=True)
