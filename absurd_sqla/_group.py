# GENERATED from absurd_sqla/_group_async.py by ci/generate_sync.py: do not edit.
# Change _group_async.py and run `python ci/generate_sync.py`.
"""Group commit: writes of one kind from concurrent handlers share a statement.

A worker running several handlers at once sends many small fenced writes of
the same shape (a step's checkpoint, mostly). Each is one statement and one
commit; under load the commits queue up behind one another. ``Group`` lets
the writes that arrive while one is in flight go together in the next
statement: the first writer to find nothing in flight becomes the leader and
writes everything waiting, its own included; the others wait for their own
row's outcome. Alone, a writer writes at once (no window, no added latency),
with the single-row statement.

Every row of a group statement is fenced on its own, so grouping changes no
outcome. If a group statement fails (a lost connection, any error), each of
its writers makes its own write again alone, with the single-row path and its
retry rules, so an error stays the error of the write that caused it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from threading import Condition
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Entry(Generic[Item, Result]):
    __slots__ = ("alone", "done", "item", "result", "taken")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.taken = False  # in a leader's batch
        self.done = False
        self.alone = False  # its group failed: write it on its own
        self.result: Result | None = None


class Group(Generic[Item, Result]):
    """Writes ``Item`` with ``one`` alone, or with ``many`` together with
    every other item waiting when it is its turn (results in item order)."""

    def __init__(
        self,
        one: Callable[[Item], Result],
        many: Callable[[Sequence[Item]], Sequence[Result]],
        in_flight: int = 1,
    ) -> None:
        self._one = one
        self._many = many
        self._ready = Condition()
        self._waiting: list[_Entry[Item, Result]] = []
        self._in_flight = in_flight  # statements at once; more writers wait and go together
        self._busy = 0
        # For tests and benchmarks: statements that wrote more than one item, and
        # how many times a writer went (back) to waiting.
        self.groups = 0
        self.waits = 0

    @property
    def waiting(self) -> int:
        """Writers waiting for the write in flight to finish."""
        return len(self._waiting)

    def write(self, item: Item) -> Result:
        entry: _Entry[Item, Result] = _Entry(item)
        with self._ready:
            self._waiting.append(entry)
            # Wait while our write is in someone's statement, or no room for one.
            while not entry.done and (entry.taken or self._busy >= self._in_flight):
                self.waits += 1
                self._ready.wait()
            lead = not entry.done
            if lead:  # room for a statement: lead, taking everyone waiting
                self._busy += 1
                batch, self._waiting = self._waiting, []
                for waiting in batch:
                    waiting.taken = True
        if lead:
            self._lead(entry, batch)
        if entry.alone:
            return self._one(item)
        return entry.result  # type: ignore[return-value]

    def _lead(self, own: _Entry[Item, Result], batch: list[_Entry[Item, Result]]) -> None:
        try:
            if len(batch) == 1:
                own.result = self._one(own.item)
            else:
                self.groups += 1
                try:
                    results = self._many([entry.item for entry in batch])
                except Exception:
                    results = None
                for index, entry in enumerate(batch):
                    if results is None:
                        entry.alone = True
                    else:
                        entry.result = results[index]
        finally:
            with self._ready:
                for entry in batch:
                    if entry is not own and entry.result is None:
                        entry.alone = True  # the leader stopped before their outcome
                    entry.done = True
                self._busy -= 1
                self._ready.notify_all()
