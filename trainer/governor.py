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
- A snapshot holds the trainable parameters (by name, ``requires_grad``), the optimizer state
  (which covers only those), the scheduler, RNG and TrainState: never frozen weights or buffers,
  which no step changes.
- ``propose`` copies a state into the spare of two slots; ``approve`` makes it the last known
  good only when a loss measured on that state was healthy, ``discard`` drops it. A failed copy
  never destroys the previous snapshot. On CUDA the copies go to reused pinned CPU buffers,
  non-blocking on a side stream; the training stream waits on one event before its next
  optimizer step, and a rollback synchronises on it before reading.
- Host memory is bounded (``governor.snapshot_memory_gb``; default a quarter of the memory
  available at job start): ``two_slots`` when two snapshots fit, ``one_slot`` when one does (a
  proposal overwrites the last good, so until it is approved a rollback goes to disk),
  ``disk`` when none does (every rollback restores the last approved checkpoint on disk, which
  the trainer loads: ``restore_from_disk``).
- ``rollback`` restores copies of the snapshot (never aliases), backs the learning rate off,
  and emits exactly one typed ``governor.rollback`` event; a failing event sink is logged and
  ignored. ``rolled_back`` does the same after a restore from disk.
- ``GovernorGuard`` is the engine's guard (``trainer.guard``): it returns decisions, the trainer
  acts on them.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import psutil
import structlog
import torch

from trainer.sharding import DTensor, local

from trainer.guard import Action, Decision
from trainer.state import TrainState

log = structlog.get_logger("realm.governor")

EWMA_ALPHA = 0.1
"""Smoothing of the healthy-loss EWMA the spike rule compares against."""

TWO_SLOTS, ONE_SLOT, DISK = "two_slots", "one_slot", "disk"
MODES = (TWO_SLOTS, ONE_SLOT, DISK)
"""Where the last known good lives, most memory first (``GovernorGuard.start`` picks one)."""
GB = 2**30
MAX_RECORDED_EVENTS = 50
"""The newest rollbacks a job record lists (``governor.events``); ``rollbacks`` counts all."""


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
    """The trainable parameters by name (``model.named_parameters()``)."""
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    state: TrainState | None = None
    """The trainer's counters at this state (a rollback restores its loss EWMA; the data
    position and step counter move on)."""
    initial: bool = False
    """The job's starting state (approved before the job began)."""
    nbytes: int = 0
    ready: Any = None
    """CUDA event recorded after the copies (None on CPU)."""


@dataclass
class _Shard:
    """This rank's shard of a DTensor (a sharded model's weight or moment) in a snapshot: the
    host copy of the local tensor, and what makes it the same DTensor again."""

    local: torch.Tensor
    mesh: Any
    placements: tuple
    shape: torch.Size
    stride: tuple

    def restore(self) -> Any:
        return DTensor.from_local(self.local.clone().to(self.mesh.device_type), self.mesh,
                                  self.placements, run_check=False, shape=self.shape,
                                  stride=self.stride)


def _clone_tree(value: Any) -> Any:
    """Fresh copies of every tensor in a nested state dict (what a restore hands out)."""
    if isinstance(value, _Shard):
        return value.restore()
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
    if DTensor is not None and isinstance(value, DTensor):
        copy = _copy_tree(value.to_local(), out, pin, into.local if isinstance(into, _Shard)
                          else None)
        return _Shard(copy, value.device_mesh, value.placements, value.shape, value.stride())
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


def trainable_params(model) -> dict[str, torch.Tensor]:
    """The parameters a step changes, by name (a tied weight appears once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _nbytes(t: torch.Tensor) -> int:
    t = local(t)  # a sharded tensor: this rank's part
    return t.numel() * t.element_size()


def snapshot_bytes(model, optimizer=None) -> int:
    """Host bytes one snapshot needs: the trainable parameters and the optimizer state as it will
    be once it exists. AdamW creates its moments at the first step, two per parameter in the
    parameter's dtype (a third with amsgrad) and a float32 step scalar; a parameter that already
    has state is measured as it is."""
    total = sum(_nbytes(p) for p in trainable_params(model).values())
    if optimizer is None:
        return total
    for group in optimizer.param_groups:
        moments = 3 if group.get("amsgrad") else 2
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                total += sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
            else:
                total += moments * _nbytes(p) + 4
    return total


def choose_mode(size: int, bound: float) -> str:
    """two_slots when two snapshots fit in ``bound`` bytes, one_slot when one does, else disk."""
    if 2 * size <= bound:
        return TWO_SLOTS
    return ONE_SLOT if size <= bound else DISK


class Governor:
    def __init__(self, cfg, vocab_size: int, *, sink: Callable[[RollbackEvent], None] | None = None,
                 mode: str = TWO_SLOTS):
        assert mode in MODES, mode
        self.cfg = cfg
        self.mode = mode
        """two_slots, one_slot or disk: how many snapshots are kept in host memory."""
        self.snapshot_bytes: int | None = None
        """What one snapshot needs, when measured (``GovernorGuard.start``)."""
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
        self._scale_at: dict[int, float] = {}
        """The back-off in effect when each state was proposed, by step: a rollback to that state
        (from memory or from its checkpoint) restores its learning rate, then backs off from it."""

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
                state: TrainState | None = None, initial: bool = False) -> Snapshot | None:
        """Copy the live state into the spare slot as a candidate; ``approve`` makes it the
        last known good once a loss measured on it is healthy, ``discard`` drops it. In one_slot
        mode the spare slot is the only one; in disk mode nothing is copied (None).

        On CUDA the copies run on a side stream into reused pinned buffers; ``ready`` (an event)
        marks their completion. The training stream must wait for it before the next optimizer
        step changes the parameters (``wait_for_snapshot``); the forward and backward passes in
        between overlap with the copy. A rollback synchronises on the event before reading.
        """
        self._scale_at[step] = self.lr_scale
        self._candidate = False
        if self.mode == DISK:
            return None
        sizes: list[int] = []
        pin = torch.cuda.is_available() and any(p.is_cuda for p in model.parameters())
        spare = self._spare()
        if self.mode == ONE_SLOT:
            self._current = None  # overwritten: until approved, the last good is on disk
        old, self._slots[spare] = self._slots[spare], None  # never current; buffers reused
        stream = torch.cuda.Stream() if pin else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            snap = Snapshot(
                step=step,
                model=_copy_tree(trainable_params(model), sizes, pin, old and old.model),
                optimizer=_copy_tree(optimizer.state_dict(), sizes, pin,
                                     old and old.optimizer) if optimizer else None,
                scheduler=copy.deepcopy(scheduler.state_dict()) if scheduler else None,
                rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.cuda.get_rng_state() if pin else None,
                state=state, initial=initial)
            snap.ready = stream.record_event() if stream is not None else None
        snap.nbytes = sum(sizes)
        self._slots[spare], self._candidate = snap, True
        return snap

    def approve(self) -> Snapshot | None:
        """The pending candidate (if any) becomes the last known good; returns it."""
        if not self._candidate:
            return None
        self._current = self._spare()
        self._candidate = False
        return self.last_good

    def discard(self) -> None:
        """Drop the pending candidate (its buffers stay for reuse)."""
        self._candidate = False

    def snapshot(self, step: int, model, optimizer=None, scheduler=None, *,
                 state: TrainState | None = None, initial: bool = False) -> Snapshot | None:
        """Propose and approve at once: for a state already known good (the job's start)."""
        self.propose(step, model, optimizer, scheduler, state=state, initial=initial)
        return self.approve()

    def wait_for_snapshot(self) -> None:
        """Order the training stream after the pending snapshot copies (no host sync)."""
        for snap in self._slots:
            if snap is not None and snap.ready is not None:
                torch.cuda.current_stream().wait_event(snap.ready)

    def _spare(self) -> int:
        if self.mode == ONE_SLOT:
            return 0
        return 0 if self._current != 0 else 1

    @property
    def last_good(self) -> Snapshot | None:
        """The last known good in memory (None: it is on disk, or there is none)."""
        return None if self._current is None else self._slots[self._current]

    @property
    def candidate(self) -> Snapshot | None:
        return self._slots[self._spare()] if self._candidate else None

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
        params = trainable_params(model)
        if set(params) != set(snap.model):
            missing = sorted(set(params) - set(snap.model))
            extra = sorted(set(snap.model) - set(params))
            raise RuntimeError(f"snapshot does not match the model's trainable parameters: "
                               f"missing {missing[:5]}, unexpected {extra[:5]}")
        for name, p in params.items():
            saved = snap.model[name]  # into the live parameter: the snapshot stays a copy
            local(p).copy_(saved.local if isinstance(saved, _Shard) else saved)
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
        return self.rolled_back(verdict, step, snap.step, optimizer, scheduler,
                                batches_skipped=batches_skipped)

    def rolled_back(self, verdict: Verdict, step: int, snapshot_step: int, optimizer=None,
                    scheduler=None, *, batches_skipped: int = 0) -> RollbackEvent:
        """The live objects hold the approved state of ``snapshot_step`` again (restored from
        memory or from disk): back the learning rate off, count, emit one event."""
        new_lr = self._back_off(optimizer, scheduler, self._scale_at.get(snapshot_step, 1.0))
        self.rollbacks += 1
        self.batches_skipped += batches_skipped
        event = RollbackEvent(verdict.kind or "unknown", step, verdict.loss, verdict.threshold,
                              verdict.consecutive, snapshot_step, batches_skipped, new_lr,
                              self.rollbacks)
        self.consecutive = 0  # panic state is cleared: recovery starts fresh
        self._candidate = False
        self.events.append(event)
        self._emit(event)
        return event

    def _back_off(self, optimizer, scheduler, restored_scale: float) -> float | None:
        """Learning rate = the restored state's times lr_backoff per rollback so far
        (compounding); ``restored_scale`` is the back-off the restored state was trained with."""
        if optimizer is None:
            return None
        target = self.lr_scale * self.cfg.lr_backoff
        factor = target / restored_scale
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
        size = self.snapshot_bytes
        if size is None:
            size = self.last_good.nbytes if self.last_good else 0
        return {"enabled": True, "rollbacks": self.rollbacks, "panics": dict(self.panics),
                "batches_skipped": self.batches_skipped, "snapshot_mode": self.mode,
                "snapshot_bytes": size,
                "events": [event_record(e) for e in self.events[-MAX_RECORDED_EVENTS:]]}


class GovernorGaveUp(RuntimeError):
    """The job failed permanently: too many rollbacks, or no state of the job was approved.
    The message says what to change."""

    def __init__(self, reason: str, counts: dict):
        super().__init__(reason)
        self.counts = counts


class GovernorGuard:
    """The governor as the engine's guard (``trainer.guard.Guard``): it judges, the trainer
    acts on the decision.

    Outside two_slots mode a rollback may need the last approved state on disk: the trainer
    passed to ``start`` then provides ``prepare_disk_rollback()`` (called once, on every rank),
    ``approved_on_disk()`` (this job's newest committed checkpoint past its start, or None: the
    start) and ``restore_from_disk()`` (loads that state into the live objects, returns its
    TrainState)."""

    def __init__(self, cfg, vocab_size: int, sink=None):
        self.cfg = cfg
        self.governor = Governor(cfg, vocab_size, sink=sink)
        self.initial_lr: float | None = None
        self.final: dict | None = None
        """How the job's final state was settled (recorded on the job)."""
        self._live: tuple = (None, None, None)
        self._group = None
        self._trainer = None
        self._verdict: Verdict | None = None
        self._step = 0

    def start(self, trainer) -> None:
        self._live = (trainer.model, trainer.optimizer, trainer.scheduler)
        self._group, self._trainer = trainer.group, trainer
        self.initial_lr = trainer.cfg.training.learning_rate
        self._choose_mode()
        if self.governor.mode != TWO_SLOTS:
            trainer.prepare_disk_rollback()
        state = trainer.state
        self.governor.snapshot(state.global_step, *self._live, state=state.copy(), initial=True)

    def _choose_mode(self) -> None:
        """Measure one snapshot, pick the mode its bound allows (the most frugal any rank
        needs: all ranks must restore the same state) and log it once."""
        g, (model, optimizer, _) = self.governor, self._live
        size = g.snapshot_bytes = snapshot_bytes(model, optimizer)
        bound, source = self._bound()
        own = choose_mode(size, bound)
        note, mode = _mode_note(own, size, bound, source), MODES.index(own)
        if self._group is not None and self._group.active:
            mode = int(self._group.max([float(mode)])[0])
        g.mode = MODES[mode]
        if g.mode != own:
            note += f"; another rank of this job needs {g.mode}, and all ranks restore alike"
        log.info("governor.snapshot_mode", mode=g.mode, snapshot_bytes=size,
                 bound_bytes=int(bound), note=note)

    def _bound(self) -> tuple[float, str]:
        """(bytes this rank's snapshots may hold, where the bound comes from). The ranks on one
        host share it."""
        ranks = getattr(self._group, "local_world", 1) or 1
        share = f", shared by {ranks} ranks on this host" if ranks > 1 else ""
        if self.cfg.snapshot_memory_gb is not None:
            return self.cfg.snapshot_memory_gb * GB / ranks, f"governor.snapshot_memory_gb{share}"
        available = psutil.virtual_memory().available
        return available / 4 / ranks, (f"a quarter of the memory available at job start{share}; "
                                       "set governor.snapshot_memory_gb to change it")

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
        step, initial = self._last_approved()
        self.final = {"approved": False, "loss": _round(verdict.loss), "kind": verdict.kind,
                      "rolled_back_to_step": None if initial else step}
        if initial:
            return Decision(Action.FAIL, verdict.loss, verdict.kind, GovernorGaveUp(
                self._nothing_approved_reason(verdict), self.counts()))
        return Decision(Action.ROLLBACK, verdict.loss, verdict.kind)

    def _last_approved(self) -> tuple[int | None, bool]:
        """(step, whether it is the job's start) of the state a rollback would restore."""
        snap = self.governor.last_good
        if snap is not None:
            return snap.step, snap.initial
        ckpt = self._trainer.approved_on_disk()
        return (None, True) if ckpt is None else (ckpt.step, False)

    def rollback(self, decision: Decision, state: TrainState) -> TrainState:
        g, snap = self.governor, self.governor.last_good
        if snap is None:  # not in memory (disk mode, or one slot holding an unjudged state)
            restored = self._trainer.restore_from_disk()
            g.rolled_back(self._verdict, self._step, restored.global_step, *self._live[1:],
                          batches_skipped=state.micro_done - restored.micro_done)
            return restored
        skipped = state.micro_done - snap.state.micro_done if snap.state else 0
        g.rollback(self._verdict, self._step, *self._live, batches_skipped=skipped)
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


def _mode_note(mode: str, size: int, bound: float, source: str) -> str:
    one, limit = f"{size / GB:.3g} GB", f"{bound / GB:.3g} GB bound ({source})"
    if mode == TWO_SLOTS:
        return (f"two snapshots of {one} fit in the {limit}: rollbacks restore from host "
                "memory")
    if mode == ONE_SLOT:
        return (f"one snapshot is {one}: one fits in the {limit}, two do not. From a proposal "
                "until its approval, a rollback restores the last approved checkpoint on disk")
    return (f"one snapshot is {one}, over the {limit}: rollbacks restore the last approved "
            "checkpoint on disk")


def event_record(event: RollbackEvent) -> dict[str, Any]:
    """A rollback as JSON: its fields without the name, a NaN or infinite number as None."""
    return {k: _round(v) if isinstance(v, float) else v
            for k, v in asdict(event).items() if k != "name"}


def _round(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None
