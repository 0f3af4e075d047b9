"""The governor: watches every optimizer step and rolls back to the last known good state.

Starts from esper-lite's Tolaria governor (seeds 003, 004):
- ``check`` reads the vital signs of one step: NaN/Inf in loss or gradient norm panics at once;
  lobotomy (the loss collapses to the random-guess loss ln(vocab), within
  ``lobotomy_tolerance * ln(vocab)``, while the healthy average was below
  ``lobotomy_healthy_ratio * ln(vocab)``) panics at once; divergence (loss > mean + k*std of the
  healthy window AND > multiplier * mean AND > an absolute floor) panics after ``min_panics``
  consecutive anomalous steps. Beyond esper: a loss above ``max_loss_ratio * ln(vocab)`` (far
  worse than guessing) is anomalous even before ``min_history`` healthy values exist, so a job
  that diverges from its first steps is caught. Anomalous values never enter the history.
- ``snapshot`` keeps a last-known-good copy of model, optimizer, scheduler, RNG and the caller's
  extra state, double-buffered: the new copy is built in the spare slot and only then becomes
  current, so a failed snapshot never destroys the previous one. On CUDA the copies go to reused
  pinned CPU buffers, non-blocking on a side stream; the training stream waits on one event
  before its next optimizer step, and a rollback synchronises on it before reading.
- ``rollback`` restores the snapshot, backs the learning rate off, and emits exactly one typed
  ``governor.rollback`` event; a failing event sink is logged and ignored.
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

log = structlog.get_logger("realm.governor")


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
    extra: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0
    ready: Any = None
    """CUDA event recorded after the copies (None on CPU)."""


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
        self.consecutive = 0
        self.sink = sink
        self._slots: list[Snapshot | None] = [None, None]
        self._current: int | None = None
        self.rollbacks = 0
        self.panics = {"nan": 0, "lobotomy": 0, "divergence": 0}
        self.batches_skipped = 0
        self.events: list[RollbackEvent] = []
        self.lr_scale = 1.0
        """Cumulative learning-rate back-off applied so far."""

    # --- vital signs ----------------------------------------------------------------------

    def check(self, loss: float, grad_norm: float = 0.0) -> Verdict:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return self._panic("nan", loss, None)  # at once, and never counted as divergence
        threshold = None
        if len(self.history) >= self.cfg.min_history:
            mean = sum(self.history) / len(self.history)
            if self._lobotomy(loss, mean):
                return self._panic("lobotomy", loss, self.random_guess_loss)
            threshold = self._divergence_threshold(mean)
        insane = self.cfg.max_loss_ratio * self.random_guess_loss
        if loss > insane:  # far worse than uniform guessing: no history needed to know
            threshold = min(threshold, insane) if threshold is not None else insane
        if threshold is not None and loss > threshold:
            self.consecutive += 1
            if self.consecutive >= self.cfg.min_panics:
                return self._panic("divergence", loss, threshold)
            return Verdict(False, True, "divergence", loss, threshold, self.consecutive)
        self.consecutive = 0
        self.history.append(loss)
        return Verdict(False, False, None, loss, None, 0)

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
    def snapshot(self, step: int, model, optimizer=None, scheduler=None, **extra) -> Snapshot:
        """Copy the current (approved) state into the spare slot, then make it current.

        On CUDA the copies run on a side stream into reused pinned buffers; ``ready`` (an event)
        marks their completion. The training stream must wait for it before the next optimizer
        step changes the parameters (``wait_for_snapshot``); the forward and backward passes in
        between overlap with the copy. A rollback synchronises on the event before reading.
        """
        sizes: list[int] = []
        pin = torch.cuda.is_available() and any(p.is_cuda for p in model.parameters())
        spare = 0 if self._current != 0 else 1
        old, self._slots[spare] = self._slots[spare], None  # never current; buffers reused
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
                extra={**extra, "_lr_scale": self.lr_scale})
            snap.ready = stream.record_event() if stream is not None else None
        snap.nbytes = sum(sizes)
        self._slots[spare], self._current = snap, spare
        return snap

    def wait_for_snapshot(self) -> None:
        """Order the training stream after the pending snapshot copy (no host sync)."""
        snap = self.last_good
        if snap is not None and snap.ready is not None:
            torch.cuda.current_stream().wait_event(snap.ready)

    @property
    def last_good(self) -> Snapshot | None:
        return None if self._current is None else self._slots[self._current]

    @torch.no_grad()
    def restore(self, model, optimizer=None, scheduler=None) -> Snapshot:
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
        model.load_state_dict(snap.model, strict=True)
        if optimizer is not None and snap.optimizer is not None:
            optimizer.load_state_dict(snap.optimizer)
        if scheduler is not None and snap.scheduler is not None:
            scheduler.load_state_dict(snap.scheduler)
        torch.set_rng_state(snap.rng_cpu)
        if snap.rng_cuda is not None:
            torch.cuda.set_rng_state(snap.rng_cuda)
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
    """The job failed permanently: too many rollbacks. The message says what to change."""

    def __init__(self, reason: str, counts: dict):
        super().__init__(reason)
        self.counts = counts


class GovernorGuard:
    """Plugs the governor into the engine's step hook (``Trainer.guard``)."""

    def __init__(self, cfg, vocab_size: int, sink=None):
        self.cfg = cfg
        self.governor = Governor(cfg, vocab_size, sink=sink)
        self.approved = True
        self.initial_lr: float | None = None

    def on_start(self, trainer) -> None:
        self.initial_lr = trainer.cfg.training.learning_rate
        self._snapshot(trainer)
        log.info("governor.snapshot_memory", bytes=self.governor.last_good.nbytes)

    def before_optimizer_step(self) -> None:
        self.governor.wait_for_snapshot()

    def after_step(self, trainer, m) -> None:
        verdict = self._agreed(trainer, self.governor.check(m.loss, m.grad_norm))
        if verdict.panic:
            self._handle_panic(trainer, verdict, m)
            self.approved = True  # the restored state is the approved snapshot
            return
        self.approved = not verdict.anomalous
        if self.approved and trainer.job_step % self.cfg.snapshot_steps == 0:
            self._snapshot(trainer)

    @staticmethod
    def _agreed(trainer, verdict: Verdict) -> Verdict:
        """On several ranks, one rank's panic (or anomaly) is every rank's: all roll back
        together, or none does."""
        group = getattr(trainer, "group", None)
        if group is None or not group.active:
            return verdict
        panic, anomalous = group.max([float(verdict.panic), float(verdict.anomalous)])
        if (panic > 0) == verdict.panic and (anomalous > 0) == verdict.anomalous:
            return verdict
        return replace(verdict, panic=panic > 0, anomalous=anomalous > 0,
                       kind=verdict.kind or "peer")

    def _snapshot(self, trainer) -> None:
        self.governor.snapshot(trainer.global_step, trainer.model, trainer.optimizer,
                               trainer.scheduler, epoch=trainer.position.epoch,
                               rows_done=trainer.position.rows_done, micro_done=trainer.micro_done,
                               loss_ewma=trainer.stats.loss_ewma)

    def _handle_panic(self, trainer, verdict: Verdict, m) -> None:
        g = self.governor
        lr = trainer.optimizer.param_groups[0]["lr"]
        if g.rollbacks >= self.cfg.max_rollbacks:
            raise GovernorGaveUp(self._give_up_reason(verdict, m.step, lr), g.counts())
        skipped = trainer.micro_done - g.last_good.extra["micro_done"]
        g.rollback(verdict, m.step, trainer.model, trainer.optimizer, trainer.scheduler,
                   batches_skipped=skipped)
        trainer.global_step = g.last_good.step  # weights are from there; data moves on
        trainer.stats.loss_ewma = g.last_good.extra["loss_ewma"]

    def _give_up_reason(self, verdict: Verdict, step: int, lr: float) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.governor.panics.items() if n)
        threshold = f", threshold {verdict.threshold:.4g}" if verdict.threshold else ""
        return (f"governor gave up after {self.governor.rollbacks} rollbacks (panics: {kinds}); "
                f"last: {verdict.kind} at step {step}, loss {verdict.loss:.4g}{threshold}, lr "
                f"{lr:.3g}. Lower training.learning_rate (it was {self.initial_lr:.3g}), or raise "
                f"governor.max_rollbacks if the spikes are expected.")

    def counts(self) -> dict:
        return self.governor.counts()
