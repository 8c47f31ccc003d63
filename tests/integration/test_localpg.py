"""LocalPostgres.restart and log_path: the fault suite's server controls, on a
throwaway server of this test's own (it is restarted)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from absurd_sqla.localpg import LocalPostgres, find_bindir


@pytest.fixture(scope="module")
def local() -> Iterator[LocalPostgres]:
    try:
        find_bindir()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    server = LocalPostgres()
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("mode", ["immediate", "fast"])
def test_restart_keeps_url_and_committed_data_and_breaks_connections(
    local: LocalPostgres, mode: str
) -> None:
    url = local.url
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS kept (mode text)")
        conn.execute("INSERT INTO kept VALUES (%s)", (mode,))  # committed just before the crash
        before = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
        local.restart(mode)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert local.url == url
    with psycopg.connect(url) as conn:
        assert (mode,) in conn.execute("SELECT mode FROM kept").fetchall()
        after = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    assert before is not None and after is not None and after[0] > before[0]
    log = local.log_path.read_text()
    expected = "immediate shutdown request" if mode == "immediate" else "fast shutdown request"
    assert expected in log
    assert log.count("database system is ready to accept connections") >= 2


def test_the_log_file_records_server_errors(local: LocalPostgres) -> None:
    offset = local.log_path.stat().st_size
    with psycopg.connect(local.url) as conn, pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT 1 / 0")
    with open(local.log_path, "rb") as log:
        log.seek(offset)
        assert b"division by zero" in log.read()


def test_restart_refuses_an_unknown_mode_and_a_stopped_server(local: LocalPostgres) -> None:
    with pytest.raises(ValueError, match="immediate"):
        local.restart("abrupt")
    stopped = LocalPostgres()
    with pytest.raises(RuntimeError, match="not running"):
        stopped.restart()
    with pytest.raises(RuntimeError, match="not started"):
        _ = stopped.log_path


def test_settings_override_the_throwaway_defaults(local: LocalPostgres) -> None:
    with psycopg.connect(local.url) as conn:  # the defaults: a throwaway server
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
    durable = LocalPostgres(settings={"fsync": "on", "full_page_writes": "on"})
    try:
        with psycopg.connect(durable.start()) as conn:
            assert conn.execute("SHOW fsync").fetchone() == ("on",)
            assert conn.execute("SHOW full_page_writes").fetchone() == ("on",)
            assert conn.execute("SHOW max_connections").fetchone() == ("200",)  # kept
    finally:
        durable.stop()
