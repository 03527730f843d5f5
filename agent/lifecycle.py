"""The agent's stop policy: stop ≠ cancel, with signal escalation (pure; no asyncio, no I/O).

::

             1st signal,             2nd signal,
             gateway drain           drain grace expired           3rd signal
    RUNNING ───────────────▶ DRAINING ────────────────────▶ CANCELLING ──────────▶ STOPPED
                                │ idle                          │ idle               ▲
                                └───────────────────────────────┴────────────────────┘

RUNNING
    Accepting and running tasks.
DRAINING
    First SIGTERM/SIGINT, or a ``drain`` from the gateway: the agent says so (a status
    message, systemd ``STOPPING=1``), accepts nothing new, and lets running tasks finish
    within the drain grace.
CANCELLING
    Second signal, or the drain grace expired: whatever still runs is cancelled (interrupt,
    grace, SIGKILL of the process group) and its outcome is reported.
STOPPED
    Absorbing. Reached cleanly through `Lifecycle.on_idle` (nothing left to run or report),
    or at once by a third signal.

The phase only moves forward (RUNNING < DRAINING < CANCELLING < STOPPED) and every event is
idempotent: an event that does not apply to the current phase changes nothing.

Exit code. A stop reached through `Lifecycle.on_idle` — drained, or cancelled and reported —
exits ``ExitCode.OK`` (0). A third signal means "exit now, do not report": outcomes of
cancelled tasks may not have reached the gateway, so the exit code is ``ExitCode.FAILURE``
(1), telling a supervisor the stop was not clean. Nothing is lost for good: the task journal
holds the unreported outcomes, and the next start reports them.

This module owns no signal handlers, tasks or clocks; the application installs the handlers,
feeds events here and acts on the returned `Transition`.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

from agent.errors import ExitCode

__all__ = ["Lifecycle", "Phase", "Transition"]


class Phase(enum.Enum):
    """Where the agent is in its life; declared in the only order it moves through."""

    RUNNING = "running"
    DRAINING = "draining"
    CANCELLING = "cancelling"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Transition:
    """The outcome of one event: the phase before and after, and why."""

    before: Phase
    after: Phase
    reason: str

    @property
    def changed(self) -> bool:
        """Whether the event moved the phase."""
        return self.before is not self.after


_AFTER_SIGNAL: dict[Phase, Phase] = {
    Phase.RUNNING: Phase.DRAINING,
    Phase.DRAINING: Phase.CANCELLING,
    Phase.CANCELLING: Phase.STOPPED,
    Phase.STOPPED: Phase.STOPPED,
}


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Lifecycle:
    """The stop state machine of one agent process; starts in `Phase.RUNNING`.

    Not thread-safe: feed it from the event loop (``loop.add_signal_handler`` callbacks run
    there). It raises nothing.
    """

    def __init__(self) -> None:
        self._phase = Phase.RUNNING
        self._forced = False

    @property
    def phase(self) -> Phase:
        """The current phase."""
        return self._phase

    @property
    def exit_code(self) -> ExitCode:
        """The process exit code for the stop: FAILURE after a forced (3rd-signal) exit, else OK.

        Meaningful once the phase is `Phase.STOPPED`.
        """
        return ExitCode.FAILURE if self._forced else ExitCode.OK

    def on_signal(self, signum: int) -> Transition:
        """A SIGTERM/SIGINT arrived: drain, then cancel, then exit at once; STOPPED stays."""
        name = _signal_name(signum)
        before = self._phase
        after = _AFTER_SIGNAL[before]
        if before is Phase.CANCELLING:
            self._forced = True
            reason = f"{name} while cancelling: exit now, without reporting"
        elif before is Phase.STOPPED:
            reason = f"{name} after stop: ignored"
        else:
            reason = f"{name}: {after.value}"
        return self._move(before, after, reason)

    def on_drain_requested(self, reason: str) -> Transition | None:
        """The gateway asked for a drain: RUNNING → DRAINING; None in any other phase."""
        if self._phase is not Phase.RUNNING:
            return None
        return self._move(Phase.RUNNING, Phase.DRAINING, f"drain requested: {reason}")

    def on_drain_deadline(self) -> Transition | None:
        """The drain grace expired: DRAINING → CANCELLING; None in any other phase."""
        if self._phase is not Phase.DRAINING:
            return None
        return self._move(Phase.DRAINING, Phase.CANCELLING, "drain grace expired: cancelling")

    def on_idle(self) -> Transition | None:
        """Nothing is left to run or report: DRAINING/CANCELLING → STOPPED; None otherwise."""
        before = self._phase
        if before not in (Phase.DRAINING, Phase.CANCELLING):
            return None
        return self._move(before, Phase.STOPPED, f"idle while {before.value}: stopped")

    def _move(self, before: Phase, after: Phase, reason: str) -> Transition:
        self._phase = after
        return Transition(before=before, after=after, reason=reason)
