"""Generate the sync modules of absurd_sqla from their asyncio sources.

The client, the task context, the executor, the multi-statement operations and
the database primitives are written once, as async code (``*_async.py``).
Their sync twins are produced here by removing ``async``/``await``, renaming
the async names to their sync counterparts, and formatting with ruff. A
generated file says so on its first line; never edit one by hand.

The behavioural integration tests of the async API are generated the same
way into sync test modules (``TESTS``), so each behaviour is asserted on both
``AsyncAbsurd`` and ``Absurd``. In a source, a line ending with ``# async only``
is left out of the sync output, and so is every line of a block from
``# async only: begin`` to ``# async only: end`` (a whole async-specific test).

    python ci/generate_sync.py            # write the sync modules and tests
    python ci/generate_sync.py --check    # exit 1 if any is missing or differs

CI runs the first and then ``git diff --exit-code``, so a stale or hand-edited
file fails either way.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "absurd_sqla"

# async source -> generated sync module
MODULES = {
    "_group_async.py": "_group.py",
    "_db_async.py": "_db.py",
    "_ops_async.py": "_ops.py",
    "context_async.py": "context.py",
    "_execute_async.py": "_execute.py",
    "client_async.py": "client.py",
}

# async test module -> generated sync test module, relative to the repository root
TESTS = {
    "tests/integration/test_async_client.py": "tests/integration/test_gen_sync_client.py",
    "tests/integration/test_async_context.py": "tests/integration/test_gen_sync_context.py",
}

# Whole import lines whose sync form comes from another module.
IMPORTS = {
    "from asyncio import sleep as async_sleep": "from time import sleep",
    "from asyncio import Condition": "from threading import Condition",
}

# What ``from sqlalchemy.ext.asyncio import X`` becomes: (module, name).
SQLALCHEMY_ASYNC = {
    "AsyncConnection": ("sqlalchemy", "Connection"),
    "AsyncEngine": ("sqlalchemy", "Engine"),
    "AsyncSession": ("sqlalchemy.orm", "Session"),
    "async_sessionmaker": ("sqlalchemy.orm", "sessionmaker"),
    "create_async_engine": ("sqlalchemy", "create_engine"),
}
_SQLALCHEMY_ASYNC_IMPORT = re.compile(
    r"^from sqlalchemy\.ext\.asyncio import (?:\(([^)]*)\)|([^\n]*))$", re.MULTILINE
)


def _sync_imports(match: re.Match[str]) -> str:
    names = [n.strip() for n in (match.group(1) or match.group(2)).split(",") if n.strip()]
    return "\n".join("from {} import {}".format(*SQLALCHEMY_ASYNC[name]) for name in names)


# Names (whole words, code and prose alike) and their sync counterparts.
NAMES = {
    "AsyncAbsurd": "Absurd",
    "AsyncTaskContext": "TaskContext",
    "AsyncExecutor": "Executor",
    "AsyncDatabase": "Database",
    "AsyncWorkers": "Workers",
    "AsyncWorker": "Worker",
    "AsyncConnection": "Connection",
    "AsyncEngine": "Engine",
    "AsyncSession": "Session",
    "AsyncSessionLike": "SessionLike",
    "AsyncBind": "Bind",
    "AsyncIterator": "Iterator",
    "async_sessionmaker": "sessionmaker",
    "async_engine_and_sessions": "engine_and_sessions",
    "async_sleep": "sleep",
    "async_release": "release",
    "async_driver": "driver",
    "asynccontextmanager": "contextmanager",
    "check_async_handler": "check_sync_handler",
    "_db_async": "_db",
    "_group_async": "_group",
    "_ops_async": "_ops",
    "context_async": "context",
    "_execute_async": "_execute",
    "client_async": "client",
    "worker_async": "worker",
}

# More names for the tests: tests/support.py has each helper in both forms.
TEST_NAMES = {
    **NAMES,
    "async_app_for": "app_for",
    "async_concurrently": "concurrently",
    "async_worker_task": "worker_thread",
    "AsyncBarrier": "Barrier",
    "AsyncEvent": "Event",
    "AsyncExitStack": "ExitStack",
    "enter_async_context": "enter_context",
    "create_async_engine": "create_engine",
    "psycopg_async": "psycopg",
}


def _words(names: dict[str, str]) -> re.Pattern[str]:
    return re.compile(r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b")


_NAMES = _words(NAMES)
_TEST_NAMES = _words(TEST_NAMES)
ASYNC_ONLY = "# async only"
BEGIN, END = f"{ASYNC_ONLY}: begin", f"{ASYNC_ONLY}: end"
_AWAIT = re.compile(r"\bawait\s+")
_ASYNC = re.compile(r"\basync\s+(?=def\b|with\b|for\b)")
_CALL_START = re.compile(r"(?<![\w)\]])\((?=[A-Za-z_][\w.]*\()")  # not a call's own "("


def _closing(code: str, start: int) -> int:
    """Index of the bracket closing the one at ``start`` (strings are not parsed:
    the generated code has no brackets inside the strings this is used on)."""
    depth = 0
    for index in range(start, len(code)):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(code[index], 0)
        if depth == 0:
            return index
    raise ValueError("unbalanced brackets")


def _drop_call_parens(code: str) -> str:
    """``(conn.execute(x, f(y))).one()`` -> ``conn.execute(x, f(y)).one()``: the
    parentheses ``await`` needed around a call whose result is used at once."""
    out, pos = [], 0
    for match in _CALL_START.finditer(code):
        start = match.start()
        if start < pos:
            continue
        end = _closing(code, start)
        call_open = code.index("(", start + 1)
        if _closing(code, call_open) == end - 1 and code[end + 1 : end + 2] in (".", "["):
            out += [code[pos:start], code[start + 1 : end]]
            pos = end + 1
    return "".join(out) + code[pos:]


def _strip_awaitable(code: str) -> str:
    """``Awaitable[X]`` -> ``X``, brackets balanced."""
    marker = "Awaitable["
    while (start := code.find(marker)) != -1:
        depth, end = 1, start + len(marker)
        while depth:
            depth += {"[": 1, "]": -1}.get(code[end], 0)
            end += 1
        code = code[:start] + code[start + len(marker) : end - 1] + code[end:]
    return code


def header(source: str) -> str:
    """``source`` is the async file's path from the repository root."""
    name = Path(source).name if source.startswith("absurd_sqla/") else source
    return (
        f"# GENERATED from {source} by ci/generate_sync.py: do not edit.\n"
        f"# Change {name} and run `python ci/generate_sync.py`.\n"
    )


def _sync_lines(source: str, text: str) -> list[str]:
    """The source's lines without the ``# async only`` ones and blocks."""
    lines, block_start = [], None
    for number, line in enumerate(text.splitlines(), 1):
        marker = line.strip()
        if marker == BEGIN:
            if block_start is not None:
                raise ValueError(
                    f"{source}:{number}: {BEGIN!r} inside the block of line {block_start}"
                )
            block_start = number
        elif marker == END:
            if block_start is None:
                raise ValueError(f"{source}:{number}: {END!r} without {BEGIN!r}")
            block_start = None
        elif block_start is None and not line.rstrip().endswith(ASYNC_ONLY):
            lines.append(IMPORTS.get(line.rstrip(), line))
    if block_start is not None:
        raise ValueError(f"{source}:{block_start}: {BEGIN!r} without {END!r}")
    return lines


def transform(source: str, text: str, *, test: bool = False) -> str:
    """The sync form of ``text``, the async file at ``source`` (a path from the
    repository root; a bare name is a module of the package)."""
    if "/" not in source:
        source = f"absurd_sqla/{source}"
    code = "\n".join(_sync_lines(source, text)) + "\n"
    code = _SQLALCHEMY_ASYNC_IMPORT.sub(_sync_imports, code)
    code = _strip_awaitable(code)
    code = _ASYNC.sub("", code)
    code = _AWAIT.sub("", code)
    code = _drop_call_parens(code)
    names, pattern = (TEST_NAMES, _TEST_NAMES) if test else (NAMES, _NAMES)
    code = pattern.sub(lambda m: names[m.group(1)], code)
    return header(source) + _ruff(code, ROOT / source)


def _ruff(code: str, path: Path) -> str:
    """Sort and prune the imports, then format, as the repository's ruff does
    (configured for ``path``, a file in this repository, as its first-party
    imports and its per-file settings go)."""
    fixed = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--fix",
            "--select",
            "I,F401,SIM117",
            # Merged ``with`` statements may be long: ruff format wraps them.
            "--line-length",
            "1000",
            "--stdin-filename",
            str(path),
            "-",
        ],
        input=code,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    formatted = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "format",
            "--stdin-filename",
            str(path),
            "-",
        ],
        input=fixed,
        capture_output=True,
        text=True,
        check=True,
    )
    return formatted.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if any output differs")
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="the repository (its tests/ are generated too)"
    )
    parser.add_argument(
        "--package",
        type=Path,
        default=None,
        help="the package directory (default: ROOT/absurd_sqla)",
    )
    args = parser.parse_args()
    package = args.package if args.package is not None else args.root / "absurd_sqla"
    jobs = [
        (
            f"absurd_sqla/{source}",
            package / source,
            f"absurd_sqla/{target}",
            package / target,
            False,
        )
        for source, target in MODULES.items()
    ]
    jobs += [
        (source, args.root / source, target, args.root / target, True)
        for source, target in TESTS.items()
    ]
    stale = []
    for source, source_path, target, path, test in jobs:
        generated = transform(source, source_path.read_text(), test=test)
        current = path.read_text() if path.exists() else None
        if current == generated:
            continue
        if args.check:
            stale.append(target)
        else:
            path.write_text(generated)
            print(f"wrote {target}")
    if stale:
        print("stale or hand-edited: " + ", ".join(stale))
        print("run: python ci/generate_sync.py")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
