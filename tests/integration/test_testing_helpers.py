"""``absurd_sqla.testing``'s assertions on what was spawned, sync and async."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from absurd_sqla import Absurd
from absurd_sqla.testing import (
    ANY,
    assert_not_spawned,
    assert_spawned,
    run_until_idle,
    spawned_tasks,
)
from tests.support import async_app_for, run_async


def test_assert_spawned_finds_the_committed_task(app: Absurd) -> None:
    app.create_queue("mail")
    first = app.spawn("welcome", {"user": 1, "at": "t1"})
    second = app.spawn("welcome", {"user": 2, "at": "t2"}, queue="mail")
    assert assert_spawned(app, "welcome", {"user": 1, "at": "t1"}).task_id == first.task_id
    assert assert_spawned(app, "welcome").task_id == second.task_id  # the newest
    found = assert_spawned(app, "welcome", {"user": 2, "at": mock.ANY}, queue="mail")
    assert (found.task_id, found.queue_name, found.state) == (second.task_id, "mail", "pending")
    assert_spawned(app, "welcome", ANY, count=2)
    assert [t.task_id for t in spawned_tasks(app)] == [first.task_id, second.task_id]
    assert spawned_tasks(app, "welcome", queue="default")[0].params == {"user": 1, "at": "t1"}


def test_assert_spawned_explains_a_miss(app: Absurd) -> None:
    app.spawn("welcome", {"user": 1})
    with pytest.raises(AssertionError, match=r"params: \{'user': 1\}"):
        assert_spawned(app, "welcome", {"user": 2})
    with pytest.raises(AssertionError, match="none named 'goodbye' was"):
        assert_spawned(app, "goodbye")
    with pytest.raises(AssertionError, match="expected 2 of a task 'welcome', found 1"):
        assert_spawned(app, "welcome", count=2)
    with pytest.raises(AssertionError, match="expected no task 'welcome', found 1"):
        assert_not_spawned(app, "welcome")
    assert_not_spawned(app, "welcome", {"user": 2})
    assert_not_spawned(app, "welcome", queue="other")


def test_a_rolled_back_spawn_is_not_spawned(app: Absurd) -> None:
    with Session(app.engine) as session:
        app.spawn("welcome", {}, session=session)
        with pytest.raises(AssertionError):  # not visible before the commit
            assert_spawned(app, "welcome")
        session.rollback()
    assert_not_spawned(app, "welcome")


@run_async
async def test_the_assertions_on_an_async_app(clean_db: Engine, database_url: str) -> None:
    async with async_app_for(database_url) as app:

        @app.register_task("welcome")
        async def welcome(params: Any, ctx: Any) -> str:
            return "hi"

        spawned = await app.spawn("welcome", {"user": 3})
        found = await assert_spawned(app, "welcome", {"user": 3})
        assert found.task_id == spawned.task_id and found.state == "pending"
        await run_until_idle(app)
        assert (await assert_spawned(app, "welcome")).state == "completed"
        await assert_not_spawned(app, "goodbye")
        with pytest.raises(AssertionError):
            await assert_not_spawned(app, "welcome")
        assert len(await spawned_tasks(app, "welcome")) == 1
