"""Print the runtime dependency versions in use; with --floors, insist they are the floors.

    python ci/versions.py            # "sqlalchemy 2.1.9, alembic 1.20.1, ..."
    python ci/versions.py --floors   # and exit 1 unless every pin in
                                     # ci/lowest-constraints.txt is installed and
                                     # equals the ">=" floor in pyproject.toml

Run by .ci/run in each environment it tests. Standard library only.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "ci" / "lowest-constraints.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def release(text: str) -> tuple[int, ...]:
    """'1.13' and '1.13.0' are the same release."""
    parts = [int(part) for part in text.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def floors() -> dict[str, str]:
    """``name -> floor`` for each runtime dependency of pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as file:
        dependencies = tomllib.load(file)["project"]["dependencies"]
    found = {}
    for requirement in dependencies:
        match = re.fullmatch(
            r"\s*([A-Za-z0-9._-]+)\s*(\[[^\]]*\])?\s*>=\s*([0-9.]+)\s*", requirement
        )
        if match is None:
            raise SystemExit(f"pyproject.toml: expected NAME[extras]>=FLOOR, got {requirement!r}")
        found[canonical(match[1])] = match[3]
    return found


def pins() -> dict[str, str]:
    """``name -> version`` from ci/lowest-constraints.txt."""
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            found[canonical(name)] = pinned.strip()
    return found


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str]) -> int:
    pinned = pins()
    names = list(dict.fromkeys([*floors(), *pinned]))
    print(
        f"runtime versions (Python {sys.version.split()[0]}): "
        + ", ".join(f"{name} {installed(name)}" for name in names)
    )
    if "--floors" not in argv:
        return 0
    problems = [
        f"{name}: pyproject.toml's floor is {floor}, {CONSTRAINTS.name} pins {pinned.get(name)}"
        for name, floor in floors().items()
        if name not in pinned or release(pinned[name]) != release(floor)
    ]
    problems += [
        f"{name}: {installed(name)} is installed, {CONSTRAINTS.name} pins {want}"
        for name, want in pinned.items()
        if installed(name) is None or release(str(installed(name))) != release(want)
    ]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
