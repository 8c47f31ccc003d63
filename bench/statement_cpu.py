"""Client CPU of one hot-path statement: a run's checkpoint write, sent N times
through the worker's own path (``Database.rows``: pool checkout, AUTOCOMMIT,
the prepared statement, the row) and then by raw psycopg on one held
connection, the same prepared SQL and parameters.

    python bench/statement_cpu.py [--statements 5000]

CPU is this process's ``time.process_time()`` (user + system), no profiler
running. Uses ABSURD_DATABASE_URL if set, else a throwaway local PostgreSQL
(fsync off: the figure is the client's, not the disk's).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import psycopg
from sqlalchemy.engine import make_url

from absurd_sqla import Absurd, _wire, migrate
from absurd_sqla import _sql_worker as sqlw
from absurd_sqla.localpg import database_url

WARM_UP = 200


def cpu_per_call(n: int, call: Callable[[], object]) -> float:
    for _ in range(WARM_UP):
        call()
    began = time.process_time()
    for _ in range(n):
        call()
    return (time.process_time() - began) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=5000)
    args = parser.parse_args()
    with database_url() as url:
        migrate.upgrade(url)
        app = Absurd(url)
        app.create_queue()
        app.spawn("t", {})
        db = app._db
        claim = {"queue": "default", "worker": "w", "claim_timeout": 120, "batch_size": 1}
        run_id = db.rows(sqlw.claim, claim)[0].run_id
        params = {"run": run_id, "claim_timeout": 120, "step": "s", "value_json": "1"}
        ours = cpu_per_call(args.statements, lambda: db.rows(sqlw.write_checkpoint, params))

        prepared = _wire.prepared(sqlw.write_checkpoint, app.engine)
        assert prepared is not None
        raw_url = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(raw_url, autocommit=True) as conn:
            cursor = conn.cursor()
            bound = prepared.params(params)

            def raw() -> object:
                cursor.execute(prepared.sql, bound, prepare=True)
                return cursor.fetchall()

            alone = cpu_per_call(args.statements, raw)
        app.close()
    print(f"checkpoint write, client CPU per statement ({args.statements} statements):")
    print(f"  absurd_sqla's path (pool checkout, AUTOCOMMIT, prepared): {ours:.3f} ms")
    print(f"  raw psycopg, one held connection, same prepared SQL:      {alone:.3f} ms")
    print(f"  our layer: {ours - alone:.3f} ms per statement")


if __name__ == "__main__":
    main()
