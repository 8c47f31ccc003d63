"""The dashboard's one way to the database: the client's inspection and
action methods, awaited on an ``AsyncAbsurd`` or run in Starlette's thread
pool for an ``Absurd`` (whose calls block)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from .._core import SpawnResult
from .._inspect import EventInfo, MinuteCount, QueueStats, TaskDetail, TaskPage, WaitingTask
from ..client import Absurd
from ..client_async import AsyncAbsurd

T = TypeVar("T")


class Source:
    """The subset of the client the dashboard uses, always as coroutines."""

    def __init__(self, client: Absurd | AsyncAbsurd) -> None:
        if not isinstance(client, (Absurd, AsyncAbsurd)):
            raise TypeError(
                f"create_dashboard() takes an Absurd or an AsyncAbsurd, got {type(client).__name__}"
            )
        self._client = client

    async def _call(self, name: str, result: Callable[[Any], T], /, *args: Any, **kw: Any) -> T:
        method = getattr(self._client, name)
        if isinstance(self._client, AsyncAbsurd):
            return result(await method(*args, **kw))
        return result(await run_in_threadpool(method, *args, **kw))

    async def list_queues(self) -> list[str]:
        return await self._call("list_queues", list)

    async def queue_stats(self) -> list[QueueStats]:
        return await self._call("queue_stats", list)

    async def throughput(self, queue: str, minutes: int = 60) -> list[MinuteCount]:
        return await self._call("queue_throughput", list, queue, minutes=minutes)

    async def list_tasks(self, **filters: Any) -> TaskPage:
        return await self._call("list_tasks", _page, **filters)

    async def get_task(self, task_id: uuid.UUID) -> TaskDetail:
        return await self._call("get_task", _detail, task_id)

    async def list_events(self, queue: str | None, limit: int) -> list[EventInfo]:
        return await self._call("list_events", list, queue=queue, limit=limit)

    async def list_waits(self, queue: str | None, limit: int) -> list[WaitingTask]:
        return await self._call("list_waits", list, queue=queue, limit=limit)

    async def retry_task(self, task_id: uuid.UUID) -> SpawnResult:
        return await self._call("retry_task", _spawned, task_id)

    async def cancel_task(self, task_id: uuid.UUID, reason: str | None) -> bool:
        return await self._call("cancel_task", bool, task_id, reason)


def _page(value: Any) -> TaskPage:
    assert isinstance(value, TaskPage)
    return value


def _detail(value: Any) -> TaskDetail:
    assert isinstance(value, TaskDetail)
    return value


def _spawned(value: Any) -> SpawnResult:
    assert isinstance(value, SpawnResult)
    return value
