"""A throwaway local PostgreSQL server for examples and tests.

    with database_url() as url:       # ABSURD_DATABASE_URL if set, else a fresh server
        app = Absurd(url)

The server is built from the PostgreSQL binaries on the machine (``pg_config
--bindir``, then ``/usr/lib/postgresql/*/bin``), listens on 127.0.0.1 only, trusts
local connections, and is deleted on exit. PostgreSQL refuses to run as root, so
when this process is root the server runs as the ``postgres`` system user (or
``nobody``) with a data directory owned by it.

The server's log is a plain file (:attr:`LocalPostgres.log_path`), and
:meth:`LocalPostgres.restart` stops the server the way ``pg_ctl restart -m
MODE`` does and starts it again on the same port and data directory, so URLs
handed out before stay valid (fault-injection tests use both).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg

__all__ = ["SHUTDOWN_MODES", "LocalPostgres", "database_url", "find_bindir"]


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres``."""
    candidates: list[str] = []
    if env_dir := os.environ.get("ABSURD_PG_BINDIR"):
        candidates.append(env_dir)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        path = Path(candidate)
        if (path / "initdb").exists() and (path / "postgres").exists():
            return path
    raise RuntimeError(
        "no PostgreSQL server binaries found (initdb/postgres); install the postgresql "
        "package or set ABSURD_DATABASE_URL to a running server"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """The account to run the server as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root, and no 'postgres' or 'nobody' user to run PostgreSQL as")


SHUTDOWN_MODES = ("smart", "fast", "immediate")


# A throwaway server: no fsync, so a crash of the machine may lose data. A crash
# of the server alone (restart(mode="immediate")) loses no commit:
# synchronous_commit stays on, so each COMMIT has written its WAL to the
# operating system before it returns (a write(2), without the fsync).
DEFAULT_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


class LocalPostgres:
    """One private PostgreSQL cluster in a temporary directory."""

    def __init__(
        self,
        *,
        bindir: Path | None = None,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        """``settings``: server settings (``-c name=value``) over the defaults,
        e.g. ``{"fsync": "on", "full_page_writes": "on"}`` for PostgreSQL's own
        durability (benchmarks), or ``shared_preload_libraries``."""
        self.bindir = bindir or find_bindir()
        self.port = port or _free_port()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._user = _server_user()
        self._base: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._registered = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (only while started)."""
        return self._started_base() / "data"

    @property
    def log_path(self) -> Path:
        """The server's log file: everything the server writes, appended across
        restarts (``ERROR:  deadlock detected`` and the like end up here)."""
        return self._started_base() / "server.log"

    def _started_base(self) -> Path:
        if self._base is None:
            raise RuntimeError("the local PostgreSQL server is not started")
        return self._base

    def _spawn_args(self) -> dict[str, Any]:
        """Popen arguments that drop to the server's user when we are root."""
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _owned_dir(self, path: Path) -> Path:
        path.mkdir(mode=0o700)
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)
        return path

    def start(self) -> str:
        self._base = Path(tempfile.mkdtemp(prefix="absurd-pg-"))
        self._base.chmod(0o755)  # the server's user must reach its data dir inside
        data = self._owned_dir(self._base / "data")
        self._owned_dir(self._base / "run")
        subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "LC_ALL": "C"},
            **self._spawn_args(),
        )
        if not self._registered:
            atexit.register(self.stop)
            self._registered = True
        self._launch()
        return self.url

    def _launch(self) -> None:
        """Start the postmaster on the existing data directory and wait until it
        accepts connections (after crash recovery, if the last stop was one)."""
        base = self._started_base()
        with open(base / "server.log", "ab") as log:  # the child keeps its own descriptor
            self._process = subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(base / "data"),
                    "-p",
                    str(self.port),
                    "-k",
                    str(base / "run"),
                    *(arg for item in self.settings.items() for arg in ("-c", "=".join(item))),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                **self._spawn_args(),
            )
        self._wait_ready()

    def restart(self, mode: str = "immediate", *, timeout: float = 60.0) -> None:
        """Stop the server like ``pg_ctl restart -m MODE`` and start it again.

        Same port, same data directory, same log file: URLs stay valid, and
        every client connection is broken. ``immediate`` is a crash (SIGQUIT:
        no shutdown checkpoint, crash recovery at start-up), ``fast`` rolls back
        open transactions and disconnects clients, ``smart`` waits for clients
        to disconnect (up to ``timeout`` seconds). Returns once the server
        accepts connections again.
        """
        if mode not in SHUTDOWN_MODES:
            raise ValueError(f"mode must be one of {', '.join(SHUTDOWN_MODES)}, got {mode!r}")
        process = self._process
        if process is None or process.poll() is not None:
            raise RuntimeError("the local PostgreSQL server is not running")
        subprocess.run(
            [
                str(self.bindir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                str(max(1, int(timeout))),
            ],
            check=True,
            capture_output=True,
            **self._spawn_args(),
        )
        process.wait(timeout=timeout)  # pg_ctl saw the pid file go; reap our child
        self._launch()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited at start-up; see {self.log_path}")
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # polling a starting server; no event to wait on

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)  # fast shutdown: disconnects clients
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def database_url() -> Iterator[str]:
    """``ABSURD_DATABASE_URL`` when set; otherwise a throwaway local server's URL."""
    url = os.environ.get("ABSURD_DATABASE_URL")
    if url:
        yield url
        return
    with LocalPostgres() as local_url:
        yield local_url
