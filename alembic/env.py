from alembic import context

from absurd_sqla._alembic_env import run

run(context)  # type: ignore[arg-type]  # alembic exposes the context as a module proxy
