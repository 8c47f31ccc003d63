"""Run absurd_sqla's own Alembic migrations, and check where a database stands.

    from absurd_sqla import migrate
    migrate.upgrade("postgresql://localhost/app")      # or an Engine / Connection

The revisions carry the branch label ``absurd`` and keep their place in
``public.absurd_alembic_version``, apart from any history of the application's.
An application with its own Alembic setup runs them from its ``env.py``
(see docs/migrations.md), with two helpers from this module:

- :func:`run_migrations` instead of ``context.run_migrations()``: absurd's
  revisions, then the application's, in one transaction;
- :func:`include_object` for ``context.configure(include_object=...)``, so that
  autogenerate never proposes to create or drop absurd's tables.

:func:`check_schema_current` (or :func:`schema_status`) tells whether a database's
``absurd`` schema is at the head this release of absurd_sqla ships.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import alembic.context
import alembic.op
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, column, select, table, text
from sqlalchemy.engine import URL

from ._engine import default_url, normalize_url
from .errors import AbsurdError, SchemaNotCurrent
from .models import SCHEMA

SCRIPT_LOCATION = "absurd_sqla:migrations"
VERSION_LOCATION = "absurd_sqla:migrations/versions"
VERSION_TABLE = "absurd_alembic_version"
"""Where absurd's revision is recorded (in the connection's default schema)."""

# Every revision we ship is named "absurd_<n>_<what>" (a test holds us to it). A row
# like that in some other version table is absurd's, even one from a newer release.
REVISION_PREFIX = "absurd_"

MIGRATE_COMMAND = "absurd-sqla migrate"
APP_UPGRADE_COMMAND = "alembic upgrade head"
LEGACY_APP_UPGRADE_COMMAND = "alembic upgrade heads"

Target = str | URL | Engine | Connection | None


def config(bind: Target = None) -> Config:
    """An Alembic ``Config`` for the shipped revisions, pointed at ``bind``."""
    cfg = _bare_config()
    if isinstance(bind, Engine | Connection):
        cfg.attributes["connection"] = bind
    else:
        # The URL object itself, not its rendering as an ini option: options go through
        # configparser interpolation, where the "%" of an escaped password or of a
        # ``?host=`` socket directory is a syntax error. _alembic_env reads it back.
        cfg.attributes["url"] = normalize_url(bind if bind is not None else default_url())
    return cfg


def _bare_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.set_main_option("version_locations", VERSION_LOCATION)
    cfg.set_main_option("path_separator", "space")
    return cfg


def upgrade(bind: Target = None, revision: str = "absurd@head", *, sql: bool = False) -> None:
    """Create or bring up to date the ``absurd`` schema.

    Refuses, before changing anything, a database whose ``absurd`` schema is
    recorded in another Alembic history (an application's ``alembic_version``)
    or in none at all.

    Safe to call from inside an application's ``env.py`` (that is what
    :func:`run_migrations` does): Alembic's ``context`` and ``op`` go back to the
    application's afterwards. ``sql=True`` prints the SQL instead of running it
    (offline mode: from nothing to ``revision``, or give ``"from:to"``).
    """
    cfg = config(bind)
    cfg.attributes["absurd_guard"] = True  # _alembic_env calls refuse_foreign_history
    with _keeping_alembic_proxies():
        command.upgrade(cfg, revision, sql=sql)


def downgrade(bind: Target = None, revision: str = "absurd@base", *, sql: bool = False) -> None:
    """Remove the ``absurd`` schema and every table in it (``absurd@base``).
    ``sql=True`` prints the SQL instead (``revision`` is then ``"from:to"``)."""
    with _keeping_alembic_proxies():
        command.downgrade(config(bind), revision, sql=sql)


def stamp(bind: Target = None, revision: str = "absurd@head") -> None:
    """Record ``revision`` in ``absurd_alembic_version`` without running anything.

    For a schema built another way that already matches the revision (one that
    an application's own Alembic history used to manage, see docs/migrations.md).
    """
    with _keeping_alembic_proxies():
        command.stamp(config(bind), revision)


@contextmanager
def _keeping_alembic_proxies() -> Iterator[None]:
    """Put back whatever ``alembic.context`` and ``alembic.op`` pointed at before.

    Alembic binds those two modules to the running command, and unbinds them
    when it ends, with no notion of nesting. Run from an application's env.py,
    our command would leave the application's ``context`` unbound.
    """
    saved = [getattr(module, "_proxy", None) for module in (alembic.context, alembic.op)]
    try:
        yield
    finally:
        for proxy in saved:
            if proxy is not None:
                proxy._install_proxy()


# --- inside an application's env.py --------------------------------------------------


class _Environment(Protocol):
    """What we use of an env.py's ``context`` (the module or an EnvironmentContext)."""

    def is_offline_mode(self) -> bool: ...

    def get_bind(self) -> Connection: ...

    def get_revision_argument(self) -> Any: ...

    def run_migrations(self, **kw: Any) -> None: ...


def run_migrations(context: _Environment, **kw: Any) -> None:
    """Call this in your env.py instead of ``context.run_migrations()``.

    For ``alembic upgrade``, ``downgrade`` and ``stamp`` run online, it first brings
    the ``absurd`` schema to its head (recorded in ``absurd_alembic_version``, not
    in your history), on your connection and in your transaction; then it runs
    your revisions. Commands that migrate nothing (``revision --autogenerate``,
    ``check``, ``current``) and ``--sql`` runs leave absurd alone.
    """
    if _migrates(context):
        upgrade(context.get_bind())
    context.run_migrations(**kw)


def _migrates(context: _Environment) -> bool:
    if context.is_offline_mode():
        return False
    try:
        # Only the commands that move the database to a revision have one.
        context.get_revision_argument()
    except KeyError:
        return False
    return True


def _is_ours(table_: Any) -> bool:
    return bool(table_.schema == SCHEMA or table_.name == VERSION_TABLE)


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """An Alembic ``include_object`` that leaves absurd's objects out of autogenerate.

    ``context.configure(..., include_object=absurd_sqla.migrate.include_object)``:
    tables in the ``absurd`` schema, their columns, indexes and constraints, and
    the ``absurd_alembic_version`` table are neither created nor dropped by your
    revisions. Everything else is kept. To combine it with a filter of your own::

        def include_object(obj, name, type_, reflected, compare_to):
            return migrate.include_object(obj, name, type_, reflected, compare_to) and ...
    """
    if type_ == "table":
        return not _is_ours(obj)
    parent = getattr(obj, "table", None)
    return parent is None or not _is_ours(parent)


# --- where a database stands -----------------------------------------------------------


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database's ``absurd`` schema stands against this release's head."""

    head: str
    """The newest revision this installed absurd_sqla ships."""
    schema_exists: bool
    """Whether the database has an ``absurd`` schema."""
    version_table: str | None
    """``schema.table`` recording absurd's revision, or None if no table does."""
    revisions: tuple[str, ...]
    """absurd's revisions recorded there (one, normally)."""
    known: bool
    """False if a recorded revision is not one this release ships (a newer one)."""

    @property
    def app_managed(self) -> bool:
        """Recorded in an application's own Alembic table, not ``absurd_alembic_version``."""
        return self.version_table is not None and (
            self.version_table.rpartition(".")[2] != VERSION_TABLE
        )

    @property
    def is_current(self) -> bool:
        return self.schema_exists and self.revisions == (self.head,)

    @property
    def fix(self) -> str:
        """The command that brings the schema to ``head``."""
        if not self.known:
            return "pip install --upgrade absurd_sqla"
        if self.app_managed:
            return LEGACY_APP_UPGRADE_COMMAND
        return MIGRATE_COMMAND

    def message(self) -> str:
        if self.is_current:
            return f"The absurd schema is at {self.head}, this release's head."
        where = f"recorded in {self.version_table}"
        if not self.known:
            return (
                f"The absurd schema is at {', '.join(self.revisions)} ({where}), a revision "
                f"this absurd_sqla (head {self.head}) does not ship: a newer release "
                f"migrated it. Run `{self.fix}`."
            )
        if self.app_managed:
            return (
                f"The absurd schema is at {', '.join(self.revisions)}, {where}, your "
                f"application's Alembic history; this absurd_sqla needs {self.head}. "
                f"Run `{self.fix}` in your application's project (or move absurd out of "
                "that history, see docs/migrations.md)."
            )
        fixes = (
            f"`{MIGRATE_COMMAND}`, or `{APP_UPGRADE_COMMAND}` in a project whose env.py "
            "calls absurd_sqla.migrate.run_migrations"
        )
        if self.revisions and self.schema_exists:
            return (
                f"The absurd schema is at {', '.join(self.revisions)} ({where}); this "
                f"absurd_sqla needs {self.head}. Run {fixes}."
            )
        if self.schema_exists:
            return (
                "The absurd schema exists but no Alembic version table records its "
                f"revision; this absurd_sqla needs {self.head}. If it matches that "
                "revision, record it with absurd_sqla.migrate.stamp(); otherwise drop "
                f"it. Then run {fixes}."
            )
        return f"The absurd schema is not installed in this database. Run {fixes}."


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_bare_config())


_VERSION_TABLES = text(
    """
    SELECT n.nspname, c.relname
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE a.attname = 'version_num' AND NOT a.attisdropped
      AND c.relkind IN ('r', 'p')
      AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND has_table_privilege(c.oid, 'SELECT')
    ORDER BY c.relname <> :ours, n.nspname, c.relname
    """
)


def _recorded(conn: Connection, known: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Every version table holding absurd revisions: ``(schema.table, revisions)``.

    Ours first; then any other table with a ``version_num`` column (Alembic's), as
    an application's history that took in absurd's revisions has.
    """
    found = []
    for schema, name in conn.execute(_VERSION_TABLES, {"ours": VERSION_TABLE}):
        versions = table(name, column("version_num"), schema=schema)
        rows = set(conn.scalars(select(versions.c.version_num)))
        if name != VERSION_TABLE:
            rows = {r for r in rows if r in known or str(r).startswith(REVISION_PREFIX)}
        if rows:
            found.append((f"{schema}.{name}", tuple(sorted(rows))))
    return found


def schema_status(bind: Connection | Engine) -> SchemaStatus:
    """Where the ``absurd`` schema of ``bind``'s database stands.

    Looks in ``absurd_alembic_version`` (standalone, and the documented
    application setup) and in any other Alembic version table (an application
    history that includes absurd's revisions itself). Reads only.
    """
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return schema_status(conn)
    script = _script()
    head = script.get_revision("absurd@head")
    assert head is not None
    known = {rev.revision for rev in script.walk_revisions()}
    exists = bool(
        bind.scalar(text("SELECT count(*) FROM pg_namespace WHERE nspname = :s"), {"s": SCHEMA})
    )
    recorded = _recorded(bind, known)
    where, revisions = recorded[0] if recorded else (None, ())
    return SchemaStatus(
        head=head.revision,
        schema_exists=exists,
        version_table=where,
        revisions=revisions,
        known=all(r in known for r in revisions),
    )


def check_schema_current(bind: Connection | Engine) -> None:
    """Raise :class:`~absurd_sqla.SchemaNotCurrent` unless ``absurd`` is at our head.

    The message names the command that fixes it. Takes a sync ``Connection`` (or
    an ``Engine``); from asyncio: ``await conn.run_sync(check_schema_current)``.
    """
    status = schema_status(bind)
    if not status.is_current:
        raise SchemaNotCurrent(status.message(), status=status)


def refuse_foreign_history(conn: Connection) -> None:
    """Before ``upgrade``: stop if absurd's schema is not ours to migrate.

    A schema whose revision sits in an application's history, or in no history at
    all, would otherwise make the first revision fail half-way with
    ``DuplicateFunction`` / ``DuplicateTable``.
    """
    status = schema_status(conn)
    if status.app_managed:
        raise AbsurdError(
            f"The absurd schema in this database is managed by your application's own "
            f"Alembic history: {status.version_table} records {', '.join(status.revisions)}. "
            f"`{MIGRATE_COMMAND}` and absurd_sqla.migrate.upgrade() keep their own "
            f"history in {VERSION_TABLE} and would create the schema a second time. "
            f"Run `{LEGACY_APP_UPGRADE_COMMAND}` in your application's project instead, "
            "or move absurd out of that history first (docs/migrations.md, "
            '"Moving absurd out of your history").'
        )
    if status.version_table is None and _has_objects(conn):
        raise AbsurdError(
            "The absurd schema exists but no Alembic version table records its revision "
            "(was it made with metadata.create_all()?), so its migrations cannot run on "
            "it. If it matches this release, record it with absurd_sqla.migrate.stamp(); "
            "otherwise drop the schema and migrate again."
        )


def _has_objects(conn: Connection) -> bool:
    found = conn.scalar(
        text(
            """
            SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n
                             ON n.oid = c.relnamespace WHERE n.nspname = :s)
                OR EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n
                             ON n.oid = p.pronamespace WHERE n.nspname = :s)
            """
        ),
        {"s": SCHEMA},
    )
    return bool(found)
