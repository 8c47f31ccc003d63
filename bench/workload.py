"""The benchmarks' task bodies, one definition each, for every script (and,
in ``compare.py``, for both systems: their task APIs match).

Imported as ``from workload import ...``: bench/ is on sys.path when a script
in it runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any


def three_steps(params: dict[str, Any], ctx: Any) -> int:
    """Three checkpointed steps, each a trivial computation."""
    a = ctx.step("fetch", lambda: params["i"])
    b = ctx.step("transform", lambda: a * 2)
    return int(ctx.step("store", lambda: b + 1))


async def three_steps_async(params: dict[str, Any], ctx: Any) -> int:
    """``three_steps`` for the asyncio clients."""

    async def fetch() -> int:
        return int(params["i"])

    a = await ctx.step("fetch", fetch)

    async def transform() -> int:
        return a * 2

    b = await ctx.step("transform", transform)

    async def store() -> int:
        return b + 1

    return int(await ctx.step("store", store))


def waiter(
    suspending: threading.Semaphore, resumed: dict[str, float]
) -> Callable[[dict[str, Any], Any], None]:
    """A task that checkpoints a step, says it is about to suspend, awaits
    ``params["event"]`` and records when it runs again."""

    def wait(params: dict[str, Any], ctx: Any) -> None:
        handle = ctx.begin_step("announce")
        if not handle.done:
            ctx.complete_step(handle, True)
            suspending.release()  # about to suspend on the event
        ctx.await_event(params["event"])
        resumed[params["event"]] = time.perf_counter()

    return wait


def waiter_async(
    suspending: threading.Semaphore, resumed: dict[str, float]
) -> Callable[[dict[str, Any], Any], Awaitable[None]]:
    """``waiter`` for the asyncio clients."""

    async def wait(params: dict[str, Any], ctx: Any) -> None:
        handle = await ctx.begin_step("announce")
        if not handle.done:
            await ctx.complete_step(handle, True)
            suspending.release()  # about to suspend on the event
        await ctx.await_event(params["event"])
        resumed[params["event"]] = time.perf_counter()

    return wait
