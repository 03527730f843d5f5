"""The stop policy: drain, cancel, exit; every transition, idempotency and exit codes."""

from __future__ import annotations

import signal
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ExitCode
from agent.lifecycle import Lifecycle, Phase, Transition

ORDER = list(Phase)


def _draining() -> Lifecycle:
    life = Lifecycle()
    life.on_signal(signal.SIGTERM)
    return life


def _cancelling() -> Lifecycle:
    life = _draining()
    life.on_signal(signal.SIGTERM)
    return life


# ---------------------------------------------------------------- signals


def test_starts_running_with_a_clean_exit_code() -> None:
    """A new lifecycle is RUNNING and would exit 0."""
    life = Lifecycle()
    assert life.phase is Phase.RUNNING
    assert life.exit_code is ExitCode.OK


def test_first_signal_drains() -> None:
    """The first SIGTERM moves RUNNING to DRAINING and names the signal."""
    life = Lifecycle()
    step = life.on_signal(signal.SIGTERM)
    assert (step.before, step.after) == (Phase.RUNNING, Phase.DRAINING)
    assert step.changed
    assert "SIGTERM" in step.reason
    assert life.phase is Phase.DRAINING


def test_second_signal_cancels() -> None:
    """A second signal (SIGINT counts the same as SIGTERM) moves DRAINING to CANCELLING."""
    life = _draining()
    step = life.on_signal(signal.SIGINT)
    assert (step.before, step.after) == (Phase.DRAINING, Phase.CANCELLING)
    assert "SIGINT" in step.reason
    assert life.exit_code is ExitCode.OK


def test_third_signal_exits_at_once_with_failure() -> None:
    """A third signal stops at once and makes the exit code FAILURE (work may be unreported)."""
    life = _cancelling()
    step = life.on_signal(signal.SIGTERM)
    assert (step.before, step.after) == (Phase.CANCELLING, Phase.STOPPED)
    assert "without reporting" in step.reason
    assert life.phase is Phase.STOPPED
    assert life.exit_code is ExitCode.FAILURE
    assert int(life.exit_code) == 1


def test_signals_after_stop_change_nothing() -> None:
    """Signals after STOPPED return an unchanged transition and keep the exit code."""
    life = _cancelling()
    life.on_idle()
    for _ in range(3):
        step = life.on_signal(signal.SIGTERM)
        assert step == Transition(Phase.STOPPED, Phase.STOPPED, step.reason)
        assert not step.changed
    assert life.exit_code is ExitCode.OK


def test_an_unknown_signal_number_is_still_named() -> None:
    """A signal number without a name still escalates and appears in the reason."""
    life = Lifecycle()
    step = life.on_signal(12345)
    assert step.after is Phase.DRAINING
    assert "12345" in step.reason


# ---------------------------------------------------------------- drain requests and deadlines


def test_gateway_drain_moves_running_to_draining() -> None:
    """A gateway drain request drains a running agent and carries its reason."""
    life = Lifecycle()
    step = life.on_drain_requested("maintenance")
    assert step is not None
    assert (step.before, step.after) == (Phase.RUNNING, Phase.DRAINING)
    assert "maintenance" in step.reason


def test_gateway_drain_is_ignored_outside_running() -> None:
    """A drain request while draining, cancelling or stopped returns None and changes nothing."""
    for life in (_draining(), _cancelling()):
        before = life.phase
        assert life.on_drain_requested("again") is None
        assert life.phase is before
    stopped = _draining()
    stopped.on_idle()
    assert stopped.on_drain_requested("late") is None
    assert stopped.phase is Phase.STOPPED


def test_a_signal_after_a_gateway_drain_cancels() -> None:
    """The gateway's drain counts as the first step: the next signal cancels."""
    life = Lifecycle()
    life.on_drain_requested("maintenance")
    assert life.on_signal(signal.SIGTERM).after is Phase.CANCELLING


def test_drain_deadline_cancels_a_draining_agent() -> None:
    """The drain grace expiring moves DRAINING to CANCELLING."""
    life = _draining()
    step = life.on_drain_deadline()
    assert step is not None
    assert (step.before, step.after) == (Phase.DRAINING, Phase.CANCELLING)


def test_drain_deadline_is_ignored_outside_draining() -> None:
    """The drain deadline does nothing while running, cancelling or stopped."""
    stopped = _cancelling()
    stopped.on_idle()
    for life in (Lifecycle(), _cancelling(), stopped):
        before = life.phase
        assert life.on_drain_deadline() is None
        assert life.phase is before


# ---------------------------------------------------------------- idle


def test_idle_while_draining_stops_cleanly() -> None:
    """Nothing left to run while draining: STOPPED with exit code 0."""
    life = _draining()
    step = life.on_idle()
    assert step is not None
    assert (step.before, step.after) == (Phase.DRAINING, Phase.STOPPED)
    assert life.exit_code is ExitCode.OK


def test_idle_while_cancelling_stops_cleanly() -> None:
    """Cancelled work reported: STOPPED with exit code 0."""
    life = _cancelling()
    step = life.on_idle()
    assert step is not None
    assert (step.before, step.after) == (Phase.CANCELLING, Phase.STOPPED)
    assert life.exit_code is ExitCode.OK


def test_idle_while_running_or_stopped_changes_nothing() -> None:
    """An idle agent that was not asked to stop keeps running; a stopped one stays stopped."""
    running = Lifecycle()
    assert running.on_idle() is None
    assert running.phase is Phase.RUNNING
    stopped = _draining()
    stopped.on_idle()
    assert stopped.on_idle() is None
    assert stopped.phase is Phase.STOPPED


# ---------------------------------------------------------------- properties

EVENTS: dict[str, Callable[[Lifecycle], Transition | None]] = {
    "sigterm": lambda life: life.on_signal(signal.SIGTERM),
    "sigint": lambda life: life.on_signal(signal.SIGINT),
    "drain": lambda life: life.on_drain_requested("gateway"),
    "deadline": lambda life: life.on_drain_deadline(),
    "idle": lambda life: life.on_idle(),
}


@given(st.lists(st.sampled_from(sorted(EVENTS)), max_size=30))
def test_phase_never_goes_backwards_and_stopped_absorbs(events: list[str]) -> None:
    """Any event sequence only moves the phase forward, reported truthfully; STOPPED absorbs."""
    life = Lifecycle()
    for name in events:
        before = life.phase
        step = EVENTS[name](life)
        after = life.phase
        assert ORDER.index(after) >= ORDER.index(before)
        if before is Phase.STOPPED:
            assert after is Phase.STOPPED
        if step is None:
            assert after is before
        else:
            assert (step.before, step.after) == (before, after)


@given(st.lists(st.sampled_from(sorted(EVENTS)), max_size=30))
def test_exit_code_is_failure_only_after_three_signals_without_idle(events: list[str]) -> None:
    """The exit code is FAILURE exactly when a signal arrived while CANCELLING."""
    life = Lifecycle()
    forced = False
    for name in events:
        before = life.phase
        EVENTS[name](life)
        forced = forced or (before is Phase.CANCELLING and name in {"sigterm", "sigint"})
    assert life.exit_code is (ExitCode.FAILURE if forced else ExitCode.OK)


@given(st.integers(min_value=0, max_value=3))
def test_n_signals_reach_the_nth_phase(count: int) -> None:
    """Counting signals from RUNNING: 0..3 reach RUNNING, DRAINING, CANCELLING, STOPPED."""
    life = Lifecycle()
    for _ in range(count):
        life.on_signal(signal.SIGTERM)
    assert life.phase is ORDER[count]
