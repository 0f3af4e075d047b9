"""The governor: judges every state by a loss measured on it and rolls back to the last state
it approved.

Starts from esper-lite's Tolaria governor (seeds 003, 004):
- ``check`` reads the vital signs of one loss: NaN/Inf in loss or gradient norm panics at once;
  lobotomy (the loss collapses to the random-guess loss ln(vocab), within
  ``lobotomy_tolerance * ln(vocab)``, while the healthy average was below
  ``lobotomy_healthy_ratio * ln(vocab)``) panics at once; divergence (loss > mean + k*std of the
  healthy window AND > multiplier * mean AND > an absolute floor) panics after ``min_panics``
  consecutive anomalous steps. Beyond esper: a spike (loss above ``max_loss_ratio * ln(vocab)``,
  or above ``spike_factor`` times the healthy EWMA and the floor) panics at once, history or
  not; once the healthy mean was well below ln(vocab), a loss above it is anomalous. Anomalous
  values never enter the history.
- ``propose`` copies a state into the spare of two slots; ``approve`` makes it the last known
  good only when a loss measured on that state was healthy, ``discard`` drops it. A failed copy
  never destroys the previous snapshot. On CUDA the copies go to reused pinned CPU buffers,
  non-blocking on a side stream; the training stream waits on one event before its next
  optimizer step, and a rollback synchronises on it before reading.
- ``rollback`` restores copies of the snapshot (never aliases), backs the learning rate off,
  and emits exactly one typed ``governor.rollback`` event; a failing event sink is logged and
  ignored.
- ``GovernorGuard`` is the engine's guard (``trainer.guard``): it returns decisions, the trainer
  acts on them.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import structlog
import torch

from trainer.guard import Action, Decision
from trainer.state import TrainState

log = structlog.get_logger("realm.governor")

EWMA_ALPHA = 0.1
"""Smoothing of the healthy-loss EWMA the spike rule compares against."""


@dataclass(frozen=True)
class Verdict:
    """What one step's vital signs say."""

    panic: bool
    anomalous: bool
    kind: str | None
    """nan | lobotomy | divergence (None when healthy)."""
    loss: float
    threshold: float | None
    consecutive: int


@dataclass(frozen=True)
class RollbackEvent:
    """The one typed event a rollback emits (``governor.rollback``)."""

    reason: str
    step: int
    loss: float
    threshold: float | None
    consecutive: int
    snapshot_step: int
    batches_skipped: int
    new_lr: float | None
    rollback_number: int
    name: str = "governor.rollback"


@dataclass
class Snapshot:
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    state: TrainState | None = None
    """The trainer's counters at this state (a rollback restores its loss EWMA; the data
    position and step counter move on)."""
    initial: bool = False
    """The job's starting state (approved before the job began)."""
    extra: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0
    ready: Any = None
    """CUDA event recorded after the copies (None on CPU)."""


def _clone_tree(value: Any) -> Any:
    """Fresh copies of every tensor in a nested state dict (what a restore hands out)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tree(v) for v in value)
    return copy.deepcopy(value)


def _copy_tree(value: Any, out: list[int], pin: bool, into: Any = None) -> Any:
    """Detached CPU copies of every tensor in a nested state dict.

    ``into`` is the same tree from an older snapshot: its (pinned) buffers are reused when shape
    and dtype match, so a snapshot on CUDA does not pay for a pinned allocation every time.
    """
    if isinstance(value, torch.Tensor):
        t = value.detach()
        reuse = isinstance(into, torch.Tensor) and into.shape == t.shape and \
            into.dtype == t.dtype
        copy = into if reuse else torch.empty(t.shape, dtype=t.dtype, device="cpu",
                                              pin_memory=pin and t.is_cuda)
        copy.copy_(t, non_blocking=pin and t.is_cuda)
        out.append(copy.numel() * copy.element_size())
        return copy
    if isinstance(value, dict):
        into = into if isinstance(into, dict) else {}
        return {k: _copy_tree(v, out, pin, into.get(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        into = into if isinstance(into, (list, tuple)) and len(into) == len(value) else \
            [None] * len(value)
        return type(value)(_copy_tree(v, out, pin, i) for v, i in zip(value, into))
    return value


class Governor:
    def __init__(self, cfg, vocab_size: int, *, sink: Callable[[RollbackEvent], None] | None = None):
        self.cfg = cfg
        self.random_guess_loss = math.log(vocab_size)
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.ewma: float | None = None
        """EWMA of healthy losses only (the spike rule's reference)."""
        self.consecutive = 0
        self.sink = sink
        self._slots: list[Snapshot | None] = [None, None]
        self._current: int | None = None
        self._candidate = False
        """The spare slot holds a proposed state that no verdict has approved yet."""
        self.rollbacks = 0
        self.panics = {"nan": 0, "spike": 0, "lobotomy": 0, "divergence": 0}
        self.batches_skipped = 0
        self.events: list[RollbackEvent] = []
        self.lr_scale = 1.0
        """Cumulative learning-rate back-off applied so far."""

    # --- vital signs ----------------------------------------------------------------------

    def check(self, loss: float, grad_norm: float = 0.0) -> Verdict:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return self._panic("nan", loss, None)  # at once, and never counted as divergence
        mean = sum(self.history) / len(self.history) if self.history else None
        if len(self.history) >= self.cfg.min_history and self._lobotomy(loss, mean):
            return self._panic("lobotomy", loss, self.random_guess_loss)
        spike = self._spike_threshold()
        if loss > spike:  # one catastrophic step: no need to wait for min_panics
            return self._panic("spike", loss, spike)
        threshold = self._divergence_threshold(mean) \
            if len(self.history) >= self.cfg.min_history else None
        if mean is not None and mean < self.cfg.lobotomy_healthy_ratio * self.random_guess_loss:
            # well below guessing so far: worse than guessing is never healthy again
            threshold = min(threshold, self.random_guess_loss) if threshold is not None \
                else self.random_guess_loss
        if threshold is not None and loss > threshold:
            self.consecutive += 1
            if self.consecutive >= self.cfg.min_panics:
                return self._panic("divergence", loss, threshold)
            return Verdict(False, True, "divergence", loss, threshold, self.consecutive)
        self.consecutive = 0
        self.history.append(loss)
        self.ewma = loss if self.ewma is None else EWMA_ALPHA * loss + (1 - EWMA_ALPHA) * self.ewma
        return Verdict(False, False, None, loss, None, 0)

    def _spike_threshold(self) -> float:
        """Far worse than uniform guessing (history or not), or a multiple of the healthy EWMA
        above the absolute floor."""
        insane = self.cfg.max_loss_ratio * self.random_guess_loss
        if self.ewma is None:
            return insane
        return min(insane, max(self.cfg.spike_factor * self.ewma, self.cfg.divergence_floor))

    def _lobotomy(self, loss: float, mean: float) -> bool:
        rg = self.random_guess_loss
        was_healthy = mean < self.cfg.lobotomy_healthy_ratio * rg
        return was_healthy and abs(loss - rg) <= self.cfg.lobotomy_tolerance * rg

    def _divergence_threshold(self, mean: float) -> float:
        var = sum((x - mean) ** 2 for x in self.history) / len(self.history)
        return max(mean + self.cfg.sigma_k * math.sqrt(var), self.cfg.multiplier * mean,
                   self.cfg.divergence_floor)

    def _panic(self, kind: str, loss: float, threshold: float | None) -> Verdict:
        self.panics[kind] += 1
        consecutive = self.consecutive if kind == "divergence" else 0
        return Verdict(True, True, kind, loss, threshold, consecutive)

    # --- last known good ------------------------------------------------------------------

    @torch.no_grad()
    def propose(self, step: int, model, optimizer=None, scheduler=None, *,
                state: TrainState | None = None, initial: bool = False) -> Snapshot:
        """Copy the live state into the spare slot as a candidate; ``approve`` makes it the
        last known good once a loss measured on it is healthy, ``discard`` drops it.

        On CUDA the copies run on a side stream into reused pinned buffers; ``ready`` (an event)
        marks their completion. The training stream must wait for it before the next optimizer
        step changes the parameters (``wait_for_snapshot``); the forward and backward passes in
        between overlap with the copy. A rollback synchronises on the event before reading.
        """
        sizes: list[int] = []
        pin = torch.cuda.is_available() and any(p.is_cuda for p in model.parameters())
        spare = 0 if self._current != 0 else 1
        old, self._slots[spare] = self._slots[spare], None  # never current; buffers reused
        self._candidate = False
        stream = torch.cuda.Stream() if pin else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            snap = Snapshot(
                step=step,
                model=_copy_tree(model.state_dict(), sizes, pin, old and old.model),
                optimizer=_copy_tree(optimizer.state_dict(), sizes, pin,
                                     old and old.optimizer) if optimizer else None,
                scheduler=copy.deepcopy(scheduler.state_dict()) if scheduler else None,
                rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.cuda.get_rng_state() if pin else None,
                state=state, initial=initial, extra={"_lr_scale": self.lr_scale})
            snap.ready = stream.record_event() if stream is not None else None
        snap.nbytes = sum(sizes)
        self._slots[spare], self._candidate = snap, True
        return snap

    def approve(self) -> Snapshot | None:
        """The pending candidate (if any) becomes the last known good; returns it."""
        if not self._candidate:
            return None
        self._current = 0 if self._current != 0 else 1
        self._candidate = False
        return self.last_good

    def discard(self) -> None:
        """Drop the pending candidate (its buffers stay for reuse)."""
        self._candidate = False

    def snapshot(self, step: int, model, optimizer=None, scheduler=None, *,
                 state: TrainState | None = None, initial: bool = False) -> Snapshot:
        """Propose and approve at once: for a state already known good (the job's start)."""
        self.propose(step, model, optimizer, scheduler, state=state, initial=initial)
        return self.approve()

    def wait_for_snapshot(self) -> None:
        """Order the training stream after the pending snapshot copies (no host sync)."""
        for snap in self._slots:
            if snap is not None and snap.ready is not None:
                torch.cuda.current_stream().wait_event(snap.ready)

    @property
    def last_good(self) -> Snapshot | None:
        return None if self._current is None else self._slots[self._current]

    @property
    def candidate(self) -> Snapshot | None:
        return self._slots[0 if self._current != 0 else 1] if self._candidate else None

    @torch.no_grad()
    def restore(self, model, optimizer=None, scheduler=None) -> Snapshot:
        """Load the last known good into the live objects. Every restored tensor is a copy:
        the optimizer's ``load_state_dict`` keeps tensors whose device and dtype already match,
        and later steps would then edit the snapshot itself."""
        snap = self.last_good
        if snap is None:
            raise RuntimeError("no last-known-good snapshot to roll back to")
        if snap.ready is not None:
            snap.ready.synchronize()  # the host reads the copies now
        model_keys = set(model.state_dict())
        if model_keys != set(snap.model):
            missing, extra = sorted(model_keys - set(snap.model)), sorted(set(snap.model) - model_keys)
            raise RuntimeError(f"snapshot does not match the model: missing {missing[:5]}, "
                               f"unexpected {extra[:5]}")
        model.load_state_dict(snap.model, strict=True)  # copies into the live parameters
        if optimizer is not None and snap.optimizer is not None:
            optimizer.load_state_dict(_clone_tree(snap.optimizer))
        if scheduler is not None and snap.scheduler is not None:
            scheduler.load_state_dict(copy.deepcopy(snap.scheduler))
        torch.set_rng_state(snap.rng_cpu)
        if snap.rng_cuda is not None:
            torch.cuda.set_rng_state(snap.rng_cuda)
        self._candidate = False
        return snap

    def rollback(self, verdict: Verdict, step: int, model, optimizer=None, scheduler=None, *,
                 batches_skipped: int = 0) -> RollbackEvent:
        """Restore last-known-good, back the learning rate off, emit one event."""
        snap = self.restore(model, optimizer, scheduler)
        new_lr = self._back_off(optimizer, scheduler, snap)
        self.rollbacks += 1
        self.batches_skipped += batches_skipped
        event = RollbackEvent(verdict.kind or "unknown", step, verdict.loss, verdict.threshold,
                              verdict.consecutive, snap.step, batches_skipped, new_lr,
                              self.rollbacks)
        self.consecutive = 0  # panic state is cleared: recovery starts fresh
        self.events.append(event)
        self._emit(event)
        return event

    def _back_off(self, optimizer, scheduler, snap: Snapshot) -> float | None:
        """Learning rate = the snapshot's times lr_backoff per rollback so far (compounding)."""
        if optimizer is None:
            return None
        target = self.lr_scale * self.cfg.lr_backoff
        factor = target / snap.extra.get("_lr_scale", 1.0)
        self.lr_scale = target
        for group in optimizer.param_groups:
            group["lr"] *= factor
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        return optimizer.param_groups[0]["lr"]

    def _emit(self, event: RollbackEvent) -> None:
        log.warning(event.name, **{k: v for k, v in asdict(event).items() if k != "name"})
        if self.sink is None:
            return
        try:
            self.sink(event)
        except Exception as exc:  # telemetry must never stop a rollback
            log.error("governor.sink_failed", error=repr(exc))

    def counts(self) -> dict[str, Any]:
        return {"enabled": True, "rollbacks": self.rollbacks, "panics": dict(self.panics),
                "batches_skipped": self.batches_skipped,
                "snapshot_bytes": self.last_good.nbytes if self.last_good else 0}


class GovernorGaveUp(RuntimeError):
    """The job failed permanently: too many rollbacks, or no state of the job was approved.
    The message says what to change."""

    def __init__(self, reason: str, counts: dict):
        super().__init__(reason)
        self.counts = counts


class GovernorGuard:
    """The governor as the engine's guard (``trainer.guard.Guard``): it judges, the trainer
    acts on the decision."""

    def __init__(self, cfg, vocab_size: int, sink=None):
        self.cfg = cfg
        self.governor = Governor(cfg, vocab_size, sink=sink)
        self.initial_lr: float | None = None
        self.final: dict | None = None
        """How the job's final state was settled (recorded on the job)."""
        self._live: tuple = (None, None, None)
        self._group = None
        self._verdict: Verdict | None = None
        self._step = 0

    def start(self, trainer) -> None:
        self._live = (trainer.model, trainer.optimizer, trainer.scheduler)
        self._group = trainer.group
        self.initial_lr = trainer.cfg.training.learning_rate
        state = trainer.state
        self.governor.snapshot(state.global_step, *self._live, state=state.copy(), initial=True)
        log.info("governor.snapshot_memory", bytes=self.governor.last_good.nbytes)

    def propose(self, state: TrainState) -> None:
        self.governor.propose(state.global_step, *self._live, state=state.copy())

    def before_optimizer_step(self) -> None:
        self.governor.wait_for_snapshot()

    def judge(self, loss: float, grad_norm: float = 0.0, *, final: bool = False,
              step: int = 0) -> Decision:
        g = self.governor
        verdict = self._verdict = self._agreed(g.check(loss, grad_norm))
        self._step = step
        if not verdict.anomalous:
            g.approve()
            if final:
                self.final = {"approved": True, "loss": _round(loss)}
            return Decision(Action.APPROVE, loss)
        g.discard()
        if final:
            return self._settle_final(verdict)
        if not verdict.panic:
            return Decision(Action.HOLD, loss, verdict.kind)
        if g.rollbacks >= self.cfg.max_rollbacks:
            return Decision(Action.FAIL, loss, verdict.kind,
                            GovernorGaveUp(self._give_up_reason(verdict, step), g.counts()))
        return Decision(Action.ROLLBACK, loss, verdict.kind)

    def _settle_final(self, verdict: Verdict) -> Decision:
        """The final weights failed their judgement: back to the last approved state, or fail
        when that is where the job started."""
        snap = self.governor.last_good
        self.final = {"approved": False, "loss": _round(verdict.loss), "kind": verdict.kind,
                      "rolled_back_to_step": None if snap.initial else snap.step}
        if snap.initial:
            return Decision(Action.FAIL, verdict.loss, verdict.kind, GovernorGaveUp(
                self._nothing_approved_reason(verdict), self.counts()))
        return Decision(Action.ROLLBACK, verdict.loss, verdict.kind)

    def rollback(self, decision: Decision, state: TrainState) -> TrainState:
        snap = self.governor.last_good
        skipped = state.micro_done - snap.state.micro_done if snap.state else 0
        self.governor.rollback(self._verdict, self._step, *self._live, batches_skipped=skipped)
        return snap.state.copy() if snap.state else state.copy()

    def _agreed(self, verdict: Verdict) -> Verdict:
        """On several ranks, one rank's panic (or anomaly) is every rank's: all roll back
        together, or none does."""
        group = self._group
        if group is None or not group.active:
            return verdict
        panic, anomalous = group.max([float(verdict.panic), float(verdict.anomalous)])
        if (panic > 0) == verdict.panic and (anomalous > 0) == verdict.anomalous:
            return verdict
        return replace(verdict, panic=panic > 0, anomalous=anomalous > 0,
                       kind=verdict.kind or "peer")

    def _lr(self) -> float:
        optimizer = self._live[1]
        return optimizer.param_groups[0]["lr"] if optimizer is not None else float("nan")

    def _give_up_reason(self, verdict: Verdict, step: int) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.governor.panics.items() if n)
        threshold = f", threshold {verdict.threshold:.4g}" if verdict.threshold else ""
        return (f"governor gave up after {self.governor.rollbacks} rollbacks (panics: {kinds}); "
                f"last: {verdict.kind} at step {step}, loss {verdict.loss:.4g}{threshold}, lr "
                f"{self._lr():.3g}. Lower training.learning_rate (it was {self.initial_lr:.3g}), "
                f"or raise governor.max_rollbacks if the spikes are expected.")

    def _nothing_approved_reason(self, verdict: Verdict) -> str:
        return (f"governor approved no state of this job: the final weights score loss "
                f"{verdict.loss:.4g} ({verdict.kind}) on a fixed batch, where a uniform guess "
                f"scores {self.governor.random_guess_loss:.3g}, and the last approved state is "
                f"the one the job started from. Nothing was saved: the campaign's latest "
                f"checkpoint is unchanged. Lower training.learning_rate (it was "
                f"{self.initial_lr:.3g}).")

    def counts(self) -> dict:
        counts = self.governor.counts()
        if self.final is not None:
            counts["final"] = self.final
        return counts


def _round(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None
