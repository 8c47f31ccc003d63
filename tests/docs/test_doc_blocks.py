"""The ```python blocks of README.md and docs/**/*.md run against the real PostgreSQL.

Users copy these blocks, so they must work. The convention:

- **One namespace per Markdown file.** A file's python blocks run in order, top
  to bottom, in one fresh namespace (the ``__dict__`` of a fresh module), so a
  later block uses names an earlier one defined. Every file gets a clean
  database (absurd's tables and the doc tables below emptied) and a fresh
  ``Absurd`` app. Blocks of other languages (``bash``, ``console``, ``sql``,
  ``text``, ``ini``...) are not run.
- **Names a doc uses but does not define** come from a visible set-up in the doc
  where that reads well, else from a prelude in this module. Every file gets:

  - ``url``: the test database's URL (``ABSURD_DATABASE_URL`` is set to it too,
    so ``Absurd()`` and ``migrate.upgrade()`` without arguments find it);
  - ``app``: ``Absurd(url)``, with the queue ``default`` created.

  ``PRELUDES`` below adds a few more per file (an ``Order`` model, a
  ``SessionLocal``, stubs such as ``gateway``): keep them minimal. A file whose
  blocks import the reader's own modules (``from tasks import app``, ``from
  myapp.tasks import create_app``) lists those module names in ``MODULES``:
  they are bound to the file's namespace, which plays the reader's project.
  A file in ``OWN_DATABASE`` (migrations.md: it downgrades) gets an empty
  database of its own and no ``app``.
- **A block is marked** by an HTML comment on the line right before its fence:

  - ``<!-- doc-test: in-task {"order_id": 1} -->``: the block is a fragment of a
    task handler (it uses ``ctx`` and ``params``). It is run as the body of a
    handler ``(params, ctx)``, spawned with the JSON params given (``{}`` if
    none) and ``max_attempts=1``, and driven by ``run_until_idle``: it fails the
    test if the task ends ``failed``. Suspending (sleep, await) is fine.
  - ``<!-- doc-test: requires MODULE -->``: runs only if MODULE imports (an
    optional third-party package), otherwise it is skipped.
  - ``<!-- doc-test: skip (reason) -->``: not run. Keep these rare: the count is
    pinned by ``test_blocks_that_do_not_run_are_few``.
- **Workers.** ``app.start_worker(...)`` blocks forever when called from the main
  thread (a worker script). In a doc test that call starts the real worker in a
  background thread instead and returns, like a worker running in another
  terminal. After the file's last block the runner waits until the workers'
  queues are idle (no run running, none due), then stops and joins them. Calls
  from a doc's own threads run unchanged.
- **asyncio.** A block may run coroutines with ``asyncio.run(...)``, each in a
  fresh event loop. ``AsyncAbsurd.start_worker(...)`` called outside any event
  loop (``asyncio.run(app.start_worker(...))``: an async worker script) runs the
  real worker until its queue is idle (no run running, none due), then stops it
  and closes the client's pool, as the process would end; called inside a
  running loop (``asyncio.create_task(app.start_worker())`` in a lifespan) it runs
  unchanged. A file whose ``app`` is an ``AsyncAbsurd`` has no handlers spawned
  for it: its blocks spawn and run their own, and every task on that app's
  queue must end ``completed`` or ``sleeping``. An ``AsyncAbsurd`` or
  ``AsyncEngine`` left in the namespace is closed in a loop of its own.
- **Handler bodies run too.** After the last block, the handlers listed in
  ``HANDLERS`` for the file are spawned on its ``app``, and everything due on
  ``app``'s queue (the doc's own spawns included) runs with ``run_until_idle``;
  each listed task must end ``completed`` or ``sleeping``. Then no task may
  have ended ``failed`` (except ones a prelude failed on purpose), and every
  ``Absurd`` and ``Engine`` left in the namespace is closed.
- **docs/howto/testing.md** shows a project's files (blocks headed ``# <path>``);
  ``test_testing_guide_passes_under_pytest`` also writes them out and runs
  their tests with pytest in a subprocess.

A failing block is reported as ``<file>:<line>``, and its traceback points
into the Markdown file at the block's lines.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import types
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, ForeignKey, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from absurd_sqla import Absurd, AsyncAbsurd
from absurd_sqla.testing import run_until_idle

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# Pinned so that blocks that don't run cannot quietly multiply.
EXPECTED_NOT_RUN = 7
# A broken extractor must not pass by finding nothing.
MIN_BLOCKS = 50

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<kind>[\w-]+)\s*(?P<arg>.*?)\s*-->\s*$")
PYTHON = {"python", "py"}


# -- extracting blocks ---------------------------------------------------------


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line
    source: str
    kind: str = "run"  # run | in-task | requires | skip
    arg: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    """The python blocks of one Markdown file, with their markers."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            if MARKER.match(lines[i]):
                following = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
                info = following["info"].split() if following else []
                assert info and info[0] in PYTHON, (
                    f"{path.relative_to(ROOT)}:{i + 1}: a doc-test marker must be on the line "
                    "right before a ```python fence"
                )
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = opening["info"].split()
        start = i + 1
        end = start
        while end < len(lines):
            closing = lines[end].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            end += 1
        else:
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: unclosed code fence")
        if info and info[0] in PYTHON:
            body = [
                line[len(indent) :] if line.startswith(indent) else line
                for line in lines[start:end]
            ]
            kind, arg = "run", ""
            marker = MARKER.match(lines[i - 1]) if i > 0 else None
            if marker:
                kind, arg = marker["kind"], marker["arg"]
                check_marker(path, i, kind, arg)
            blocks.append(Block(path, start + 1, "\n".join(body) + "\n", kind, arg))
        i = end + 1
    return blocks


def check_marker(path: Path, fence_index: int, kind: str, arg: str) -> None:
    where = f"{path.relative_to(ROOT)}:{fence_index}"
    if kind == "skip":
        assert re.fullmatch(r"\(.+\)", arg), f"{where}: write `skip (reason)`, not {arg!r}"
    elif kind == "requires":
        assert re.fullmatch(r"[\w.]+", arg), f"{where}: write `requires MODULE`, not {arg!r}"
    elif kind == "in-task":
        params = json.loads(arg) if arg else {}
        assert isinstance(params, dict), f"{where}: in-task params must be a JSON object"
    else:
        raise AssertionError(f"{where}: unknown doc-test marker {kind!r}")


# -- the doc tables: the "your own models" the docs use --------------------------


class DocBase(DeclarativeBase):
    pass


class Order(DocBase):
    __tablename__ = "doc_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    amount: Mapped[int]
    status: Mapped[str] = mapped_column(default="new")
    task_id: Mapped[uuid.UUID | None]


class LedgerEntry(DocBase):
    __tablename__ = "doc_ledger_entries"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int]
    amount: Mapped[int]


class Shipment(DocBase):
    __tablename__ = "doc_shipments"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int]
    tracking_number: Mapped[str]


class Invoice(DocBase):
    """With a relationship: what docs/howto/asyncio.md must not lazy-load."""

    __tablename__ = "doc_invoices"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    status: Mapped[str] = mapped_column(default="open")
    lines: Mapped[list[InvoiceLine]] = relationship(back_populates="invoice")


class InvoiceLine(DocBase):
    __tablename__ = "doc_invoice_lines"

    id: Mapped[int] = mapped_column(primary_key=True)
    invoice_id: Mapped[int] = mapped_column(ForeignKey(Invoice.id))
    amount: Mapped[int]
    invoice: Mapped[Invoice] = relationship(back_populates="lines")


# -- preludes --------------------------------------------------------------------


@dataclass
class DocEnv:
    """What a prelude may use: the file's database and its helper apps."""

    url: str
    app: Absurd  # the file's fresh app on the queue "default"
    runner: Absurd  # runs in-task blocks on its own queue, and the preludes' tasks
    expected_failed: set[uuid.UUID] = field(default_factory=set)

    def task_in_state(self, state: str) -> uuid.UUID:
        """A task on the queue "default" that is pending, completed or failed."""
        name = {"pending": "doc-prelude-unknown", "completed": "doc-prelude-ok"}.get(
            state, "doc-prelude-fails"
        )
        task_id = self.runner.spawn(name, {}, queue="default", max_attempts=1).task_id
        if state != "pending":
            run_until_idle(self.runner, queue="default")
        snapshot = self.app.fetch_task_result(task_id)
        assert snapshot is not None and snapshot.state == state, snapshot
        if state == "failed":
            self.expected_failed.add(task_id)
        return task_id

    def sessions(self) -> sessionmaker[Any]:
        return sessionmaker(self.app.engine)


def _stub(**functions: Callable[..., Any]) -> types.SimpleNamespace:
    return types.SimpleNamespace(**functions)


def _sent(*args: Any) -> dict[str, Any]:
    return {"sent": [str(arg) for arg in args]}


# The outside world of the docs' handlers: JSON in, JSON out, nothing else.
mailer = _stub(send=_sent, send_shipped=_sent, send_welcome=_sent, send_trial_ending=_sent)


def readme(env: DocEnv) -> dict[str, Any]:
    return {
        "SessionFactory": env.sessions(),
        "Order": Order,
        "gateway": _stub(charge=lambda order_id: {"payment_id": f"pay-{order_id}"}),
    }


def index(env: DocEnv) -> dict[str, Any]:
    return {
        "order": Order(email="ada@example.com", amount=4200),
        "carrier": _stub(buy_label=lambda order_id: f"label-{order_id}"),
        "mailer": mailer,
    }


def transactional_spawn(env: DocEnv) -> dict[str, Any]:
    return {
        "Order": Order,
        "orders_table": Order.__table__,
        "rows": [
            {"id": 101, "email": "a@example.com", "amount": 10},
            {"id": 102, "email": "b@example.com", "amount": 20},
        ],
    }


def concepts(env: DocEnv) -> dict[str, Any]:
    return {"api": _stub(fetch=lambda page: {"page": page, "rows": []})}


def transaction_step(env: DocEnv) -> dict[str, Any]:
    with env.sessions().begin() as session:
        session.add(Order(id=1, email="ada@example.com", amount=4200))
    return {
        "Order": Order,
        "LedgerEntry": LedgerEntry,
        "psp": _stub(charge=lambda order_id: {"payment_id": f"pay-{order_id}"}),
    }


def steps(env: DocEnv) -> dict[str, Any]:
    return {
        "psp": _stub(charge=lambda order_id, idempotency_key: {"charged": order_id}),
        "chunks": ["a", "b", "c"],
        "process": lambda chunk: None,
        "storage": _stub(fetch=lambda url: {"key": url.rsplit("/", 1)[-1]}),
        "ocr": _stub(extract=lambda key: {"total": 4200}),
        "mailer": mailer,
    }


def sleeping(env: DocEnv) -> dict[str, Any]:
    return {"mailer": mailer, "exports": _stub(status=lambda export_id: {"done": True})}


def events(env: DocEnv) -> dict[str, Any]:
    return {
        "SessionLocal": env.sessions(),
        "Shipment": Shipment,
        "pdf_url": "https://example.com/invoice-7.pdf",
        "mailer": mailer,
    }


def asyncio_guide(env: DocEnv) -> dict[str, Any]:
    with env.sessions().begin() as session:
        lines = [InvoiceLine(amount=4000), InvoiceLine(amount=200)]
        session.add(Invoice(id=1, email="ada@example.com", lines=lines))

    async def charge(order_id: int) -> dict[str, str]:
        return {"payment_id": f"pay-{order_id}"}

    async def send_receipt(*args: Any) -> dict[str, Any]:
        return _sent(*args)

    return {
        "Order": Order,
        "Invoice": Invoice,
        "InvoiceLine": InvoiceLine,
        "psp": _stub(charge=charge),
        "mailer": _stub(send_receipt=send_receipt),
        "legacy_rates": _stub(fetch=lambda currency: {"EUR": 0.92}[currency]),
    }


def reference(env: DocEnv) -> dict[str, Any]:
    return {"Absurd": Absurd}  # the block is the constructor's signature: call it


def retries(env: DocEnv) -> dict[str, Any]:
    return {"task_id": env.task_in_state("failed")}


def cancellation(env: DocEnv) -> dict[str, Any]:
    SessionLocal = env.sessions()
    with SessionLocal.begin() as session:
        order = Order(email="ada@example.com", amount=10, task_id=env.task_in_state("pending"))
        session.add(order)
        session.flush()
        order_id = order.id
    return {
        "task_id": env.task_in_state("pending"),
        "SessionLocal": SessionLocal,
        "Order": Order,
        "order_id": order_id,
        "booking": _stub(hold=lambda seat: {"seat": seat}),
    }


def child_tasks(env: DocEnv) -> dict[str, Any]:
    env.app.create_queue("gpu")  # "Make sure a worker serves gpu": the queue exists
    return {
        "task_id": env.task_in_state("completed"),
        "images": _stub(resize=lambda src, width: f"{src}?w={width}"),
    }


PRELUDES: dict[str, Callable[[DocEnv], dict[str, Any]]] = {
    "README.md": readme,
    "docs/index.md": index,
    "docs/transactional-spawn.md": transactional_spawn,
    "docs/concepts.md": concepts,
    "docs/transaction-step.md": transaction_step,
    "docs/howto/sleeping.md": sleeping,
    "docs/howto/steps.md": steps,
    "docs/howto/events.md": events,
    "docs/howto/retries.md": retries,
    "docs/reference.md": reference,
    "docs/howto/cancellation.md": cancellation,
    "docs/howto/child-tasks.md": child_tasks,
    "docs/howto/asyncio.md": asyncio_guide,
}

# Handlers a file registers but does not spawn: after its last block they are
# spawned with these params on the file's ``app`` and run with run_until_idle.
HANDLERS: dict[str, dict[str, dict[str, Any]]] = {
    "docs/transaction-step.md": {"charge-order": {"order_id": 1}},
    "docs/howto/steps.md": {
        "import-invoice": {"url": "https://example.com/inv-1.pdf"},
        "report": {},
        "audited": {},
    },
    "docs/howto/sleeping.md": {"trial-reminder": {"user_id": 7}, "poll-export": {"export_id": 3}},
    "docs/howto/events.md": {"ship-order": {"order_id": 42}},
    "docs/howto/child-tasks.md": {"publish-photo": {"src": "https://example.com/cat.jpg"}},
    "docs/howto/cancellation.md": {"nightly-report": {}},
    "docs/howto/retention.md": {"purge-old-tasks": {}},
    "docs/reliability.md": {"receipt": {"order_id": 7}},
}

# Modules of the reader's project that a file's blocks write and then import.
MODULES: dict[str, tuple[str, ...]] = {
    "docs/tutorial.md": ("tasks",),
    "docs/howto/testing.md": ("myapp", "myapp.tasks"),
    "docs/howto/workers.md": ("myapp", "myapp.tasks"),
    "docs/howto/asyncio.md": ("myapp", "myapp.tasks"),
}

# Files that migrate and downgrade get an empty database of their own, and
# no ``app`` (there is no schema yet): ``url`` and the names given here.
OWN_DATABASE: dict[str, Callable[[str], dict[str, Any]]] = {
    "docs/migrations.md": lambda url: {"engine": create_engine(url)},
}


# -- running a file ----------------------------------------------------------------


@dataclass
class BackgroundWorkers:
    """``start_worker`` called from the main thread runs in a thread instead."""

    started: list[tuple[Absurd, str, threading.Thread]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = Absurd.start_worker
        signature = inspect.signature(original)

        def start_worker(app: Absurd, *args: Any, **kwargs: Any) -> None:
            if threading.current_thread() is not threading.main_thread():
                original(app, *args, **kwargs)
                return
            bound = signature.bind(app, *args, **kwargs)  # bad arguments raise here

            def run() -> None:
                try:
                    original(app, *args, **kwargs)
                except BaseException:
                    self.errors.append(traceback.format_exc())

            thread = threading.Thread(target=run, name="doc-worker", daemon=True)
            thread.start()
            queue = bound.arguments.get("queue") or app.queue_name
            self.started.append((app, queue, thread))

        monkeypatch.setattr(Absurd, "start_worker", start_worker)

        original_async = AsyncAbsurd.start_worker
        signature_async = inspect.signature(original_async)

        def start_async_worker(app: AsyncAbsurd, *args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # asyncio.run(app.start_worker(...)): a worker script
                bound = signature_async.bind(app, *args, **kwargs)  # bad arguments raise here
                queue = bound.arguments.get("queue") or app.queue_name
                return run_async_worker_until_idle(app, queue, original_async(app, *args, **kwargs))
            return original_async(app, *args, **kwargs)  # a task in the doc's own loop

        monkeypatch.setattr(AsyncAbsurd, "start_worker", start_async_worker)

    def drain_and_stop(self, engine: Engine) -> None:
        """Wait until the started workers' queues are idle, then stop the workers."""
        queues = [queue for _, queue, thread in self.started if thread.is_alive()]
        if queues:
            wait_for(lambda: not busy_runs(engine, queues), what=f"idle queues {queues}")
        self.abandon()
        assert not self.errors, "a worker started by a doc raised:\n" + "\n".join(self.errors)

    def abandon(self) -> None:
        """Stop the started workers now (a stop can come before a worker registers)."""
        for app, _, thread in self.started:
            deadline = time.monotonic() + 15
            while thread.is_alive() and time.monotonic() < deadline:
                app.stop_worker()
                thread.join(timeout=0.05)
            assert not thread.is_alive(), "a worker started by a doc did not stop"


BUSY_RUNS = text(
    "SELECT count(*) FROM absurd.runs WHERE queue_name = ANY(:queues) AND "
    "(state = 'running' OR (state IN ('pending', 'sleeping') AND available_at <= absurd.now()))"
)


def busy_runs(engine: Engine, queues: list[str]) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(BUSY_RUNS, {"queues": queues}) or 0)


async def run_async_worker_until_idle(
    app: AsyncAbsurd, queue: str, worker: Coroutine[Any, Any, None], timeout: float = 15
) -> None:
    """Run ``worker`` (the real ``start_worker`` coroutine) until ``queue`` is idle,
    then stop it and close the client's pool: the worker process has ended."""
    task = asyncio.create_task(worker)
    try:
        deadline = time.monotonic() + timeout
        while True:
            async with app.engine.connect() as conn:
                busy = await conn.scalar(BUSY_RUNS, {"queues": [queue]})
            if not busy or task.done():
                break
            assert time.monotonic() < deadline, f"timed out waiting for idle queue {queue!r}"
            await asyncio.sleep(0.02)  # polling the condition, with a deadline
    finally:
        app.stop_worker()
        await asyncio.wait_for(task, timeout)  # re-raises what the worker raised
        await app.close()


def wait_for(condition: Callable[[], bool], *, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        threading.Event().wait(0.02)


def compile_block(block: Block, source: str, first_line: int) -> types.CodeType:
    """Compile so that tracebacks show the Markdown file and its line numbers."""
    return compile("\n" * (first_line - 1) + source, str(block.path), "exec")


def run_block(block: Block, namespace: dict[str, Any]) -> None:
    try:
        exec(compile_block(block, block.source, block.line), namespace)
    except BaseException as exc:
        message = f"{block.where}: the block raised {exc!r}\n\n{traceback.format_exc()}"
    else:
        return
    pytest.fail(message, pytrace=False)


def run_in_task(block: Block, namespace: dict[str, Any], runner: Absurd) -> None:
    """Run a handler fragment as the body of a task: a real ctx, a real database."""
    body = textwrap.indent(textwrap.dedent(block.source), "    ")
    source = "def _doc_task_(params, ctx):\n" + body
    exec(compile_block(block, source, block.line - 1), namespace)  # defines the handler
    handler = namespace.pop("_doc_task_")
    name = f"doc-task:{block.line}"
    runner.register_task(name)(handler)
    params = json.loads(block.arg) if block.arg else {}
    spawned = runner.spawn(name, params, max_attempts=1)
    run_until_idle(runner)
    snapshot = runner.fetch_task_result(spawned.task_id)
    assert snapshot is not None
    if snapshot.state == "failed":
        failure = snapshot.failure or {}
        pytest.fail(
            f"{block.where}: the task body failed: {failure.get('name')}: "
            f"{failure.get('message')}\n\n{failure.get('traceback')}",
            pytrace=False,
        )


def run_handlers(rel: str, namespace: dict[str, Any], workers: BackgroundWorkers) -> None:
    """Spawn the file's registered handlers and run everything due on its ``app``."""
    app = namespace.get("app")
    if isinstance(app, AsyncAbsurd):
        check_async_tasks_done(rel, app)
        return
    if not isinstance(app, Absurd) or workers.started:
        return  # no app, or the doc's own workers already ran its tasks
    spawned = {name: app.spawn(name, params) for name, params in HANDLERS.get(rel, {}).items()}
    run_until_idle(app)
    for name, result in spawned.items():
        snapshot = app.fetch_task_result(result.task_id)
        assert snapshot is not None, name
        # Never claimed (no handler has the name), or failed: both are doc bugs.
        assert snapshot.state in {"completed", "sleeping"}, (rel, name, snapshot)


def check_async_tasks_done(rel: str, app: AsyncAbsurd) -> None:
    """A file whose ``app`` is an ``AsyncAbsurd`` runs its own tasks: each must be done."""

    async def states() -> list[tuple[str, str]]:
        query = text("SELECT task_name, state FROM absurd.tasks WHERE queue_name = :queue")
        try:
            async with app.engine.connect() as conn:
                return [tuple(row) for row in await conn.execute(query, {"queue": app.queue_name})]
        finally:
            await app.engine.dispose()  # this loop's connections end with it

    found = asyncio.run(states())
    assert found, f"{rel}: its blocks ran no task on {app.queue_name!r}"
    undone = [(name, state) for name, state in found if state not in {"completed", "sleeping"}]
    assert not undone, f"{rel}: tasks not done after the last block: {undone}"


def failed_tasks(engine: Engine, expected: set[uuid.UUID]) -> list[tuple[str, Any]]:
    query = text(
        "SELECT t.task_id, t.task_name, r.failure_reason FROM absurd.tasks t "
        "JOIN absurd.runs r ON r.run_id = t.last_run_id WHERE t.state = 'failed'"
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [(row.task_name, row.failure_reason) for row in rows if row.task_id not in expected]


@pytest.fixture(scope="module")
def doc_tables(engine: Engine) -> Iterator[None]:
    DocBase.metadata.create_all(engine)
    yield
    DocBase.metadata.drop_all(engine)


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def isolate(rel: str, url: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The file's namespace (a fresh module), its environment and import names."""
    monkeypatch.setenv("ABSURD_DATABASE_URL", url)
    # A doc's logging.basicConfig() must not change the logging of the test session.
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    module = types.ModuleType("_doc_" + re.sub(r"\W", "_", rel))
    for name in MODULES.get(rel, ()):
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(module, child, module)  # `myapp.tasks` is an attribute of `myapp`
    module.url = url  # type: ignore[attr-defined]
    return module


def prepare(request: pytest.FixtureRequest, rel: str) -> str:
    """The database URL for the file: emptied shared database, or one of its own."""
    if rel in OWN_DATABASE:
        return str(request.getfixturevalue("fresh_database"))
    request.getfixturevalue("doc_tables")
    clean: Engine = request.getfixturevalue("clean_db")
    with clean.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(DocBase.metadata.tables)} RESTART IDENTITY"))
        conn.execute(text("DROP TABLE IF EXISTS public.users"))  # the tutorial creates it
    return str(request.getfixturevalue("database_url"))


def make_env(url: str) -> DocEnv:
    app = Absurd(url)
    app.create_queue()
    runner = Absurd(url, queue_name="doc-tasks")
    runner.create_queue()
    runner.register_task("doc-prelude-ok")(lambda params, ctx: {"ok": True})
    runner.register_task("doc-prelude-fails")(prelude_fails)
    return DocEnv(url=url, app=app, runner=runner)


def close_all(objects: list[Any]) -> None:
    for obj in objects:
        if isinstance(obj, Absurd):
            obj.close()
        elif isinstance(obj, Engine):
            obj.dispose()
        elif isinstance(obj, AsyncAbsurd | AsyncEngine):
            close = obj.close() if isinstance(obj, AsyncAbsurd) else obj.dispose()
            asyncio.run(close)  # in a loop of its own: the doc's loops have ended


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_id)
def test_doc_blocks(
    path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    rel = doc_id(path)
    blocks = extract_blocks(path)
    assert blocks, f"{rel} has no python blocks: fix the extractor or the docs"
    url = prepare(request, rel)
    namespace = isolate(rel, url, monkeypatch).__dict__
    workers = BackgroundWorkers()
    workers.patch(monkeypatch)
    check_engine = create_engine(url)
    env = None if rel in OWN_DATABASE else make_env(url)
    try:
        if env is None:
            namespace.update(OWN_DATABASE[rel](url))
        else:
            namespace["app"] = env.app
            namespace.update(PRELUDES.get(rel, lambda env: {})(env))
        for block in blocks:
            if block.kind == "skip":
                continue
            if block.kind == "requires" and importlib.util.find_spec(block.arg) is None:
                continue
            if block.kind == "in-task":
                assert env is not None, f"{block.where}: in-task needs the shared database"
                run_in_task(block, namespace, env.runner)
            else:
                run_block(block, namespace)
        workers.drain_and_stop(check_engine)
        run_handlers(rel, namespace, workers)
        if env is not None:
            failed = failed_tasks(check_engine, env.expected_failed)
            assert not failed, f"{rel}: tasks ended failed:\n" + "\n".join(
                f"{name}: {reason and reason.get('traceback')}" for name, reason in failed
            )
    finally:
        workers.abandon()
        close_all([*namespace.values(), check_engine])
        if env is not None:
            close_all([env.app, env.runner])


def prelude_fails(params: Any, ctx: Any) -> None:
    raise RuntimeError("failed on purpose by the doc test's prelude")


def test_blocks_that_do_not_run_are_few() -> None:
    blocks = [block for path in DOC_FILES for block in extract_blocks(path)]
    assert len(blocks) >= MIN_BLOCKS, f"only {len(blocks)} python blocks found"
    not_run = [b for b in blocks if b.kind in {"skip", "requires"}]
    listing = "\n".join(f"  {b.where}: {b.kind} {b.arg}" for b in not_run)
    assert len(not_run) == EXPECTED_NOT_RUN, (
        f"{len(not_run)} blocks are marked skip/requires, expected {EXPECTED_NOT_RUN}:\n{listing}"
    )


def test_testing_guide_passes_under_pytest(fresh_database: str, tmp_path: Path) -> None:
    """docs/howto/testing.md shows a project's files: write them out and run its tests.

    A block whose first line is ``# <path>`` is that file; a block without one
    continues the previous file.
    """
    files: dict[str, str] = {}
    current = None
    for block in extract_blocks(ROOT / "docs" / "howto" / "testing.md"):
        first = block.source.splitlines()[0]
        if first.startswith("# ") and first.endswith(".py"):
            current = first[2:]
        assert current is not None, f"{block.where}: which file is this block part of?"
        files[current] = files.get(current, "") + block.source + "\n"
    assert set(files) == {"myapp/tasks.py", "tests/conftest.py", "tests/test_tasks.py"}
    (tmp_path / "myapp").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        env={**os.environ, "ABSURD_DATABASE_URL": fresh_database},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 passed" in result.stdout, result.stdout
