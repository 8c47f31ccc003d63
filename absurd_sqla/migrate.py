"""Run absurd_sqla's own Alembic migrations, standalone.

    from absurd_sqla import migrate
    migrate.upgrade("postgresql://localhost/app")      # or an Engine / Connection

The revisions carry the branch label ``absurd``. Standalone they keep their
place in ``public.absurd_alembic_version``; to put them into your own Alembic
history instead, add ``absurd_sqla:migrations/versions`` to your
``version_locations`` (see docs/migrations.md).
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL

from ._engine import default_url, normalize_url

SCRIPT_LOCATION = "absurd_sqla:migrations"
VERSION_LOCATION = "absurd_sqla:migrations/versions"

Target = str | URL | Engine | Connection | None


def config(bind: Target = None) -> Config:
    """An Alembic ``Config`` for the shipped revisions, pointed at ``bind``."""
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.set_main_option("version_locations", VERSION_LOCATION)
    cfg.set_main_option("path_separator", "space")
    if isinstance(bind, Engine | Connection):
        cfg.attributes["connection"] = bind
    else:
        # The URL object itself, not its rendering as an ini option: options go through
        # configparser interpolation, where the "%" of an escaped password or of a
        # ``?host=`` socket directory is a syntax error. _alembic_env reads it back.
        cfg.attributes["url"] = normalize_url(bind if bind is not None else default_url())
    return cfg


def upgrade(bind: Target = None, revision: str = "absurd@head") -> None:
    """Create or bring up to date the ``absurd`` schema."""
    command.upgrade(config(bind), revision)


def downgrade(bind: Target = None, revision: str = "absurd@base") -> None:
    """Remove the ``absurd`` schema and every table in it (``absurd@base``)."""
    command.downgrade(config(bind), revision)
