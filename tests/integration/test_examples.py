"""The examples in examples/ run end to end against the test database."""

from __future__ import annotations

import functools
import importlib.util
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select

from absurd_sqla import Absurd
from absurd_sqla.models import checkpoints, tasks
from absurd_sqla.testing import run_until_idle

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@functools.cache
def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (not a package) once per test session."""
    module_name = f"_absurd_example_{name}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: SQLAlchemy resolves the models' string
    # annotations through sys.modules.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


# -- order fulfillment ---------------------------------------------------------

ORDER = {"order_id": "T-7", "amount": 1999, "items": ["sku-3"], "email": "grace@example.com"}
EXPECTED = {
    "order_id": "T-7",
    "payment": {"payment_id": "pay-T-7", "amount": 1999},
    "inventory": {"reserved_items": ["sku-3"]},
    "tracking_number": "TRACK-T7",
    "notification": {"sent_to": "grace@example.com", "tracking_number": "TRACK-T7"},
}


@pytest.fixture
def fulfilment_app(clean_db: Engine) -> Absurd:
    return load_example("order_fulfillment").build_app(clean_db)  # type: ignore[no-any-return]


def test_order_fulfillment_with_a_worker_thread(fulfilment_app: Absurd, clean_db: Engine) -> None:
    example = load_example("order_fulfillment")
    worker = threading.Thread(
        target=fulfilment_app.start_worker, kwargs={"concurrency": 2, "poll_interval": 0.05}
    )
    worker.start()
    try:
        snapshot = example.fulfil_order(fulfilment_app, ORDER, tracking_number="TRACK-T7")
    finally:
        deadline = time.monotonic() + 15
        while worker.is_alive() and time.monotonic() < deadline:
            fulfilment_app.stop_worker()
            worker.join(timeout=0.05)
    assert not worker.is_alive()
    assert snapshot.state == "completed", snapshot.failure
    assert snapshot.result == EXPECTED


def test_order_fulfillment_inline_suspends_until_the_shipment_is_packed(
    fulfilment_app: Absurd, clean_db: Engine
) -> None:
    spawned = fulfilment_app.spawn("order-fulfillment", ORDER)
    assert run_until_idle(fulfilment_app) == 1
    waiting = fulfilment_app.fetch_task_result(spawned.task_id)
    assert waiting is not None and waiting.state == "sleeping"
    with clean_db.connect() as conn:
        done_steps = set(
            conn.scalars(
                select(checkpoints.c.checkpoint_name).where(
                    checkpoints.c.task_id == spawned.task_id
                )
            )
        )
    assert done_steps == {"process-payment", "reserve-inventory"}

    fulfilment_app.emit_event("shipment.packed:T-7", {"tracking_number": "TRACK-T7"})
    assert run_until_idle(fulfilment_app) == 1
    snapshot = fulfilment_app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed"
    assert snapshot.result == EXPECTED


def test_order_fulfillment_main(
    clean_db: Engine,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ABSURD_DATABASE_URL", database_url)
    load_example("order_fulfillment").main()
    out = capsys.readouterr().out
    assert "task completed:" in out
    assert '"tracking_number": "TRACK-42"' in out
    with clean_db.connect() as conn:
        states = list(conn.scalars(select(tasks.c.state)))
    assert states == ["completed"]


# -- quickstart ------------------------------------------------------------------


@pytest.fixture
def quickstart_cleanup(database_url: str) -> Iterator[None]:
    yield
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS quickstart_orders")
    engine.dispose()


def test_quickstart_build_app_flow(
    clean_db: Engine, database_url: str, quickstart_cleanup: None
) -> None:
    quickstart = load_example("quickstart")
    app, sessions = quickstart.build_app(database_url)
    try:
        with sessions.begin() as session:
            order = quickstart.Order(email="ada@example.com", amount=4200)
            session.add(order)
            session.flush()
            order_id = order.id
            spawned = app.spawn("charge-order", {"order_id": order_id}, session=session)
        with sessions() as session:  # rolled back: no order, no task
            session.add(quickstart.Order(email="bob@example.com", amount=1))
            app.spawn("charge-order", {"order_id": -1}, session=session)
            session.rollback()

        assert run_until_idle(app) == 1
        snapshot = app.fetch_task_result(spawned.task_id)
        assert snapshot is not None and snapshot.state == "completed", snapshot
        assert snapshot.result == {
            "payment": {"payment_id": f"pay-{order_id}"},
            "status": "paid",
        }
        with sessions() as session:
            rows: list[Any] = session.scalars(select(quickstart.Order)).all()
            assert [(o.id, o.status) for o in rows] == [(order_id, "paid")]
    finally:
        app.close()


def test_quickstart_main(
    clean_db: Engine,
    database_url: str,
    quickstart_cleanup: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ABSURD_DATABASE_URL", database_url)
    load_example("quickstart").main()
    out = capsys.readouterr().out
    assert "task completed: {" in out
    assert "'status': 'paid'" in out
