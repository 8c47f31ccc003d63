"""``get_current_context()``: the context of the task running here.

A ``contextvars.ContextVar``, so each thread and each asyncio task sees its
own handler's context (or None), never a neighbour's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from .context import TaskContext
    from .context_async import AsyncTaskContext

    AnyContext: TypeAlias = TaskContext | AsyncTaskContext

_current: ContextVar[AnyContext | None] = ContextVar("absurd_sqla_current_context", default=None)


def get_current_context() -> AnyContext | None:
    """The running task's context inside a handler (and code it calls); None outside."""
    return _current.get()


@contextlib.contextmanager
def running(ctx: AnyContext) -> Iterator[None]:
    """Make ``ctx`` the current context for the duration of a handler call."""
    token = _current.set(ctx)
    try:
        yield
    finally:
        _current.reset(token)
