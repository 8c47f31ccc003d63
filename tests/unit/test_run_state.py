"""``RunState`` and ``ClaimedRun`` without a database: step names and replay,
turning statement results into values or signals, the cancellation policy
checked at claim time, and the statement parameters they build.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from absurd_sqla import CancelledTask, InvalidArgument, LeaseLost, NotSerializable, TimeoutError
from absurd_sqla._run import UNKNOWN_TASK_DELAY, ClaimedRun, RunState
from absurd_sqla.errors import SuspendTask
from tests.support import CLAIMED_AT, claimed_run


def state_of(**fields: Any) -> RunState:
    return RunState(claimed_run(**fields), "w", 120)


def row(**columns: Any) -> SimpleNamespace:
    """A result row of a fenced statement; owned unless told otherwise."""
    return SimpleNamespace(**{"owned": 1, "run_state": "running", **columns})


# -- claim rows ------------------------------------------------------------------------


def test_from_row_reads_the_claim_columns() -> None:
    run = claimed_run()
    columns = {f: getattr(run, f) for f in ClaimedRun.__dataclass_fields__}
    del columns["claimed_at"]
    stored = {"s": 1}
    claim_row = SimpleNamespace(
        **{**columns, "headers": None, "checkpoints": stored, "now": CLAIMED_AT}
    )
    parsed = ClaimedRun.from_row(claim_row)
    assert parsed.claimed_at == CLAIMED_AT  # the database's now at claim time
    assert parsed.headers == {}  # NULL headers read as empty
    assert parsed.checkpoints == {"s": 1} and parsed.checkpoints is not stored
    no_checkpoints = ClaimedRun.from_row(
        SimpleNamespace(**{**vars(claim_row), "checkpoints": None})
    )
    assert no_checkpoints.checkpoints == {}


# -- step names and replay ---------------------------------------------------------------


def test_repeated_names_are_numbered_in_call_order() -> None:
    state = state_of()
    names = [state.checkpoint_name(n) for n in ("poll", "poll", "other", "poll")]
    assert names == ["poll", "poll#2", "other", "poll#3"]


def test_numbering_skips_a_name_the_user_already_took() -> None:
    state = state_of()
    assert state.checkpoint_name("poll#2") == "poll#2"  # a step the user named so
    assert [state.checkpoint_name("poll") for _ in range(2)] == ["poll", "poll#3"]


def test_a_user_name_after_a_generated_one_does_not_collide() -> None:
    state = state_of()
    assert [state.checkpoint_name("poll") for _ in range(2)] == ["poll", "poll#2"]
    assert state.checkpoint_name("poll#2") == "poll#2#2"


def test_names_are_unique_and_the_same_on_every_replay() -> None:
    calls = ["a", "a#2", "a", "b", "a", "a#2"]
    first, replay = state_of(), state_of()
    names = [first.checkpoint_name(n) for n in calls]
    assert names == ["a", "a#2", "a#3", "b", "a#4", "a#2#2"]
    assert [replay.checkpoint_name(n) for n in calls] == names


def test_begin_replays_stored_checkpoints_including_null_values() -> None:
    state = state_of(checkpoints={"fetch": {"rows": 3}, "fetch#2": None})
    first, second, third = (state.begin("fetch") for _ in range(3))
    assert (first.done, first.state, first.checkpoint_name) == (True, {"rows": 3}, "fetch")
    assert (second.done, second.state) == (True, None)  # a stored null is still done
    assert (third.done, third.checkpoint_name) == (False, "fetch#3")


@pytest.mark.parametrize("bad", ["", "x" * 256, "a\x00b"])
def test_begin_rejects_names_that_cannot_be_stored(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="step name"):
        state_of().begin(bad)


# -- results into values or signals -------------------------------------------------------


def test_check_owned_tells_cancelled_from_lease_lost() -> None:
    state = state_of()
    state.check_owned(row())  # owned: no signal
    with pytest.raises(CancelledTask, match=str(state.run.task_id)):
        state.check_owned(row(owned=0, run_state="cancelled"))
    for other in ("running", "failed", "pending", "completed", None):
        with pytest.raises(LeaseLost, match=str(state.run.run_id)):
            state.check_owned(row(owned=0, run_state=other))


def test_after_checkpoint_keeps_the_value_only_when_owned() -> None:
    state = state_of()
    kept, refused = state.begin("kept"), state.begin("refused")
    assert state.after_checkpoint(kept, [1], row()) == [1]
    with pytest.raises(LeaseLost):
        state.after_checkpoint(refused, [2], row(owned=0, run_state="failed"))
    assert state.checkpoints == {"kept": [1]}


def test_after_sleep_suspends_only_when_the_run_was_suspended() -> None:
    wake = CLAIMED_AT + timedelta(minutes=5)
    state = state_of()
    nap, past = state.begin("nap"), state.begin("past")
    with pytest.raises(SuspendTask):
        state.after_sleep(nap, row(wake_at=wake, suspended=1))
    assert state.after_sleep(past, row(wake_at=CLAIMED_AT, suspended=0)) is None
    assert state.checkpoints == {"nap": wake.isoformat(), "past": CLAIMED_AT.isoformat()}
    with pytest.raises(CancelledTask):
        state.after_sleep(state.begin("x"), row(owned=0, run_state="cancelled", suspended=0))
    assert "x" not in state.checkpoints


def test_after_await_returns_the_payload_raises_timeout_or_suspends() -> None:
    state = state_of()
    got, none, late, waiting = (state.begin(n) for n in ("got", "none", "late", "waiting"))
    assert state.after_await(got, "e", row(emitted=True, timed_out=False, payload={"v": 1})) == {
        "v": 1
    }
    assert state.after_await(none, "e", row(emitted=True, timed_out=False, payload=None)) is None
    with pytest.raises(TimeoutError, match="'e'"):
        state.after_await(late, "e", row(emitted=False, timed_out=True, payload=None))
    with pytest.raises(SuspendTask):
        state.after_await(waiting, "e", row(emitted=False, timed_out=False, payload=None))
    assert state.checkpoints == {
        "got": {"payload": {"v": 1}},
        "none": {"payload": None},
        "late": {"timeout": True},
    }
    with pytest.raises(LeaseLost):
        state.after_await(state.begin("x"), "e", row(owned=0, run_state="failed", emitted=True))


def test_replayed_await_returns_the_payload_or_raises_the_timeout_again() -> None:
    state = state_of(checkpoints={"got": {"payload": [1]}, "late": {"timeout": True}})
    assert state.replay_await(state.begin("got"), "e") == [1]
    with pytest.raises(TimeoutError):
        state.replay_await(state.begin("late"), "e")


def test_a_signal_is_not_an_exception_a_handler_would_catch() -> None:
    for signal in (SuspendTask, CancelledTask, LeaseLost):
        assert not issubclass(signal, Exception)


# -- cancellation policy at claim time ---------------------------------------------------------


def test_max_delay_applies_to_a_first_start_only() -> None:
    policy = {"max_delay": 30}
    on_time = claimed_run(cancellation=policy, enqueued_at=CLAIMED_AT - timedelta(seconds=30))
    assert on_time.policy_violation() is None  # exactly at the limit: not late
    late = claimed_run(cancellation=policy, enqueued_at=CLAIMED_AT - timedelta(seconds=30.5))
    message = late.policy_violation()
    assert message is not None and "max_delay=30" in message
    started_before = claimed_run(
        cancellation=policy,
        enqueued_at=CLAIMED_AT - timedelta(hours=1),
        prev_first_started_at=CLAIMED_AT - timedelta(minutes=59),
    )
    assert started_before.policy_violation() is None  # a retry or a wake-up, not a start


def test_max_duration_counts_from_the_first_start() -> None:
    policy = {"max_duration": 60}
    first_claim = claimed_run(cancellation=policy, enqueued_at=CLAIMED_AT - timedelta(hours=1))
    assert first_claim.policy_violation() is None  # never started: nothing ran yet
    within = claimed_run(
        cancellation=policy, prev_first_started_at=CLAIMED_AT - timedelta(seconds=60)
    )
    assert within.policy_violation() is None
    over = claimed_run(
        cancellation=policy, prev_first_started_at=CLAIMED_AT - timedelta(seconds=61)
    )
    message = over.policy_violation()
    assert message is not None and "max_duration=60" in message


def test_no_policy_never_cancels() -> None:
    long_ago = CLAIMED_AT - timedelta(days=365)
    for policy in (None, {}):
        run = claimed_run(cancellation=policy, enqueued_at=long_ago, prev_first_started_at=long_ago)
        assert run.policy_violation() is None


# -- statement parameters ------------------------------------------------------------------------


def test_checkpoint_params_name_the_numbered_step_and_carry_json_text() -> None:
    state = state_of()
    state.begin("s")
    params = state.checkpoint_params(state.begin("s"), {"n": [1, 2]})
    assert params["run"] == state.run.run_id and params["claim_timeout"] == 120
    assert params["step"] == "s#2"
    assert json.loads(params["value_json"]) == {"n": [1, 2]}
    with pytest.raises(NotSerializable, match="'s'"):
        state.checkpoint_params(state.begin("s"), {1, 2})


def test_heartbeat_params_default_to_the_claim_timeout() -> None:
    state = state_of()
    assert state.heartbeat_params(None) == {"run": state.run.run_id, "claim_timeout": 120}
    assert state.heartbeat_params(600)["claim_timeout"] == 600.0
    with pytest.raises(InvalidArgument):
        state.heartbeat_params(-1)


def test_sleep_params_use_the_checkpointed_wake_time_on_replay() -> None:
    wake = CLAIMED_AT + timedelta(days=1)
    state = state_of(checkpoints={"nap": wake.isoformat()})
    replayed = state.sleep_params(state.begin("nap"), wake_at=None, seconds=3600)
    assert (replayed["wake_at"], replayed["seconds"], replayed["step"]) == (wake, None, "nap")
    fresh = state.sleep_params(state.begin("nap"), wake_at=None, seconds=3600)
    assert (fresh["wake_at"], fresh["seconds"], fresh["step"]) == (None, 3600, "nap#2")


def test_await_params_check_the_event_name_and_timeout() -> None:
    state = state_of()
    params = state.await_params(state.begin("$await:e"), "e", "other", 1.5)
    assert (params["event"], params["event_queue"], params["timeout_seconds"]) == (
        "e",
        "other",
        1.5,
    )
    assert params["step"] == "$await:e"
    with pytest.raises(InvalidArgument):
        state.await_params(state.begin("w"), "", "default", None)
    with pytest.raises(InvalidArgument):
        state.await_params(state.begin("w"), "e", "default", -1)


def test_complete_params_carry_the_result_as_json_text() -> None:
    state = state_of()
    assert json.loads(state.complete_params({"ok": True})["result_json"]) == {"ok": True}
    with pytest.raises(NotSerializable):
        state.complete_params(object())


def test_fail_params_decide_the_retry_and_its_delay() -> None:
    strategy = {"kind": "fixed", "base_seconds": 7}
    reason = {"name": "E", "message": "m", "traceback": None}
    retrying = state_of(max_attempts=3, attempt=2, retry_strategy=strategy)
    params = retrying.fail_params(reason)
    assert (params["retry"], params["delay"], params["require_lease"]) == (True, 7.0, True)
    assert json.loads(params["reason_json"]) == reason
    assert params["channel"] == "absurd.default"
    assert isinstance(params["new_run"], uuid.UUID) and params["new_run"].version == 7
    assert retrying.fail_params(reason)["new_run"] != params["new_run"]
    last = state_of(max_attempts=3, attempt=3, retry_strategy=strategy)
    assert (last.fail_params(reason)["retry"], last.fail_params(reason)["delay"]) == (False, 0.0)
    assert last.fail_params(reason, require_lease=False)["require_lease"] is False
    assert state_of(max_attempts=None, attempt=50).fail_params(reason)["retry"] is True


def test_defer_params_hand_the_run_back_with_its_previous_start_times() -> None:
    earlier = CLAIMED_AT - timedelta(minutes=3)
    run = claimed_run(prev_started_at=earlier, prev_first_started_at=earlier)
    assert run.defer_params() == {
        "run": run.run_id,
        "delay": UNKNOWN_TASK_DELAY,
        "prev_started_at": earlier,
        "prev_first_started_at": earlier,
    }
