"""The fault suite's own PostgreSQL cluster: the scenarios restart it, so they
never touch the suite's shared server (``tests/conftest.py``'s ``pg_server``),
and always start it locally, whether or not ABSURD_DATABASE_URL is set."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from absurd_sqla.localpg import find_bindir
from tests.faults.harness import FaultCluster


@pytest.fixture(scope="session")
def fault_cluster() -> Iterator[FaultCluster]:
    try:
        find_bindir()
    except RuntimeError as exc:
        pytest.skip(f"the fault suite needs local PostgreSQL server binaries: {exc}")
    cluster = FaultCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()
