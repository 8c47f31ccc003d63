"""``absurd-sqla``: migrate the schema and run workers from the shell.

absurd-sqla migrate [--url URL] [--downgrade]
absurd-sqla worker myapp.tasks:app [--queue Q] [--concurrency N] [--claim-timeout S]

``worker`` takes an ``Absurd`` (handlers run in threads) or an ``AsyncAbsurd``
(handlers run as asyncio tasks in one event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from . import migrate
from ._engine import default_url
from .client import Absurd
from .client_async import AsyncAbsurd


def _load_app(target: str) -> Absurd | AsyncAbsurd:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"expected MODULE:ATTRIBUTE (e.g. myapp.tasks:app), got {target!r}")
    sys.path.insert(0, "")
    app = getattr(importlib.import_module(module_name), attribute, None)
    if not isinstance(app, (Absurd, AsyncAbsurd)):
        raise SystemExit(f"{target} is not an absurd_sqla.Absurd or AsyncAbsurd instance")
    return app


async def _serve_async(app: AsyncAbsurd, options: dict[str, Any]) -> None:
    try:
        await app.start_worker(**options)
    finally:
        await app.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="absurd-sqla", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    migrate_cmd = commands.add_parser("migrate", help="create or upgrade the absurd schema")
    migrate_cmd.add_argument("--url", help="database URL (default: ABSURD_DATABASE_URL, ...)")
    migrate_cmd.add_argument(
        "--downgrade", action="store_true", help="remove the absurd schema and all its data"
    )

    worker_cmd = commands.add_parser("worker", help="run a worker until SIGTERM/SIGINT")
    worker_cmd.add_argument("app", help="MODULE:ATTRIBUTE of your Absurd or AsyncAbsurd instance")
    worker_cmd.add_argument("--queue", default=None)
    worker_cmd.add_argument("--worker-id", default=None)
    worker_cmd.add_argument("--concurrency", type=int, default=1)
    worker_cmd.add_argument("--batch-size", type=int, default=None)
    worker_cmd.add_argument("--claim-timeout", type=float, default=120)
    worker_cmd.add_argument("--poll-interval", type=float, default=0.25)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "migrate":
        url = args.url or default_url()
        if args.downgrade:
            migrate.downgrade(url)
        else:
            migrate.upgrade(url)
        return 0
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


if __name__ == "__main__":
    raise SystemExit(main())
