"""The app a worker process serves: ``python -m absurd_sqla.cli worker
tests.faults.worker_app:app`` with ``ABSURD_FAULT_URL`` set."""

from __future__ import annotations

import os

from tests.faults.tasks import build_app

app = build_app(os.environ["ABSURD_FAULT_URL"])
