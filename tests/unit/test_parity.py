"""The sync and asyncio APIs are one API: ``Absurd`` / ``AsyncAbsurd`` and
``TaskContext`` / ``AsyncTaskContext`` have the same public names with the same
parameters, and on the async side every method that does I/O is a coroutine
function (the few that are not are listed here, by name)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import absurd_sqla
from absurd_sqla import Absurd, AsyncAbsurd, AsyncTaskContext, TaskContext

PAIRS = [(Absurd, AsyncAbsurd), (TaskContext, AsyncTaskContext)]

# Members of the async classes that are deliberately not coroutine functions.
NOT_COROUTINES: dict[type, set[str]] = {
    # A decorator applied at import time, and a stop callable from any thread.
    AsyncAbsurd: {"register_task", "stop_worker"},
    # run_step is a decorator whose result is the awaitable.
    AsyncTaskContext: {"run_step"},
}
PROPERTIES: dict[type, set[str]] = {
    AsyncAbsurd: {"engine", "session_factory", "queue_name"},
    AsyncTaskContext: {"task_id", "run_id", "attempt", "task_name", "queue_name", "headers"},
}


def public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def parameters(function: Any) -> list[tuple[str, Any, Any]]:
    """(name, kind, default) of each parameter; annotations differ by design."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize(("sync", "asyncio"), PAIRS, ids=lambda cls: cls.__name__)
def test_the_same_public_names(sync: type, asyncio: type) -> None:
    assert public(sync) == public(asyncio)
    assert public(asyncio) >= {"spawn", "emit_event"}  # a class found empty proves nothing


@pytest.mark.parametrize(("sync", "asyncio"), PAIRS, ids=lambda cls: cls.__name__)
def test_the_same_parameters(sync: type, asyncio: type) -> None:
    for name in sorted(public(sync) | {"__init__"}):
        sync_member = inspect.getattr_static(sync, name)
        async_member = inspect.getattr_static(asyncio, name)
        if isinstance(sync_member, property):
            assert isinstance(async_member, property), name
            continue
        assert callable(sync_member) and callable(async_member), name
        assert parameters(sync_member) == parameters(async_member), name


def test_the_compared_signatures_are_the_real_ones() -> None:
    """getattr_static sees the functions themselves, not a wrapper's (*args, **kwargs)."""
    spawn = parameters(inspect.getattr_static(AsyncAbsurd, "spawn"))
    assert [name for name, _, _ in spawn][:3] == ["self", "task_name", "params"]
    assert ("session", inspect.Parameter.KEYWORD_ONLY, None) in spawn


@pytest.mark.parametrize("cls", [AsyncAbsurd, AsyncTaskContext], ids=lambda cls: cls.__name__)
def test_every_io_method_of_the_async_side_is_a_coroutine_function(cls: type) -> None:
    exempt = NOT_COROUTINES[cls] | PROPERTIES[cls]
    for name in sorted(public(cls)):
        member = inspect.getattr_static(cls, name)
        if name in PROPERTIES[cls]:
            assert isinstance(member, property), name
        elif name in NOT_COROUTINES[cls]:
            assert callable(member) and not inspect.iscoroutinefunction(member), name
        else:
            assert inspect.iscoroutinefunction(member), f"{cls.__name__}.{name} is not async"
    assert public(cls) >= exempt, "a listed exemption no longer exists"


@pytest.mark.parametrize("cls", [Absurd, TaskContext], ids=lambda cls: cls.__name__)
def test_nothing_on_the_sync_side_is_a_coroutine_function(cls: type) -> None:
    for name in sorted(public(cls)):
        assert not inspect.iscoroutinefunction(inspect.getattr_static(cls, name)), name


def test_the_package_exports_both_clients_and_contexts() -> None:
    for name, cls in [
        ("Absurd", Absurd),
        ("AsyncAbsurd", AsyncAbsurd),
        ("TaskContext", TaskContext),
        ("AsyncTaskContext", AsyncTaskContext),
    ]:
        assert name in absurd_sqla.__all__
        assert getattr(absurd_sqla, name) is cls
