"""Migrating with any valid URL: escaped user names and passwords, socket directories.

Every way in is covered: ``migrate.upgrade(url)``, ``absurd-sqla migrate --url``,
``ABSURD_DATABASE_URL`` and ``alembic -x url=...``. The role's name and password
both hold ``%``, ``@``, ``:`` and an already-escaped-looking ``%40``, so a URL that
is rendered into an ini option, interpolated or unquoted twice cannot pass.

The local test server trusts every connection and never checks a password, so the
tests look at what arrived instead: the owner of the schema the migration created
(the user name), and what libpq connected with (user, password, host, port).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url

from absurd_sqla import migrate
from tests.conftest import Server

REPO_ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "p%40ss:w@rd%"
UNREACHABLE = "postgresql://nobody@127.0.0.1:1/nowhere"


@dataclass(frozen=True)
class Login:
    """A role with an awkward name and password on a database of its own."""

    server: Server
    dbname: str
    role: str
    password: str
    socket_dir: str | None

    def url(self, transport: str) -> str:
        auth = f"{quote(self.role, safe='')}:{quote(self.password, safe='')}"
        if transport == "tcp":
            return f"postgresql://{auth}@{self.server.host}:{self.server.port}/{self.dbname}"
        if self.socket_dir is None:
            pytest.skip("the test server has no unix socket on this machine")
        socket = quote(self.socket_dir, safe="/")
        return f"postgresql://{auth}@/{self.dbname}?host={socket}&port={self.server.port}"

    def host(self, transport: str) -> str:
        return self.server.host if transport == "tcp" else str(self.socket_dir)

    def admin(self) -> psycopg.Connection[Any]:
        """A superuser connection to the database (the fixtures' own login)."""
        return psycopg.connect(
            host=self.server.host,
            port=self.server.port,
            user=self.server.user,
            password=self.server.password,
            dbname=self.dbname,
            autocommit=True,
        )

    def owners(self) -> dict[str, str | None]:
        """Who owns what the migration creates: proof of who it connected as."""
        with self.admin() as conn:
            schema = conn.execute(
                "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'absurd'"
            ).fetchone()
            table = conn.execute(
                "SELECT tableowner FROM pg_tables"
                " WHERE schemaname = 'public' AND tablename = 'absurd_alembic_version'"
            ).fetchone()
        return {
            "schema": schema[0] if schema else None,
            "version table": table[0] if table else None,
        }


def local_socket_dir(conn: psycopg.Connection[Any], port: int) -> str | None:
    """The server's unix socket directory, if its socket is on this machine."""
    setting = conn.execute("SHOW unix_socket_directories").fetchone()
    for directory in (setting[0] if setting else "").split(","):
        directory = directory.strip()
        if directory and (Path(directory) / f".s.PGSQL.{port}").exists():
            return directory
    return None


@pytest.fixture
def login(pg_server: Server, fresh_database: str) -> Iterator[Login]:
    dbname = make_url(fresh_database).database
    assert dbname is not None
    role = f"absurd%40u:s@r%_{uuid.uuid4().hex[:8]}"
    created = Login(pg_server, dbname, role, PASSWORD, socket_dir=None)
    with created.admin() as conn:
        ident = sql.Identifier(role)
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(ident, sql.Literal(PASSWORD))
        )
        conn.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(dbname), ident)
        )
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(ident))
        socket_dir = local_socket_dir(conn, pg_server.port)
    try:
        yield Login(pg_server, dbname, role, PASSWORD, socket_dir)
    finally:
        with created.admin() as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
            conn.execute(sql.SQL("DROP ROLE {}").format(ident))


@contextmanager
def libpq_logins() -> Iterator[list[dict[str, Any]]]:
    """What libpq connected with, for each connection any Engine opens meanwhile."""
    seen: list[dict[str, Any]] = []

    def record(dbapi_connection: Any, connection_record: Any) -> None:
        info = dbapi_connection.info
        seen.append(
            {
                "user": info.user,
                "password": info.password,
                "host": info.host,
                "port": info.port,
                "dbname": info.dbname,
            }
        )

    event.listen(Engine, "connect", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "connect", record)


TRANSPORTS = ["tcp", "socket"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_python_api_keeps_the_url_intact(login: Login, transport: str) -> None:
    url = login.url(transport)
    expected = {
        "user": login.role,
        "password": PASSWORD,
        "host": login.host(transport),
        "port": login.server.port,
        "dbname": login.dbname,
    }
    with libpq_logins() as seen:
        migrate.upgrade(url)
    assert seen and all(connected == expected for connected in seen), seen
    assert login.owners() == {"schema": login.role, "version table": login.role}

    with libpq_logins() as seen:
        migrate.downgrade(url)
    assert seen and all(connected == expected for connected in seen), seen
    assert login.owners() == {"schema": None, "version table": login.role}


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("route", ["absurd-sqla --url", "ABSURD_DATABASE_URL", "alembic -x url"])
def test_command_line_keeps_the_url_intact(login: Login, transport: str, route: str) -> None:
    url = login.url(transport)
    if route == "absurd-sqla --url":
        # The flag wins over the environment, here pointing at nothing.
        done = run(
            "-m",
            "absurd_sqla.cli",
            "migrate",
            "--url",
            url,
            env={"ABSURD_DATABASE_URL": UNREACHABLE},
        )
    elif route == "ABSURD_DATABASE_URL":
        done = run("-m", "absurd_sqla.cli", "migrate", env={"ABSURD_DATABASE_URL": url})
    else:
        done = run(
            "-m",
            "alembic",
            "-x",
            f"url={url}",
            "upgrade",
            "head",
            env={"ABSURD_DATABASE_URL": UNREACHABLE},
        )
    assert done.returncode == 0, done.stderr
    assert login.owners() == {"schema": login.role, "version table": login.role}
