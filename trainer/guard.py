"""The guard protocol: what the trainer asks before it trusts a state.

A step's forward pass measures the loss of the weights the previous step produced, so the verdict
on step N's loss judges state N-1. The trainer offers a state (``propose``) at snapshot and
checkpoint points, and a checkpoint staged for that state is committed only when the next
verdict approves it. At the end of a job (or on a stop) one no-grad pass on a fixed batch judges
the final weights (``judge(..., final=True)``).

The guard decides; the trainer acts on the ``Decision``: approve (commit what was staged), hold
(not approved, keep training), roll back (the guard restores weights, optimizer, scheduler and
RNG; the trainer takes the snapshot's loss EWMA), or fail (raise ``decision.error``).

``FiniteGuard`` is the guard when the governor is disabled: it approves finite losses and fails
the job on NaN/Inf. The governor's guard is ``trainer.governor.GovernorGuard``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from trainer.state import TrainState


class Action(str, Enum):
    APPROVE = "approve"
    """The judged state is healthy: what was staged for it may be committed."""
    HOLD = "hold"
    """Not approved, not yet a panic: keep training, commit nothing."""
    ROLLBACK = "rollback"
    """Restore the last approved state (``Guard.rollback``)."""
    FAIL = "fail"
    """The job fails permanently with ``Decision.error``."""


@dataclass(frozen=True)
class Decision:
    action: Action
    loss: float
    kind: str | None = None
    """What the verdict saw (nan, spike, lobotomy, divergence), None when healthy."""
    error: Exception | None = None
    """For FAIL: the exception the trainer raises (its message says what to change)."""

    @property
    def approved(self) -> bool:
        return self.action is Action.APPROVE


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm is NaN/Inf and no guard can roll back."""


class Guard(Protocol):
    def start(self, trainer) -> None:
        """The job's starting state is approved (the campaign's latest approved checkpoint, or
        fresh weights); keep what a rollback needs."""

    def propose(self, state: TrainState) -> None:
        """The live state (just produced by an optimizer step) is a candidate for approval."""

    def before_optimizer_step(self) -> None:
        """Called right before the weights change (e.g. a snapshot copy still reading them)."""

    def judge(self, loss: float, grad_norm: float = 0.0, *, final: bool = False,
              step: int = 0) -> Decision:
        """Judge the state ``loss`` was measured on. ``final``: nothing follows it, so anything
        but approval means roll back (or fail when no state of this job was approved)."""

    def rollback(self, decision: Decision, state: TrainState) -> TrainState:
        """Restore the last approved state into the live objects; return its TrainState."""

    def counts(self) -> dict:
        """What the job record keeps about this guard."""


class FiniteGuard:
    """The guard when the governor is disabled: finite means approved, NaN/Inf fails the job."""

    def start(self, trainer) -> None:
        pass

    def propose(self, state: TrainState) -> None:
        pass

    def before_optimizer_step(self) -> None:
        pass

    def judge(self, loss: float, grad_norm: float = 0.0, *, final: bool = False,
              step: int = 0) -> Decision:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return Decision(Action.APPROVE, loss)
        where = "the final weights" if final else f"step {step}"
        return Decision(Action.FAIL, loss, "nan", NonFiniteLoss(
            f"{where}: loss {loss}, grad_norm {grad_norm} (governor disabled, so no rollback); "
            "no checkpoint written from this state"))

    def rollback(self, decision: Decision, state: TrainState) -> TrainState:
        raise AssertionError("FiniteGuard never decides to roll back")

    def counts(self) -> dict:
        return {"enabled": False}
