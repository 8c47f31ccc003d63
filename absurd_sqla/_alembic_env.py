"""The body of both Alembic ``env.py`` files (the shipped one and the repo's)."""

from __future__ import annotations

import os
from typing import Any

from alembic.runtime.environment import EnvironmentContext
from sqlalchemy import Connection, Engine, create_engine, pool
from sqlalchemy.engine import URL

from ._engine import default_url, normalize_url
from .migrate import VERSION_TABLE, refuse_foreign_history
from .models import SCHEMA, metadata


def _include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    # Autogenerate compares our schema only; the app's tables are not ours to judge.
    if type_ == "table":
        return getattr(obj, "schema", None) == SCHEMA
    return True


def _configure(context: EnvironmentContext, **kw: Any) -> None:
    context.configure(
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_schemas=True,
        include_object=_include_object,
        **kw,
    )


def _url(context: EnvironmentContext) -> str | URL:
    """The database to migrate, unless the caller handed over an Engine or Connection.

    ``absurd_sqla.migrate`` passes a ``URL`` object in ``Config.attributes``: it
    reaches ``create_engine`` as given. From the ``alembic`` command line it is
    ``-x url=...``, then ``sqlalchemy.url`` from the ini file, then the environment.
    """
    cfg = context.config
    given = cfg.attributes.get("url")
    if isinstance(given, str | URL):
        return given
    x_url: str | None = context.get_x_argument(as_dictionary=True).get("url")
    return (
        x_url
        or cfg.get_main_option("sqlalchemy.url")
        or os.environ.get("ABSURD_DATABASE_URL")
        or default_url()
    )


def run(context: EnvironmentContext) -> None:
    cfg = context.config
    url = _url(context)
    if context.is_offline_mode():
        _configure(context, url=normalize_url(url), literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    given = cfg.attributes.get("connection")
    if isinstance(given, Connection):
        _migrate_on(context, given)
        return
    engine = (
        given
        if isinstance(given, Engine)
        else create_engine(normalize_url(url), poolclass=pool.NullPool)
    )
    with engine.connect() as connection:
        _migrate_on(context, connection)
        connection.commit()


def _migrate_on(context: EnvironmentContext, connection: Connection) -> None:
    if context.config.attributes.get("absurd_guard"):
        # migrate.upgrade(): refuse a schema another history manages, before any DDL.
        refuse_foreign_history(connection)
    _configure(context, connection=connection)
    with context.begin_transaction():
        context.run_migrations()
