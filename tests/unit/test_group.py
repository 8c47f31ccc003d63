"""Group commit (``absurd_sqla._group``), without a database: who writes alone,
who goes together, and what a failed group does. Both forms: threads for the
sync ``Group``, tasks for the asyncio one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from absurd_sqla._group import Group
from absurd_sqla._group_async import Group as AsyncGroup
from tests.support import DEADLINE, wait_until


class Recorder:
    """``one`` and ``many`` that record their calls; the write of item 0
    waits for ``release`` (a write in flight)."""

    def __init__(self, fail_many: bool = False, fail_one: int | None = None) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.in_flight = threading.Event()
        self.release = threading.Event()
        self.fail_many = fail_many
        self.fail_one = fail_one

    def one(self, item: int) -> int:
        self.calls.append(("one", [item]))
        if item == 0:
            self.in_flight.set()
            assert self.release.wait(DEADLINE)
        if item == self.fail_one:
            raise ValueError(f"item {item}")
        return item * 10

    def many(self, items: Sequence[int]) -> list[int]:
        self.calls.append(("many", list(items)))
        if self.fail_many:
            raise RuntimeError("the group statement failed")
        return [item * 10 for item in items]


def test_a_lone_write_is_written_alone_at_once() -> None:
    recorder = Recorder()
    group = Group(recorder.one, recorder.many)
    assert group.write(7) == 70
    assert recorder.calls == [("one", [7])]
    assert group.groups == 0


def run_grouped(recorder: Recorder) -> dict[int, object]:
    group = Group(recorder.one, recorder.many)
    outcomes: dict[int, object] = {}

    def write(item: int) -> None:
        try:
            outcomes[item] = group.write(item)
        except Exception as exc:
            outcomes[item] = exc

    threads = [threading.Thread(target=write, args=(item,)) for item in range(4)]
    threads[0].start()
    assert recorder.in_flight.wait(DEADLINE)
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: group.waiting == 3, "three writers waiting")
    recorder.release.set()
    for thread in threads:
        thread.join(DEADLINE)
    return outcomes


def test_writes_that_arrive_while_one_is_in_flight_go_together() -> None:
    recorder = Recorder()
    outcomes = run_grouped(recorder)
    assert outcomes == {0: 0, 1: 10, 2: 20, 3: 30}
    assert recorder.calls == [("one", [0]), ("many", [1, 2, 3])]


def test_a_failed_group_writes_each_item_alone_and_keeps_each_error() -> None:
    recorder = Recorder(fail_many=True, fail_one=2)
    outcomes = run_grouped(recorder)
    assert outcomes[1] == 10 and outcomes[3] == 30
    assert isinstance(outcomes[2], ValueError) and str(outcomes[2]) == "item 2"
    assert recorder.calls[:2] == [("one", [0]), ("many", [1, 2, 3])]
    assert sorted(recorder.calls[2:]) == [("one", [1]), ("one", [2]), ("one", [3])]


def test_the_leaders_own_error_is_its_own() -> None:
    recorder = Recorder(fail_one=0)
    outcomes = run_grouped(recorder)
    assert isinstance(outcomes[0], ValueError)
    assert {item: outcomes[item] for item in (1, 2, 3)} == {1: 10, 2: 20, 3: 30}


def test_asyncio_writes_that_arrive_while_one_is_in_flight_go_together() -> None:
    calls: list[tuple[str, list[int]]] = []

    async def scenario() -> list[int]:
        release = asyncio.Event()
        in_flight = asyncio.Event()

        async def one(item: int) -> int:
            calls.append(("one", [item]))
            in_flight.set()
            await release.wait()
            return item * 10

        async def many(items: Sequence[int]) -> list[int]:
            calls.append(("many", list(items)))
            return [item * 10 for item in items]

        group = AsyncGroup(one, many)
        first = asyncio.ensure_future(group.write(0))
        await in_flight.wait()
        rest = [asyncio.ensure_future(group.write(item)) for item in (1, 2, 3)]
        while group.waiting < 3:
            await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(first, *rest)

    assert asyncio.run(scenario()) == [0, 10, 20, 30]
    assert calls == [("one", [0]), ("many", [1, 2, 3])]


def test_a_group_whose_leader_is_cancelled_is_written_alone_by_the_others() -> None:
    async def scenario() -> tuple[list[object], list[int]]:
        release = asyncio.Event()
        in_flight = asyncio.Event()
        leaders: list[asyncio.Task[object] | None] = []
        alone: list[int] = []

        async def one(item: int) -> int:
            if item == 0:
                in_flight.set()
                await release.wait()
            else:
                alone.append(item)
            return item * 10

        async def many(items: Sequence[int]) -> list[int]:
            leaders.append(asyncio.current_task())
            await asyncio.Event().wait()  # never answers: its leader is cancelled
            return []

        group = AsyncGroup(one, many)
        tasks = [asyncio.ensure_future(group.write(0))]
        await in_flight.wait()
        tasks += [asyncio.ensure_future(group.write(item)) for item in (1, 2)]
        while group.waiting < 2:
            await asyncio.sleep(0)
        release.set()
        while not leaders:
            await asyncio.sleep(0)
        leader = leaders[0]
        assert leader is not None
        leader.cancel()
        return list(await asyncio.gather(*tasks, return_exceptions=True)), alone

    outcomes, alone = asyncio.run(scenario())
    assert outcomes[0] == 0
    cancelled = [o for o in outcomes[1:] if isinstance(o, asyncio.CancelledError)]
    written = [o for o in outcomes[1:] if not isinstance(o, BaseException)]
    assert len(cancelled) == 1 and len(written) == 1
    assert alone == [int(written[0]) // 10]  # the other wrote its own, alone


def test_with_two_statements_in_flight_each_item_is_written_once() -> None:
    """A writer whose item another leader took waits for that leader, even
    when there is room for a statement of its own."""
    calls: list[tuple[str, list[int]]] = []
    gates = {item: threading.Event() for item in (0, 1, 2)}
    started = {item: threading.Event() for item in (0, 1, 2)}

    def one(item: int) -> int:
        calls.append(("one", [item]))
        if item in gates:
            started[item].set()
            assert gates[item].wait(DEADLINE)
        return item * 10

    def many(items: Sequence[int]) -> list[int]:
        calls.append(("many", list(items)))
        started[2].set()
        assert gates[2].wait(DEADLINE)
        return [item * 10 for item in items]

    group = Group(one, many, in_flight=2)
    outcomes: dict[int, int] = {}

    def write(item: int) -> None:
        outcomes[item] = group.write(item)

    threads = {item: threading.Thread(target=write, args=(item,)) for item in range(5)}
    for item in (0, 1):  # two leaders, each writing alone
        threads[item].start()
        assert started[item].wait(DEADLINE)
    for item in (2, 3, 4):
        threads[item].start()
    wait_until(lambda: group.waiting == 3, "three writers waiting")
    gates[0].set()  # room again: one of 2, 3, 4 leads the three of them
    assert started[2].wait(DEADLINE)
    waits = group.waits
    gates[1].set()  # room again, while the other two wait for their leader:
    threads[1].join(DEADLINE)
    wait_until(lambda: group.waits >= waits + 2, "the two taken writers to wait again")
    gates[2].set()
    for thread in threads.values():
        thread.join(DEADLINE)
    assert outcomes == {0: 0, 1: 10, 2: 20, 3: 30, 4: 40}
    assert sorted(calls) == [("many", [2, 3, 4]), ("one", [0]), ("one", [1])]
