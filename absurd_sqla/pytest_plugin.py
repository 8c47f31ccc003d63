"""pytest fixtures for testing an absurd_sqla app without a background worker.

Enable them in your ``conftest.py``::

    pytest_plugins = ["absurd_sqla.pytest_plugin"]

- ``absurd_database_url`` (session): ``ABSURD_DATABASE_URL`` if set, else a
  throwaway local PostgreSQL; migrated to our head once.
- ``absurd_app_factory``: how to build your client from a URL. ``Absurd`` by
  default; override it to return your own factory (``create_app``).
- ``absurd_app``: the client on that database, every absurd table emptied
  first and its default queue created; closed afterwards.
- ``absurd_clock``: a ``FakeClock`` on ``absurd_app.engine``.

With ``absurd_sqla.testing.run_until_idle`` and ``assert_spawned`` a test
spawns, runs and checks a workflow in its own thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import text

from . import migrate
from .client import Absurd
from .localpg import database_url
from .testing import FakeClock

__all__ = ["absurd_app", "absurd_app_factory", "absurd_clock", "absurd_database_url"]


@pytest.fixture(scope="session")
def absurd_database_url() -> Iterator[str]:
    with database_url() as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture
def absurd_app_factory() -> Callable[[str], Any]:
    return Absurd


@pytest.fixture
def absurd_app(
    absurd_database_url: str, absurd_app_factory: Callable[[str], Any]
) -> Iterator[Absurd]:
    app = absurd_app_factory(absurd_database_url)
    if not isinstance(app, Absurd):
        raise TypeError(
            f"absurd_app_factory must return an absurd_sqla.Absurd, got {type(app).__name__}; "
            "for an AsyncAbsurd, build it in the test's event loop from absurd_database_url"
        )
    with app.engine.begin() as conn:
        conn.execute(text("TRUNCATE absurd.queues, absurd.tasks CASCADE"))
    app.create_queue()
    try:
        yield app
    finally:
        app.close()


@pytest.fixture
def absurd_clock(absurd_app: Absurd) -> Iterator[FakeClock]:
    with FakeClock(absurd_app.engine) as clock:
        yield clock
