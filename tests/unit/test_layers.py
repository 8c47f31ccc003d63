"""The package's modules form layers: each imports (at run time) only modules
below it, so there is no import circle and the I/O-free core never reaches up
into the clients. Imports under ``if TYPE_CHECKING:`` are annotations only and
are not counted."""

from __future__ import annotations

import ast
from pathlib import Path

import absurd_sqla

PACKAGE = Path(absurd_sqla.__file__).parent

# Bottom to top. A module may import only modules that come before it.
LAYERS = [
    "errors",
    "_core",  # validation, ids, JSON, retry maths: pure
    "models",  # the tables
    "_children",  # parent/child conventions: pure
    "_sql",  # client statements
    "_sql_worker",  # run statements
    "_inspect",  # read-only inspection: result types and statements
    "_run",  # one run's state: pure
    "_app",  # configuration, registry, spawn batches: pure
    "_current",  # get_current_context
    "_outage",  # a worker loop's backoff while the database is away: pure
    "_logs",  # log record fields, the JSON formatter, the CLI's logging set-up: pure
    "_retry",  # which lost writes to retry, and when
    "_runtime",  # what both worker runtimes decide alike
    "_engine",  # bind -> engine + session factory
    "migrate",  # our Alembic revisions, and where a database's schema stands
    "_wire",  # hot statements compiled once, executed on psycopg directly
    "_group_async",  # group commit of concurrent writers (the source)
    "_group",  # generated
    "_db_async",  # AsyncDatabase: the I/O primitives (the source)
    "_db",  # Database: generated from _db_async
    "_ops_async",  # multi-statement operations on a connection (the source)
    "_ops",  # generated
    "context_async",  # AsyncTaskContext (the source)
    "context",  # TaskContext, generated
    "_execute_async",  # AsyncExecutor: claim, execute, outcome, sweep (the source)
    "_execute",  # Executor, generated
    "worker",  # the thread runtime: threads, listener, signals
    "worker_async",  # the asyncio runtime
    "client_async",  # AsyncAbsurd (the source)
    "client",  # Absurd, generated
    "otel",  # OpenTelemetry hooks (the otel extra)
    "testing",
    "localpg",
    "_alembic_env",
    "pytest_plugin",  # fixtures for users' tests
    "_render",  # the command's tables and JSON: pure
    "_commands",  # the command's operating subcommands
    "cli",
]
PURE = {"errors", "_core", "_children", "_run", "_app", "_outage"}  # no sqlalchemy.engine/psycopg


def runtime_imports(module: str, source: str | None = None) -> set[str]:
    """Package modules ``module`` imports outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(source if source is not None else (PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "absurd_sqla."
            ):
                found.add((node.module or "").split(".")[1])
            for field in ("body", "orelse", "finalbody", "handlers"):
                child = getattr(node, field, None)
                if isinstance(child, list):
                    visit([c for c in child if isinstance(c, ast.stmt)])
                    for handler in child:
                        if isinstance(handler, ast.ExceptHandler):
                            visit(handler.body)

    visit(tree.body)
    return found


def test_every_module_is_placed_in_a_layer() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(LAYERS)


def test_no_module_imports_one_above_it() -> None:
    position = {name: index for index, name in enumerate(LAYERS)}
    upward = [
        f"{module} imports {imported}"
        for module in LAYERS
        for imported in sorted(runtime_imports(module))
        if imported in position and position[imported] >= position[module]
    ]
    assert upward == []


def test_the_pure_core_does_no_io() -> None:
    for module in sorted(PURE):
        source = (PACKAGE / f"{module}.py").read_text()
        for forbidden in ("import psycopg", "Connection", "Session(", "create_engine"):
            assert forbidden not in source, f"{module} mentions {forbidden}"


def test_the_checker_sees_nested_imports_and_skips_type_checking_ones() -> None:
    source = """
from typing import TYPE_CHECKING
from . import _core
if TYPE_CHECKING:
    from .client import Absurd
def later():
    try:
        from .worker import Worker
    except ImportError:
        from absurd_sqla.cli import main
"""
    assert runtime_imports("x", source) == {"_core", "worker", "cli"}
