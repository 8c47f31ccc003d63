"""``absurd-sqla`` (also ``python -m absurd_sqla``): run and operate absurd_sqla.

absurd-sqla migrate [upgrade | downgrade --yes | current] [--revision REV] [--sql]
absurd-sqla worker myapp.tasks:app [--queue Q] [--concurrency N] [--claim-timeout S]
                   [--log-level LEVEL] [--log-format text|json]
absurd-sqla queues [create NAME | drop NAME --yes]
absurd-sqla tasks [--queue Q] [--state S] [--name N] [--since 2h] [--limit N]
absurd-sqla show TASK_ID
absurd-sqla spawn NAME --params JSON      absurd-sqla emit EVENT --payload JSON
absurd-sqla cancel TASK_ID [--reason R]   absurd-sqla retry TASK_ID
absurd-sqla cleanup --older-than 30d      absurd-sqla stats [--watch [SECONDS]]
absurd-sqla dashboard [--host 127.0.0.1] [--port 7890] [--read-only]

Every command takes ``--database-url`` (default: ``ABSURD_DATABASE_URL``) and
``--json``. ``worker`` takes an ``Absurd`` (handlers run in threads) or an
``AsyncAbsurd`` (handlers run as asyncio tasks in one event loop), or a
function returning one.

Exit codes: 0 done; 1 refused (e.g. retrying a task that has not failed);
2 bad input; 3 the database cannot be reached or its schema is not current;
4 no such task or queue; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.pool import NullPool

from . import _commands, _render, migrate
from ._engine import default_url, normalize_url
from ._logs import FORMATS, configure_logging
from .client import Absurd
from .client_async import AsyncAbsurd
from .errors import (
    AbsurdError,
    InvalidArgument,
    QueueNotFound,
    SchemaNotCurrent,
    TaskNotFound,
)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EXIT_REFUSED, EXIT_USAGE, EXIT_DATABASE, EXIT_NOT_FOUND, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


class _Failed(Exception):
    """A one-line error and the exit code it means."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _load_app(target: str) -> Absurd | AsyncAbsurd:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise _Failed(
            f"expected MODULE:ATTRIBUTE (e.g. myapp.tasks:app), got {target!r}", EXIT_USAGE
        )
    sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _Failed(f"cannot import {module_name!r}: {exc}", EXIT_USAGE) from None
    app = getattr(module, attribute, None)
    if callable(app) and not isinstance(app, (Absurd, AsyncAbsurd)):
        app = app()  # a factory: create_app()
    if not isinstance(app, (Absurd, AsyncAbsurd)):
        raise _Failed(
            f"{target} is not an absurd_sqla.Absurd or AsyncAbsurd instance "
            "(or a function returning one)",
            EXIT_USAGE,
        )
    return app


async def _serve_async(app: AsyncAbsurd, options: dict[str, Any]) -> None:
    try:
        await app.start_worker(**options)
    finally:
        await app.close()


def _worker(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    app = _load_app(args.app)
    options: dict[str, Any] = {
        "worker_id": args.worker_id,
        "claim_timeout": args.claim_timeout,
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "poll_interval": args.poll_interval,
        "queue": args.queue,
    }
    if isinstance(app, AsyncAbsurd):
        asyncio.run(_serve_async(app, options))
    else:
        app.start_worker(**options)
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .dashboard import create_dashboard
    except ImportError as exc:
        raise _Failed(
            f"the dashboard needs its extra ({exc.name} is missing): "
            "pip install 'absurd_sqla[dashboard]'",
            EXIT_USAGE,
        ) from None
    try:
        app = Absurd(_url(args))
    except (ArgumentError, ValueError) as exc:
        raise _Failed(f"bad database URL: {exc}", EXIT_USAGE) from None
    host = "[" + args.host + "]" if ":" in args.host else args.host
    mode = " (read-only)" if args.read_only else ""
    print(f"absurd-sqla dashboard{mode} on http://{host}:{args.port}/", flush=True)
    if not _is_loopback(args.host):
        print(
            f"absurd-sqla: warning: {args.host} is not a loopback address: anyone who can "
            "reach it can see and change your tasks; put an authenticating proxy in front",
            file=sys.stderr,
            flush=True,
        )
    # uvicorn re-raises the SIGTERM it stopped on once it is done; exit 0 then.
    signal.signal(signal.SIGTERM, _exit_done)
    try:
        dashboard = create_dashboard(app, read_only=args.read_only)
        uvicorn.run(dashboard, host=args.host, port=args.port, log_level="warning")
    finally:
        app.close()
    return 0


def _exit_done(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _migrate(args: argparse.Namespace) -> int:
    url = _url(args)
    action = "downgrade" if args.downgrade else args.action
    if action == "current":
        status = _schema_status(url)
        _print_status(args, status)
        return 0 if status.is_current else EXIT_DATABASE
    if not args.sql:
        configure_logging("INFO", "text")
    if action == "upgrade":
        migrate.upgrade(url, args.revision or "absurd@head", sql=args.sql)
    else:
        if not (args.yes or args.sql):
            raise _Failed(
                "downgrading to absurd@base drops the absurd schema and every task in it: "
                "run again with --yes (or --sql to review the SQL)",
                EXIT_USAGE,
            )
        target = args.revision or "absurd@base"
        migrate.downgrade(url, f"absurd@head:{target}" if args.sql else target, sql=args.sql)
    if args.json and not args.sql:
        # What the schema is now, as ``migrate current --json`` reports it.
        _print_status(args, _schema_status(url))
    return 0


def _schema_status(url: str) -> migrate.SchemaStatus:
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        return migrate.schema_status(engine)
    finally:
        engine.dispose()


def _print_status(args: argparse.Namespace, status: migrate.SchemaStatus) -> None:
    if args.json:
        data = {**_render.plain(status), "current": status.is_current}
        print(_render.as_json({**data, "message": status.message()}))
    else:
        print(status.message())


def _operate(args: argparse.Namespace) -> int:
    try:
        app = Absurd(_url(args))
    except (ArgumentError, ValueError) as exc:
        raise _Failed(f"bad database URL: {exc}", EXIT_USAGE) from None
    try:
        frames = 0
        while True:
            output = args.run(app, args)
            if args.json:
                print(_render.as_json(output.data))
            elif getattr(args, "watch", None) and sys.stdout.isatty():
                print("\x1b[H\x1b[J" + output.text, flush=True)  # redraw in place
            else:
                print(output.text, flush=True)
            frames += 1
            if not getattr(args, "watch", None) or (args.count and frames >= args.count):
                return 0
            time.sleep(args.watch)
    finally:
        app.close()


def _url(args: argparse.Namespace) -> str:
    return getattr(args, "database_url", None) or default_url()


def _where(url: str) -> str:
    """The database a URL names, without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the configured database"


def _common(parser: argparse.ArgumentParser, *, inherit: bool) -> None:
    """``--database-url`` and ``--json``, before or after the command name."""
    default = argparse.SUPPRESS if inherit else None
    parser.add_argument(
        "--database-url",
        "--url",
        dest="database_url",
        default=default,
        help="database URL (default: ABSURD_DATABASE_URL)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if inherit else False,
        help="print JSON instead of tables",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="absurd-sqla",
        description=(__doc__ or "").splitlines()[0],
        epilog="exit codes: 0 done, 1 refused, 2 bad input, 3 database unreachable or "
        "schema not current, 4 not found, 130 interrupted",
    )
    _common(parser, inherit=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(name, help=help)
        _common(sub, inherit=True)
        return sub

    migrate_cmd = command("migrate", "upgrade (the default), downgrade, or show the schema")
    migrate_cmd.add_argument(
        "action", nargs="?", choices=["upgrade", "downgrade", "current"], default="upgrade"
    )
    migrate_cmd.add_argument(
        "--revision", help="target revision (default: absurd@head up, absurd@base down)"
    )
    migrate_cmd.add_argument(
        "--sql", action="store_true", help="print the SQL for review instead of running it"
    )
    migrate_cmd.add_argument(
        "--yes", action="store_true", help="downgrade: confirm dropping the schema's data"
    )
    migrate_cmd.add_argument("--downgrade", action="store_true", help=argparse.SUPPRESS)
    migrate_cmd.set_defaults(handler=_migrate)

    worker_cmd = command("worker", "run a worker until SIGTERM/SIGINT")
    worker_cmd.add_argument("app", help="MODULE:ATTRIBUTE of your Absurd or AsyncAbsurd")
    worker_cmd.add_argument("--queue", default=None)
    worker_cmd.add_argument("--worker-id", default=None)
    worker_cmd.add_argument("--concurrency", type=int, default=1)
    worker_cmd.add_argument("--batch-size", type=int, default=None)
    worker_cmd.add_argument("--claim-timeout", type=float, default=120)
    worker_cmd.add_argument("--poll-interval", type=float, default=0.25)
    worker_cmd.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="the lowest level logged (default: INFO)",
    )
    worker_cmd.add_argument(
        "--log-format",
        default="text",
        choices=FORMATS,
        help="text lines, or one JSON object per line with task_id, run_id, task_name, "
        "queue and attempt (default: text)",
    )
    worker_cmd.set_defaults(handler=_worker)

    dashboard_cmd = command("dashboard", "serve the web dashboard (the dashboard extra)")
    dashboard_cmd.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    dashboard_cmd.add_argument("--port", type=int, default=7890, help="default: 7890")
    dashboard_cmd.add_argument(
        "--read-only", action="store_true", help="hide the retry and cancel actions"
    )
    dashboard_cmd.set_defaults(handler=_dashboard)

    def operating(name: str, help: str) -> argparse.ArgumentParser:
        sub = command(name, help)
        sub.set_defaults(handler=_operate)
        return sub

    _commands.add_commands(operating)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except _Failed as failed:
        return _fail(str(failed), failed.code)
    except _commands.UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (TaskNotFound, QueueNotFound) as exc:
        return _fail(str(exc), EXIT_NOT_FOUND)
    except InvalidArgument as exc:
        return _fail(str(exc), EXIT_USAGE)
    except SchemaNotCurrent as exc:
        return _fail(str(exc), EXIT_DATABASE)
    except AbsurdError as exc:
        return _fail(str(exc), EXIT_REFUSED)
    except (OperationalError, InterfaceError) as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        return _fail(f"cannot reach the database at {_where(_url(args))}: {reason}", EXIT_DATABASE)
    except DBAPIError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        return _fail(f"the database refused: {reason}", EXIT_REFUSED)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _fail(message: str, code: int) -> int:
    print(f"absurd-sqla: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
