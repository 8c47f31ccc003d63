"""``python -m absurd_sqla``: the ``absurd-sqla`` command."""

from .cli import main

raise SystemExit(main())
