"""An application's Alembic setup, the way docs/migrations.md tells a user to build it.

Each step runs the ``alembic`` command in a subprocess, in a project made by
``alembic init`` in a temporary directory, against a real PostgreSQL: the
application's revisions land in its own versions directory (never in the
installed package), ``alembic upgrade head`` runs absurd's revisions and the
application's, and the application's history goes down alone. Also here:
autogenerate leaves absurd's objects alone, ``check_schema_current`` and the
refusal of ``migrate.upgrade`` on a schema that an application's history manages.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, create_engine, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import absurd_sqla
from absurd_sqla import AbsurdError, SchemaNotCurrent, metadata, migrate

DOCS = Path(__file__).resolve().parents[2] / "docs" / "migrations.md"
PACKAGE_VERSIONS = Path(absurd_sqla.__file__).parent / "migrations" / "versions"
SCHEMA = "absurd"
ABSURD_TABLES = {t.name for t in metadata.tables.values()}
HEAD = ScriptDirectory.from_config(migrate.config("postgresql://x/y")).get_revision("absurd@head")
assert HEAD is not None
HEAD_ID = HEAD.revision

# --- the application (env.py and the move out of an old setup: shown verbatim in the docs)

APP_ENV_PY = """\
from logging.config import fileConfig

from alembic import context
from sqlalchemy import engine_from_config, pool

from absurd_sqla import migrate
from myapp.models import Base

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        include_object=migrate.include_object,  # absurd's tables are not yours to diff
    )
    with context.begin_transaction():
        migrate.run_migrations(context)  # absurd's revisions, then yours


def run_migrations_online() -> None:
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            include_object=migrate.include_object,  # absurd's tables are not yours to diff
        )
        with context.begin_transaction():
            migrate.run_migrations(context)  # absurd's revisions, then yours


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
"""

MOVE_OUT_OF_APP_HISTORY = """\
from sqlalchemy import create_engine, text

from absurd_sqla import migrate

engine = create_engine("postgresql+psycopg://localhost/myapp")
with engine.begin() as conn:
    conn.execute(text("DELETE FROM alembic_version WHERE starts_with(version_num, 'absurd_')"))
    migrate.stamp(conn)  # records absurd@head in absurd_alembic_version
"""

DOCUMENTED_COMMANDS = [
    "alembic init alembic",
    'alembic revision --autogenerate -m "invoices"',
    "alembic upgrade head",
    "alembic downgrade base",
]

# The user's models: first an invoices table referring to absurd's tasks...
MODELS_V1 = """\
import uuid

from sqlalchemy import ForeignKey, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from absurd_sqla.models import Task


class Base(DeclarativeBase):
    pass


class Invoice(Base):
    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(Text)
    task_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey(Task.task_id))
"""
# ...then a column more.
MODELS_V2 = MODELS_V1 + "    note: Mapped[str | None] = mapped_column(Text)\n"


# --- helpers ---------------------------------------------------------------------------


def run_alembic(
    *args: str, cwd: Path, extra_versions: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``alembic ARGS`` as a user runs it (``python -m alembic``), in ``cwd``.

    ``extra_versions``: a directory of fake absurd revisions, added to the package's
    own for this process only (a future absurd_sqla release).
    """
    argv = [sys.executable, "-m", "alembic", *args]
    if extra_versions is not None:
        argv = [
            sys.executable,
            "-c",
            "import sys; from absurd_sqla import migrate; "
            "migrate.VERSION_LOCATION += ' ' + sys.argv[1]; "
            "from alembic.config import main; main(argv=sys.argv[2:], prog='alembic')",
            str(extra_versions),
            *args,
        ]
    env = {k: v for k, v in os.environ.items() if k not in ("ABSURD_DATABASE_URL", "PGDATABASE")}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"alembic {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return done


def init_project(root: Path, url: str, *, subprocess: bool = False) -> Path:
    """``alembic init alembic``, then the docs' edits: the URL and env.py. Returns versions/.

    In-process unless ``subprocess`` (each ``alembic`` process takes a second or two).
    """
    if subprocess:
        run_alembic("init", "alembic", cwd=root)
    else:
        command.init(Config(root / "alembic.ini"), str(root / "alembic"))
    ini = root / "alembic.ini"
    generated = "sqlalchemy.url = driver://user:pass@localhost/dbname"
    assert generated in ini.read_text()
    ini.write_text(ini.read_text().replace(generated, f"sqlalchemy.url = {url}"))
    (root / "alembic" / "env.py").write_text(APP_ENV_PY)
    (root / "myapp").mkdir()
    (root / "myapp" / "__init__.py").write_text("")
    (root / "myapp" / "models.py").write_text(MODELS_V1)
    return root / "alembic" / "versions"


def revision_files(versions: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in versions.glob("*.py")}


def package_files() -> set[str]:
    return {p.name for p in PACKAGE_VERSIONS.glob("*.py")}


def tables(engine: Engine, schema: str | None = None) -> set[str]:
    with engine.connect() as conn:
        return set(inspect(conn).get_table_names(schema=schema))


def columns(engine: Engine, name: str) -> set[str]:
    with engine.connect() as conn:
        return {c["name"] for c in inspect(conn).get_columns(name)}


def versions(engine: Engine, table: str) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(text(f"SELECT version_num FROM public.{table}")))


def schema_exists(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.scalar(text("SELECT count(*) FROM pg_namespace WHERE nspname = 'absurd'")))


@pytest.fixture
def engine(fresh_database: str) -> Iterator[Engine]:
    eng = create_engine(fresh_database, poolclass=NullPool)
    yield eng
    eng.dispose()


def make_app_managed(engine: Engine) -> None:
    """A database set up the old way: absurd's head in the application's alembic_version."""
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE public.alembic_version (version_num VARCHAR(32) NOT NULL,"
                " CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
            )
        )
        conn.execute(text("INSERT INTO alembic_version SELECT * FROM absurd_alembic_version"))
        conn.execute(text("DROP TABLE public.absurd_alembic_version"))


# --- the journey -----------------------------------------------------------------------


def test_the_documented_journey(fresh_database: str, engine: Engine, tmp_path: Path) -> None:
    before = package_files()
    versions_dir = init_project(tmp_path, fresh_database, subprocess=True)

    # The first revision: in the app's versions dir, a new base, nothing of absurd's.
    run_alembic("revision", "--autogenerate", "-m", "invoices", cwd=tmp_path)
    (first_name, first), *more = revision_files(versions_dir).items()
    assert more == []
    assert package_files() == before, "a revision was written into the installed package"
    assert re.search(r"^down_revision\b.*= None$", first, re.MULTILINE)  # a base of its own
    assert "op.create_table('invoices'" in first
    assert "absurd.tasks.task_id" in first  # the foreign key, to a table not created here
    for word in ("absurd_alembic_version", "schema='absurd'", "'queues'", "'runs'"):
        assert word not in first
    # Generating a revision migrates nothing, absurd included.
    assert not schema_exists(engine)

    run_alembic("upgrade", "head", cwd=tmp_path)
    first_id = first_name.split("_", 1)[0]
    assert tables(engine, SCHEMA) == ABSURD_TABLES
    assert {"invoices", "alembic_version", "absurd_alembic_version"} <= tables(engine)
    assert versions(engine, "alembic_version") == {first_id}
    assert versions(engine, "absurd_alembic_version") == {HEAD_ID}
    migrate.check_schema_current(engine)

    # With absurd's tables present, autogenerate still proposes nothing about them.
    run_alembic("check", cwd=tmp_path)

    # The second revision follows the first, in the app's dir.
    (tmp_path / "myapp" / "models.py").write_text(MODELS_V2)
    run_alembic("revision", "--autogenerate", "-m", "invoice note", cwd=tmp_path)
    files = revision_files(versions_dir)
    assert len(files) == 2 and package_files() == before
    second = next(body for name, body in files.items() if name != first_name)
    # The annotation differs between Alembic releases; the value does not.
    assert re.search(rf"^down_revision\b.*= '{first_id}'$", second, re.MULTILINE)
    assert "op.add_column('invoices', sa.Column('note'" in second
    assert "absurd" not in second.replace("invoice note", "")
    run_alembic("upgrade", "head", cwd=tmp_path)
    assert "note" in columns(engine, "invoices")

    # Down, the app's history alone: absurd's schema and version stay.
    run_alembic("downgrade", "base", cwd=tmp_path)
    assert "invoices" not in tables(engine)
    assert versions(engine, "alembic_version") == set()
    assert tables(engine, SCHEMA) == ABSURD_TABLES
    assert versions(engine, "absurd_alembic_version") == {HEAD_ID}


APP_REVISION = """\
import sqlalchemy as sa
from alembic import op

revision = "app_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("invoices", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade():
    op.drop_table("invoices")
"""

FAKE_REVISION = """\
import sqlalchemy as sa
from alembic import op

revision = "absurd_9001_fake"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("fake_extra", sa.Column("id", sa.Integer(), primary_key=True), schema="absurd")


def downgrade():
    op.drop_table("fake_extra", schema="absurd")
"""


def test_a_new_absurd_revision_arrives_with_upgrade_head(
    fresh_database: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    versions_dir = init_project(project, fresh_database)
    (versions_dir / "app_0001_invoices.py").write_text(APP_REVISION)
    migrate.upgrade(engine)  # what the app's `alembic upgrade head` did so far, for absurd

    # A later absurd_sqla ships a second revision on absurd's branch.
    future = tmp_path / "future"
    future.mkdir()
    (future / "absurd_9001_fake.py").write_text(FAKE_REVISION.format(head=HEAD_ID))
    monkeypatch.setattr(migrate, "VERSION_LOCATION", f"{migrate.VERSION_LOCATION} {future}")

    with pytest.raises(SchemaNotCurrent) as raised:
        migrate.check_schema_current(engine)
    message = str(raised.value)
    assert f"at {HEAD_ID}" in message and "needs absurd_9001_fake" in message
    assert "`absurd-sqla migrate`" in message and "`alembic upgrade head`" in message

    # Plain `upgrade head` applies absurd's new revision, then the app's.
    run_alembic("upgrade", "head", cwd=project, extra_versions=future)
    assert "fake_extra" in tables(engine, SCHEMA)
    assert versions(engine, "absurd_alembic_version") == {"absurd_9001_fake"}
    assert versions(engine, "alembic_version") == {"app_0001"}
    assert "invoices" in tables(engine)
    migrate.check_schema_current(engine)


# --- autogenerate ----------------------------------------------------------------------


def proposed(engine: Engine, target: MetaData, **opts: object) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts=opts)
        return list(compare_metadata(context, target))


def test_include_object_keeps_absurd_out_of_autogenerate(engine: Engine) -> None:
    migrate.upgrade(engine)
    everything = {"include_schemas": True}
    filtered = {**everything, "include_object": migrate.include_object}
    # Reflecting every schema, with no metadata for absurd: nothing to drop...
    assert proposed(engine, MetaData(), **filtered) == []
    # ...where, unfiltered, autogenerate would drop every absurd table and our version table.
    dropped = {
        change[1].name  # type: ignore[index]
        for change in proposed(engine, MetaData(), **everything)
        if change[0] == "remove_table"  # type: ignore[index]
    }
    assert dropped == ABSURD_TABLES | {"absurd_alembic_version"}
    # absurd's metadata without its schema reflected: nothing to create either.
    assert proposed(engine, metadata, include_object=migrate.include_object) == []
    unfiltered = proposed(engine, metadata)
    kinds = {(change[0], change[1].name) for change in unfiltered if "table" in change[0]}  # type: ignore[index]
    assert kinds == {("add_table", name) for name in ABSURD_TABLES} | {
        ("remove_table", "absurd_alembic_version")
    }


# --- check_schema_current ----------------------------------------------------------------


def test_check_schema_current(fresh_database: str, engine: Engine) -> None:
    with pytest.raises(SchemaNotCurrent, match=r"not installed.*`absurd-sqla migrate`"):
        migrate.check_schema_current(engine)
    status = migrate.schema_status(engine)
    assert (status.is_current, status.schema_exists, status.version_table) == (False, False, None)

    migrate.upgrade(fresh_database)
    with engine.connect() as conn:
        migrate.check_schema_current(conn)  # a Connection or an Engine
    status = migrate.schema_status(engine)
    assert status.is_current and status.revisions == (HEAD_ID,) and status.head == HEAD_ID
    assert status.version_table == "public.absurd_alembic_version"

    async def check_async() -> None:
        async_engine = create_async_engine(fresh_database, poolclass=NullPool)
        try:
            async with async_engine.connect() as conn:
                await conn.run_sync(migrate.check_schema_current)
        finally:
            await async_engine.dispose()

    asyncio.run(check_async())

    # A revision from a newer release: upgrade the package, not the database.
    with engine.begin() as conn:
        conn.execute(text("UPDATE absurd_alembic_version SET version_num = 'absurd_9999_new'"))
    with pytest.raises(SchemaNotCurrent, match=r"does not ship.*pip install --upgrade") as raised:
        migrate.check_schema_current(engine)
    assert isinstance(raised.value, absurd_sqla.AbsurdError)
    assert raised.value.status == migrate.schema_status(engine)

    # Behind: at the revision before the head.
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE absurd_alembic_version SET version_num = '{HEAD_ID}'"))
    if HEAD.down_revision is not None:
        migrate.downgrade(engine, str(HEAD.down_revision))
        with pytest.raises(SchemaNotCurrent) as raised:
            migrate.check_schema_current(engine)
        assert f"at {HEAD.down_revision} (recorded in public.absurd_alembic_version)" in str(
            raised.value
        )
        assert f"needs {HEAD_ID}. Run `absurd-sqla migrate`" in str(raised.value)
        migrate.upgrade(engine)
        migrate.check_schema_current(engine)

    # Downgraded: nothing recorded, no schema.
    migrate.downgrade(engine)
    with pytest.raises(SchemaNotCurrent, match="`absurd-sqla migrate`"):
        migrate.check_schema_current(engine)


def test_check_sees_a_schema_in_the_applications_history(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_app_managed(engine)
    status = migrate.schema_status(engine)
    assert status.app_managed and status.version_table == "public.alembic_version"
    migrate.check_schema_current(engine)  # at head, wherever it is recorded

    # Behind: the fix is the application's own command.
    (tmp_path / "absurd_9001_fake.py").write_text(FAKE_REVISION.format(head=HEAD_ID))
    monkeypatch.setattr(migrate, "VERSION_LOCATION", f"{migrate.VERSION_LOCATION} {tmp_path}")
    with pytest.raises(SchemaNotCurrent) as raised:
        migrate.check_schema_current(engine)
    message = str(raised.value)
    assert "public.alembic_version" in message and "needs absurd_9001_fake" in message
    assert "Run `alembic upgrade heads` in your application's project" in message


# --- migrate.upgrade on a schema that is not its own ---------------------------------


def test_upgrade_refuses_a_schema_the_application_history_manages(
    fresh_database: str, engine: Engine
) -> None:
    make_app_managed(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO alembic_version VALUES ('app_0001')"))
    for target in (fresh_database, engine):
        with pytest.raises(AbsurdError) as raised:
            migrate.upgrade(target)
        message = str(raised.value)
        assert "managed by your application's own Alembic history" in message
        assert "public.alembic_version" in message and "`alembic upgrade heads`" in message
    # Before changing anything.
    assert "absurd_alembic_version" not in tables(engine)
    assert versions(engine, "alembic_version") == {HEAD_ID, "app_0001"}


def test_cli_migrate_explains_an_application_managed_schema(
    fresh_database: str, engine: Engine
) -> None:
    make_app_managed(engine)
    done = subprocess.run(
        [sys.executable, "-m", "absurd_sqla", "migrate", "--database-url", fresh_database],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "managed by your application's own Alembic history" in done.stderr
    assert "Duplicate" not in done.stderr and "Traceback" not in done.stderr


def test_upgrade_refuses_a_schema_no_history_records(engine: Engine) -> None:
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE public.absurd_alembic_version"))
    with pytest.raises(AbsurdError, match="no Alembic version table records"):
        migrate.upgrade(engine)
    with pytest.raises(SchemaNotCurrent, match=r"migrate\.stamp\(\)"):
        migrate.check_schema_current(engine)
    migrate.stamp(engine)
    migrate.check_schema_current(engine)
    migrate.upgrade(engine)  # a no-op now


def test_moving_absurd_out_of_the_application_history(
    fresh_database: str, engine: Engine, tmp_path: Path
) -> None:
    make_app_managed(engine)
    # The docs' block, on this database.
    source = MOVE_OUT_OF_APP_HISTORY.replace("postgresql+psycopg://localhost/myapp", fresh_database)
    namespace: dict[str, object] = {}
    exec(compile(source, "docs/migrations.md", "exec"), namespace)
    namespace["engine"].dispose()  # type: ignore[attr-defined]
    assert versions(engine, "alembic_version") == set()
    assert versions(engine, "absurd_alembic_version") == {HEAD_ID}

    versions_dir = init_project(tmp_path, fresh_database)
    (versions_dir / "app_0001_invoices.py").write_text(APP_REVISION)
    run_alembic("upgrade", "head", cwd=tmp_path)
    assert "invoices" in tables(engine)
    migrate.check_schema_current(engine)


def test_docs_show_the_tested_setup() -> None:
    docs = DOCS.read_text()
    assert APP_ENV_PY in docs
    assert MOVE_OUT_OF_APP_HISTORY in docs
    for line in DOCUMENTED_COMMANDS:
        assert line in docs, line
    assert "include_object=migrate.include_object" in docs
