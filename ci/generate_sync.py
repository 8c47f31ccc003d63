"""Generate the sync modules of absurd_sqla from their asyncio sources.

The client, the task context, the executor, the multi-statement operations and
the database primitives are written once, as async code (``*_async.py``).
Their sync twins are produced here by removing ``async``/``await``, renaming
the async names to their sync counterparts, and formatting with ruff. A
generated file says so on its first line; never edit one by hand.

    python ci/generate_sync.py            # write the sync modules
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

PACKAGE = Path(__file__).resolve().parent.parent / "absurd_sqla"

# async source -> generated sync module
MODULES = {
    "_db_async.py": "_db.py",
    "_ops_async.py": "_ops.py",
    "context_async.py": "context.py",
    "_execute_async.py": "_execute.py",
    "client_async.py": "client.py",
}

# Whole import lines whose sync form comes from another module.
IMPORTS = {
    "from asyncio import sleep as async_sleep": "from time import sleep",
}

# What ``from sqlalchemy.ext.asyncio import X`` becomes: (module, name).
SQLALCHEMY_ASYNC = {
    "AsyncConnection": ("sqlalchemy", "Connection"),
    "AsyncEngine": ("sqlalchemy", "Engine"),
    "AsyncSession": ("sqlalchemy.orm", "Session"),
    "async_sessionmaker": ("sqlalchemy.orm", "sessionmaker"),
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
    "asynccontextmanager": "contextmanager",
    "check_async_handler": "check_sync_handler",
    "_db_async": "_db",
    "_ops_async": "_ops",
    "context_async": "context",
    "_execute_async": "_execute",
    "client_async": "client",
    "worker_async": "worker",
}

_NAMES = re.compile(r"\b(" + "|".join(sorted(NAMES, key=len, reverse=True)) + r")\b")
_AWAIT = re.compile(r"\bawait\s+")
_ASYNC = re.compile(r"\basync\s+(?=def\b|with\b|for\b)")
_CALL_START = re.compile(r"\((?=[A-Za-z_][\w.]*\()")


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
    return (
        f"# GENERATED from absurd_sqla/{source} by ci/generate_sync.py: do not edit.\n"
        f"# Change {source} and run `python ci/generate_sync.py`.\n"
    )


def transform(source_name: str, text: str) -> str:
    lines = [
        IMPORTS.get(line.rstrip(), line)
        for line in text.splitlines()
        if not line.rstrip().endswith("# async only")
    ]
    code = "\n".join(lines) + "\n"
    code = _SQLALCHEMY_ASYNC_IMPORT.sub(_sync_imports, code)
    code = _strip_awaitable(code)
    code = _ASYNC.sub("", code)
    code = _AWAIT.sub("", code)
    code = _drop_call_parens(code)
    code = _NAMES.sub(lambda m: NAMES[m.group(1)], code)
    return header(source_name) + _ruff(code)


def _ruff(code: str) -> str:
    """Sort and prune the imports, then format, as the repository's ruff does."""
    fixed = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--fix",
            "--select",
            "I,F401",
            "--stdin-filename",
            str(PACKAGE / "generated.py"),
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
            str(PACKAGE / "generated.py"),
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
    parser.add_argument("--check", action="store_true", help="fail if any module differs")
    parser.add_argument("--package", type=Path, default=PACKAGE, help="the package directory")
    args = parser.parse_args()
    stale = []
    for source, target in MODULES.items():
        generated = transform(source, (args.package / source).read_text())
        path = args.package / target
        current = path.read_text() if path.exists() else None
        if current == generated:
            continue
        if args.check:
            stale.append(target)
        else:
            path.write_text(generated)
            print(f"wrote absurd_sqla/{target}")
    if stale:
        print("stale or hand-edited: " + ", ".join(f"absurd_sqla/{t}" for t in stale))
        print("run: python ci/generate_sync.py")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
