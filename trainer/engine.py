"""The trainer for one job: setup, an epoch runner with small named helpers, finalize.

    Trainer.train():  _setup_model -> _setup_data -> _setup_optimizer -> _restore
                      -> EpochRunner.run() per epoch -> _finalize

The step body lives in ``EpochRunner.train_step``: prepare microbatches, forward/backward each
(loss summed over tokens and divided by the step's total target tokens, so accumulation equals
one big batch), optimizer step with clipping, metrics. Step N's forward pass measures the weights
step N-1 produced, so after every optimizer step the guard (``trainer.guard``; the governor by
default) judges the PREVIOUS state: a checkpoint staged for that state is committed only on
approval. The job's final state (and a stopped job's last one) is judged by one no-grad pass on
a fixed batch before it is written; when it fails, the job saves its last approved state
instead, or fails when that is the state it started from. One cooperative stop check per step.

Across jobs (``trainer.optim``): the learning-rate schedule runs per job or over the whole
campaign (one warmup, then constant or a decay over a token budget, driven by the campaign step
and the campaign's trained tokens carried in ``TrainState``); a job that continues from another
job's checkpoint takes its AdamW moments when they fit. Every ``eval.every_steps`` rank 0
measures the validation loss (and samples ``eval.sample_prompts``) outside the step's timing.

Lineage (``trainer.checkpoint``): a new job continues from the campaign's newest *finished*
checkpoint; it resumes its own unfinished one only when job id and config hash match and no
other job finished since; anything else above the head is a dead branch and is removed. A job
that fails permanently removes what it wrote (a cancelled one too: ``trainer.run_job``).

On several devices (``trainer.distributed.Group``) each rank takes its slice of every global
microbatch (``micro_batch_size`` rows per rank), the step's token count is summed over the ranks
before the backward pass and DDP averages the gradients, so a step equals the same global batch
on one process. Rank 0 alone writes checkpoints, status and the record; every decision (stop,
governor panic) is agreed by all-reduce so the ranks never part ways.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from config.locked import verify_locked
from config.resolver import training_changes
from core.errors import ConfigError, InputError, RealmError
from core.fsutil import host_name
from core.validate import read_regular
from trainer.attention import NAME as ATTENTION, use_packed_attention
from trainer.checkpoint import (CONFIG_FILE, Checkpoint, Staged, apply_retention, clean_incomplete,
                                complete_checkpoints, initial_weights_dir, lineage_head,
                                load_trainable, remove_checkpoint, remove_unfinished_of,
                                save_trainable, shards_dir, stage_checkpoint)
from trainer.data.cache import load_or_build
from trainer.data.packing import IGNORE, Batch, collate, pack_rows, packing_efficiency
from trainer.data.reader import DataError
from trainer.distributed import Group, weights_digest
from trainer.governor import GovernorGaveUp, GovernorGuard, event_record
from trainer.guard import Action, Decision, FiniteGuard, NonFiniteLoss
from trainer.metrics import (STEP_METRICS, RunningStats, StatusWriter, StepMetrics, get_logger,
                             progress_line, status_payload)
from trainer.adapters import (adapter_summary, base_source, causal_lm, is_quantized,
                              load_adapter_model, qlora_problem)
from trainer.model import load_model
from trainer.optim import (Schedule, keep_hyperparameters, moments_problem,
                           param_groups)
from trainer.state import TrainState, campaign_tokens_of
from trainer.telemetry import TensorBoardLog
from trainer import sharding


class StopRequested(Exception):
    """Control signal: the job stopped at a step boundary; ``checkpoint`` is its resume point."""

    def __init__(self, checkpoint: Checkpoint | None, step: int):
        super().__init__(f"stopped at step {step}")
        self.step = step
        self.checkpoint = checkpoint
        """The resume point (None on ranks other than 0, which write nothing)."""


class RanksDiverged(RuntimeError):
    """The replicas of a multi-process job ended with different weights (a bug, never saved)."""


@dataclass
class JobSpec:
    """Everything one job needs, resolved before training starts."""

    job_id: str
    dataset: Path
    dataset_sha256: str
    config: Any  # RealmConfig
    locked: dict
    hero: Any  # HeroProfile
    checkpoint_root: Path
    cache_root: Path
    config_hash: str = ""
    status_path: Path | None = None
    base_dir: Path | None = None
    """The realm folder: a relative ``eval.sample_prompts`` path is read from it."""
    config_record: dict | None = None
    """``Resolved.record()``: written into every checkpoint as ``realm_config.json``."""
    tensorboard_dir: Path | None = None
    """The campaign's TensorBoard folder (``logs/tensorboard/<hero>/<campaign>``); None: no
    event files (``logging.report_to: none``)."""


@dataclass
class TrainResult:
    start_step: int
    final_step: int
    final_loss: float | None
    final_val_loss: float | None
    tokens_per_sec_avg: float
    """Processed (non-pad input) tokens per second of step time."""
    checkpoint: Checkpoint | None
    data: dict = field(default_factory=dict)
    resumed_from: int | None = None
    governor: dict = field(default_factory=dict)
    trained_tokens_per_sec_avg: float = 0.0
    """Loss-bearing tokens per second of step time."""


@dataclass
class StartPoint:
    """The job's starting state as a rollback to disk restores it: small things here, the
    weights and carried moments read back from disk."""

    state: TrainState
    weights: Path
    """The start checkpoint's folder, or the folder holding the initial trainable weights."""
    optimizer: dict
    """The optimizer's state dict at the start without its moments (hyperparameters only)."""
    moments: Checkpoint | None
    """Where the moments the job started with are read back from (None: fresh moments)."""
    scheduler: dict
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    own_weights: bool = False
    """``weights`` is this job's temporary folder (removed at the job's end)."""


PERMANENT_FAILURES = (RealmError, DataError, NonFiniteLoss, GovernorGaveUp)
"""Failures that retrying cannot fix (bad data or config, the governor): the job fails for
good and removes the checkpoints it wrote."""


def pick_device(precision: str, device: torch.device | None = None
                ) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None): bf16 autocast on CUDA that supports it when asked or
    auto; fp32 otherwise (the trainer warns when bf16 was asked for and is unavailable)."""
    if torch.cuda.is_available():
        use_bf16 = precision in ("bf16", "auto") and torch.cuda.is_bf16_supported()
        return device or torch.device("cuda"), torch.bfloat16 if use_bf16 else None
    return torch.device("cpu"), None


PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``training.param_dtype`` -> the dtype weights are loaded and kept in."""
ADAPTER_FIX = ("\nThe adapter's shape is fixed once a campaign trained: set adapter.* back to the "
               "checkpoint's values, or create a new campaign for the new shape (`realm campaign "
               "create NAME --hero HERO`).")


def _state_dtype(optimizer) -> str | None:
    """The dtype of the AdamW moments (they follow their parameter's dtype)."""
    for state in optimizer.state.values():
        moment = state.get("exp_avg")
        if isinstance(moment, torch.Tensor):
            return str(moment.dtype).removeprefix("torch.")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return str(params[0].dtype).removeprefix("torch.") if params else None


def peak_memory(device: torch.device, setup_peak: int | None = None) -> dict[str, int]:
    """Peak resident memory of this process so far, and the peak CUDA allocation (bytes): over
    the whole job, and (``setup_peak`` given: the peak before the first step, after which the
    counter was reset) while training."""
    import resource

    out = {"host_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        train = int(torch.cuda.max_memory_allocated(device))
        out["cuda_peak_bytes"] = max(train, setup_peak or 0)
        if setup_peak is not None:
            out["cuda_train_peak_bytes"] = train
    return out


MAX_PROMPTS_BYTES = 1 << 20
MAX_SAMPLE_PROMPTS = 32
"""Generation at every evaluation is slow next to a loss pass: a few prompts show the trend."""


def read_prompts(setting: str, base: Path | None) -> list[str]:
    """``eval.sample_prompts``: one prompt per non-empty line (a line that parses as a JSON
    string is that string, so a prompt may hold newlines). A relative path is read from the
    realm folder. Anything unreadable is a ConfigError naming the key and the path."""
    path = Path(setting).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        text = read_regular(path, MAX_PROMPTS_BYTES, "prompts file").decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"eval.sample_prompts: {path} does not exist; write one prompt per "
                          "line there, or unset eval.sample_prompts.") from None
    except (OSError, InputError, UnicodeDecodeError) as exc:
        raise ConfigError(f"eval.sample_prompts: cannot read {path}: {exc}") from None
    prompts = [_prompt(line) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"eval.sample_prompts: {path} holds no prompt (one per line).")
    return prompts


def _prompt(line: str) -> str:
    try:
        value = json.loads(line)
    except ValueError:
        return line
    return value if isinstance(value, str) else line


class TokenLoss(torch.nn.Module):
    """The model with its loss as one module, so DDP's forward (which arms the gradient
    all-reduce) wraps exactly what a step runs."""

    def __init__(self, model, autocast_dtype):
        super().__init__()
        self.model, self.autocast_dtype = model, autocast_dtype

    def forward(self, batch: "Batch") -> torch.Tensor:
        return token_loss_sum(self.model, batch, self.autocast_dtype)


class Trainer:
    def __init__(self, spec: JobSpec, *, stop_requested: Callable[[], bool] = lambda: False,
                 guard=None, device: torch.device | None = None, group: Group | None = None):
        self.spec, self.cfg = spec, spec.config
        self.group = group or Group()
        self.stop_requested = stop_requested
        self.guard = guard
        self.loss_hook: Callable[[int, float], float] | None = None
        """Test-only: rewrites the measured loss of a step (spike injection); not a config knob."""
        self.heartbeat: Callable[[str], None] = lambda _phase: None
        """A sign of life, called after each setup phase and each optimizer step with the phase
        (``model``, ``data``, ``optimizer``, ``restore``, ``step:N``); the daemon kills a child
        whose signs of life stop (``daemon.protocol``)."""
        self.data_tick: Callable[[], None] = lambda: None
        """Called per line while the dataset is read or tokenized (throttled by the callee)."""
        self.device, self.autocast_dtype = pick_device(self.cfg.training.precision,
                                                       self.group.device())
        if device is not None:
            self.device, self.autocast_dtype = device, None
        self.log = get_logger(job_id=spec.job_id)
        self.precision = "bf16" if self.autocast_dtype is torch.bfloat16 else "fp32"
        """The precision actually used (recorded on the job)."""
        self.stats = RunningStats()
        self.state = TrainState()
        self.staged: Staged | None = None
        """A checkpoint written for a state the guard has not judged yet (rank 0)."""
        self.stop_agreed = False
        """Set after each step when any rank was asked to stop."""
        self.resumed_from: int | None = None
        self.finished_before: Checkpoint | None = None
        """This job's own finished checkpoint, when an earlier attempt trained to the end."""
        self.last_loss: float | None = None
        self.status = StatusWriter(spec.status_path if self.group.main else None,
                                   self.cfg.logging.status_every_seconds)
        self.evals: list[tuple[int, float]] = []
        """(campaign step, validation loss) of every evaluation of this attempt (rank 0)."""
        self.sample_prompts: list[str] = []
        self.lr_start: float | None = None
        self._budget_warned = False
        self.setup_cuda_peak: int | None = None
        """Peak CUDA allocation of loading, before the counter is reset for training."""
        self.start_point: StartPoint | None = None
        """Kept when the governor may roll back to disk (``prepare_disk_rollback``)."""
        self.curve: list[tuple[int, float]] = []
        """(global step, loss) of every finite step of this attempt: the live curve."""
        self.rollbacks: list[dict] = []
        """The governor's rollback events of this attempt (the live view shows them)."""
        self.board: TensorBoardLog | None = None
        self.sharded = False
        """FSDP2: every rank holds a shard of the weights and optimizer state (collectives for
        checkpoints and evaluations; ``trainer.sharding``)."""

    # --- the spine ------------------------------------------------------------------------

    def train(self) -> TrainResult:
        try:
            self._check_settings()
            self._setup_model()
            self.heartbeat("model")
            self._setup_data()
            self.heartbeat("data")
            self._setup_optimizer()
            self.heartbeat("optimizer")
            self._restore()
            self._setup_guard()
            self._open_board()
            self.heartbeat("restore")
            if self.device.type == "cuda":  # loading (e.g. quantizing) apart from training
                self.setup_cuda_peak = int(torch.cuda.max_memory_allocated(self.device))
                torch.cuda.reset_peak_memory_stats(self.device)
            runner = EpochRunner(self)
            while not self.finished():
                runner.run()
            return self._finalize()
        except PERMANENT_FAILURES:
            self._discard_own_checkpoints()  # a failed job leaves the lineage as it was
            raise
        finally:
            if self.staged is not None:
                self.staged.discard()
            self._drop_initial_weights()
            if self.board is not None:
                self.board.close()

    @property
    def parallelism(self) -> str:
        """How the job's ranks share the model: single, ddp or fsdp."""
        return "single" if not self.group.active else ("fsdp" if self.sharded else "ddp")

    def finished(self) -> bool:
        return (self.state.job_step >= self.total_steps
                or self.state.epoch >= self.cfg.training.epochs)

    @property
    def global_step(self) -> int:
        return self.state.global_step

    # --- setup ----------------------------------------------------------------------------

    def _check_settings(self) -> None:
        """What can be checked before anything loads: the precision that will really be used,
        and the sample prompts file (read now: a bad path fails the job at once)."""
        requested = self.cfg.training.precision
        problem = qlora_problem() if self.cfg.adapter.method == "qlora" else None
        if self.cfg.training.parallelism == "fsdp" and self.group.active:
            problem = problem or _fsdp_problem(self.cfg)
        if problem:  # before anything loads (a fresh campaign's base is built first)
            raise ConfigError(problem)
        if requested == "bf16" and self.precision != "bf16":
            why = ("bf16 autocast runs on CUDA only" if self.device.type == "cpu" else
                   f"{torch.cuda.get_device_name(self.device)} does not support bf16")
            self.log.warning("training.precision_unavailable", requested=requested,
                             used=self.precision, reason=why)
        path = self.cfg.eval.sample_prompts
        if path:
            self.sample_prompts = read_prompts(path, self.spec.base_dir)
            if len(self.sample_prompts) > MAX_SAMPLE_PROMPTS:
                self.log.warning("eval.sample_prompts_capped", prompts=len(self.sample_prompts),
                                 used=MAX_SAMPLE_PROMPTS)
                self.sample_prompts = self.sample_prompts[:MAX_SAMPLE_PROMPTS]

    def _setup_model(self) -> None:
        root = self.spec.checkpoint_root
        if self.group.main:
            clean_incomplete(root)
            self.start_checkpoint = self._choose_start(root)
            if self.cfg.adapter.method != "none" and self.start_checkpoint is None:
                # a fresh adapter campaign's base (random-init hero): built once, by rank 0
                base_source(self.spec.hero, root.parent, self.cfg.training.seed)
        self.group.barrier()  # rank 0 has pruned dead branches: every rank sees the same start
        if not self.group.main:
            self.start_checkpoint = self._choose_start(root, prune=False)
        if self.start_checkpoint is not None:
            diff = verify_locked(self.start_checkpoint.locked(), self.spec.locked)
            if diff:
                raise ConfigError(f"refusing to continue from {self.start_checkpoint.path}: {diff}"
                                  + (ADAPTER_FIX if "adapter." in diff else ""))
        self.model, self.tokenizer = self._load_model()
        self.lm = causal_lm(self.model)
        """The transformers model the loss calls (under the peft wrapper, when there is one)."""
        if not is_quantized(self.model):  # a 4-bit base was placed on its GPU as it loaded
            self.model.to(self.device)
        if self.cfg.training.gradient_checkpointing:
            self.lm.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.device.type == "cpu":
            # Span-wise attention skips the masked-out blocks: faster on CPU. On CUDA the
            # per-span kernel launches cost more than they save, so the 4D block-diagonal mask
            # with fused sdpa is used there (measured: scripts/check_cuda.py).
            use_packed_attention(self.lm)
        if self.cfg.training.compile:
            self.lm.model.compile()  # in place: token_loss_sum calls model.model directly
        self.log.info("model.ready", adapter=self.cfg.adapter.method,
                      param_dtype=self.cfg.training.param_dtype,
                      gradient_checkpointing=self.cfg.training.gradient_checkpointing,
                      **adapter_summary(self.model))
        self.loss_module = self.token_loss = TokenLoss(self.lm, self.autocast_dtype)
        if self.group.active and self.cfg.training.parallelism == "fsdp":
            sharding.shard(self.loss_module, self.lm, bf16=self.autocast_dtype is torch.bfloat16,
                           device_type=self.device.type)
            self.sharded = True
            # where the ranks write a checkpoint's optimizer shards: named by rank 0's pid, as
            # its staged folder is (a dead writer's leftovers are cleaned the same way)
            self.shards_writer = self._main_writer()
            self.log.info("model.sharded", parallelism="fsdp", world=self.group.world)
        elif self.group.active:
            from torch.nn.parallel import DistributedDataParallel

            # buffers (rotary tables) are constant: no per-step broadcast
            self.loss_module = DistributedDataParallel(self.loss_module,
                                                       forward_sync_buffers=False)
        start = self.start_checkpoint.step if self.start_checkpoint else 0
        self.state = TrainState(global_step=start, job_start_step=start)

    def _load_model(self):
        """Full fine-tuning: the weights of the start checkpoint (or the hero's). An adapter:
        the frozen base with the start checkpoint's adapter (or a fresh one)."""
        t, spec = self.cfg.training, self.spec
        dtype = PARAM_DTYPES[t.param_dtype]
        start = self.start_checkpoint.path if self.start_checkpoint else None
        if self.cfg.adapter.method == "none":  # an adapter checkpoint: refused by verify_locked
            return load_model(spec.hero, spec.locked, seed=t.seed, checkpoint=start, dtype=dtype)
        return load_adapter_model(spec.hero, spec.locked, self.cfg.adapter,
                                  campaign_dir=spec.checkpoint_root.parent, checkpoint=start,
                                  seed=t.seed, dtype=dtype, device=self.device,
                                  gradient_checkpointing=t.gradient_checkpointing)

    def _choose_start(self, root: Path, prune: bool = True) -> Checkpoint | None:
        """This job's own finished checkpoint (trained already), else its resume point when it
        still builds on the campaign's head with the same config, else the head. Unfinished
        checkpoints above the head that are not that resume point are dead branches (a failed
        attempt, a refused resume): removed, so no name is reused and none becomes the head."""
        me = self.spec.job_id
        found = complete_checkpoints(root)
        mine_done = [c for c in found if c.lineage() == (me, True)]
        if mine_done:
            return mine_done[-1]
        head = lineage_head(root)
        base = head.step if head else 0
        mine = [c for c in found if c.lineage() == (me, False) and c.step > base]
        resume = mine[-1] if mine else None
        refusal = self._resume_refusal(resume, base) if resume else None
        if refusal:
            self.log.warning("job.resume_refused", checkpoint=str(resume.path), reason=refusal,
                             starts_from=str(head.path) if head else "fresh weights")
            resume = None
        for ckpt in found:
            if prune and ckpt.step > base and ckpt != resume and not ckpt.lineage()[1]:
                remove_checkpoint(ckpt, "checkpoint.branch_discarded", head=base,
                                  job_id=ckpt.lineage()[0], reason=refusal or "not on the "
                                  "campaign's lineage (written by an attempt that did not finish)")
        return resume or head

    def _resume_refusal(self, ckpt: Checkpoint, base: int) -> str | None:
        """Why this job's own checkpoint may not be resumed (None: it may)."""
        state = ckpt.state()
        if state.get("job_start_step") != base:
            return (f"it continued from step {state.get('job_start_step')}, but the campaign's "
                    f"latest checkpoint is now step {base}")
        if state.get("config_hash") != self.spec.config_hash:
            changed = self._training_changes(ckpt)
            if changed is None:
                changed = [f"config_hash {state.get('config_hash')} -> {self.spec.config_hash}"]
            if changed:
                more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
                return (f"the job's config changed since it was written ({'; '.join(changed[:5])}"
                        f"{more}): its optimizer, schedule and data position belong to the old "
                        "config")
            self.log.info("job.resume_config_operational", checkpoint=str(ckpt.path),
                          note="only daemon.* / logging.* keys (or new keys at their defaults) "
                               "changed: the resume point is still exact")
        return None

    def _training_changes(self, ckpt: Checkpoint) -> list[str] | None:
        """The keys that changed what a step computes since ``ckpt`` was written (None: its
        recorded config is unreadable, so only the hash can judge)."""
        try:
            record = json.loads((ckpt.path / CONFIG_FILE).read_text())
            return training_changes(record["config"], self.cfg)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _setup_data(self) -> None:
        data = self.cfg.data
        if not self.group.main:
            self.group.barrier()  # rank 0 tokenizes first; the others then read its cache
        store, reused = load_or_build(self.spec.dataset, self.spec.dataset_sha256,
                                      self.tokenizer, data, self.spec.cache_root,
                                      tick=self.data_tick)
        if self.group.main:
            self.group.barrier()
        self.store = store
        train_idx, val_idx = self._split(len(store))
        lengths = store.lengths()
        self.rows = [[train_idx[i] for i in row] for row in
                     pack_rows(lengths[train_idx], data.max_length, data.packing)]
        self.val_rows = [[val_idx[i] for i in row] for row in
                         pack_rows(lengths[val_idx], data.max_length, data.packing)]
        B, A = self.cfg.training.micro_batch_size, self.cfg.training.grad_accum
        self.micro_per_epoch = math.ceil(len(self.rows) / (B * self.group.world))
        steps_per_epoch = math.ceil(self.micro_per_epoch / A)
        total = steps_per_epoch * self.cfg.training.epochs
        self.total_steps = min(total, self.cfg.training.max_steps or total)
        self.data_stats = {
            "packing_efficiency": round(packing_efficiency(self.rows, lengths, data.max_length), 4),
            "rows": len(self.rows), "val_rows": len(self.val_rows), "cache_reused": reused,
            "world_size": self.group.world,
            **{k: store.meta[k] for k in ("num_examples", "num_tokens", "trained_tokens",
                                          "masked_fraction", "truncated_examples", "turns_dropped",
                                          "dropped_examples", "truncation", "bad_lines")}}
        self.log.info("data.ready", **self.data_stats, total_steps=self.total_steps)
        if not self.rows:
            raise DataError(f"{self.spec.dataset}: no training rows after the validation split.")
        if self.cfg.eval.every_steps and not self.val_rows:
            self.log.warning("eval.no_validation_split", every_steps=self.cfg.eval.every_steps,
                             val_fraction=data.val_fraction, note="eval.every_steps has no effect:"
                             " set data.val_fraction above 0 (and enough examples for one row)")

    def _split(self, n: int) -> tuple[list[int], list[int]]:
        n_val = int(n * self.cfg.data.val_fraction)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.training.seed))
        val = sorted(order[:n_val].tolist())
        held = set(val)
        return [i for i in range(n) if i not in held], val

    def _setup_optimizer(self) -> None:
        t = self.cfg.training
        fused = self.device.type == "cuda"
        groups, sizes = param_groups(self.model, t.weight_decay, t.no_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=t.learning_rate,
                                           betas=(t.adam_beta1, t.adam_beta2),
                                           weight_decay=t.weight_decay, fused=fused)
        self.log.info("optimizer.param_groups", **sizes)
        self.schedule = Schedule.of(t, self.total_steps)
        if t.campaign_tokens is not None and t.schedule_scope == "job":
            self.log.warning("lr.option_without_effect", key="training.campaign_tokens",
                             note="the token budget applies to training.schedule_scope campaign")
        elif t.campaign_tokens is not None and t.schedule == "constant":
            self.log.warning("lr.option_without_effect", key="training.campaign_tokens",
                             note="training.schedule constant never decays; the budget only "
                             "reports when it is spent")
        # stepped after each optimizer step, once the step's counters are updated
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, job_step: int) -> float:
        """The factor for the next optimizer step (LambdaLR counts this job's steps; the
        campaign scope reads the campaign's counters instead)."""
        if self.schedule.scope == "job":
            return self.schedule.job_factor(job_step)
        tokens = self.state.campaign_tokens
        if self.schedule.exhausted(tokens) and not self._budget_warned:
            self._budget_warned = True
            self.log.warning("lr.budget_exhausted", campaign_tokens=self.schedule.budget,
                             trained=tokens, lr_ratio=self.schedule.min_lr_ratio,
                             note="the campaign's token budget is spent: training goes on at the"
                             " floor learning rate; raise training.campaign_tokens to decay "
                             "over a longer campaign")
        return self.schedule.campaign_factor(self.state.global_step, tokens)

    def _apply_schedule(self) -> None:
        """Set the next step's learning rate from the campaign's counters (they are only
        known once the start checkpoint is read)."""
        if self.schedule.scope != "campaign":
            return
        factor = self._lr_factor(self.state.job_step)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _setup_guard(self) -> None:
        if self.guard is None:
            if self.cfg.governor.enabled:
                self.guard = GovernorGuard(self.cfg.governor, self.model.config.vocab_size,
                                           sink=self._on_rollback)
            else:
                self.log.warning("governor.disabled", note="governor.enabled is false: NaN "
                                 "fails the job, divergence and collapse go unchecked")
                self.guard = FiniteGuard()
        self.guard.start(self)

    def _open_board(self) -> None:
        """TensorBoard event files on rank 0, purging what an earlier attempt wrote past this
        job's starting step (``trainer.telemetry``)."""
        if self.spec.tensorboard_dir is not None and self.group.main:
            self.board = TensorBoardLog(self.spec.tensorboard_dir, self.global_step + 1)
            self.log.info("tensorboard.writing", logdir=str(self.spec.tensorboard_dir),
                          from_step=self.global_step + 1)

    def _on_rollback(self, event) -> None:
        """The governor's sink: the live view and TensorBoard see every rollback."""
        self.rollbacks.append(event_record(event))
        if self.board is not None:
            self.board.scalars(event.step, {"governor/rollbacks": event.rollback_number,
                                            "governor/lr_after_rollback": event.new_lr})

    def _restore(self) -> None:
        """Resume this job's own checkpoint exactly; a previous job's lends its weights, the
        campaign's counters and (``training.carry_optimizer``) its AdamW moments."""
        if self.start_checkpoint is not None:
            self._restore_from(self.start_checkpoint)
        self.lr_start = self.optimizer.param_groups[0]["lr"]
        self.log.info("lr.schedule", **self.schedule.describe(), lr=self.lr_start,
                      campaign_step=self.state.global_step,
                      campaign_tokens_seen=self.state.campaign_tokens)

    def _restore_from(self, ckpt: Checkpoint) -> None:
        state = ckpt.state()
        if state.get("job_id") == self.spec.job_id and state.get("job_finished"):
            # An earlier attempt trained to the end and died before the job was recorded:
            # training again would apply this dataset twice.
            self.finished_before = ckpt
            self.state = TrainState.from_json(state)
            self.state.epoch = self.cfg.training.epochs
            self.last_loss = state.get("last_loss")
            self.log.warning("job.already_trained", checkpoint=str(ckpt.path), step=ckpt.step)
        elif state.get("job_id") != self.spec.job_id:
            self.log.info("job.continues_from", checkpoint=str(ckpt.path), step=ckpt.step)
            self.state.campaign_tokens = campaign_tokens_of(state)
            self._carry_moments(ckpt)
            self._apply_schedule()
        else:
            self._resume(ckpt, state)

    def _carry_moments(self, ckpt: Checkpoint) -> None:
        """AdamW moments of the checkpoint this job continues from, when they fit; otherwise
        a warning and fresh moments (never a failure: the weights are what matters)."""
        if not self.cfg.training.carry_optimizer:
            self.log.info("optimizer.fresh_moments", reason="training.carry_optimizer is false")
            return
        try:
            saved = self._optimizer_state(ckpt.torch_state().get("optimizer"), ckpt.path)
        except (OSError, EOFError, RuntimeError, ValueError, KeyError) as exc:
            saved, problem = None, f"cannot read its optimizer state: {exc}"
        else:  # shards are checked as DCP loads them
            problem = None if isinstance(saved, Path) else moments_problem(saved, self.optimizer)
        if problem is None:
            try:
                with keep_hyperparameters(self.optimizer):
                    self._load_optimizer(saved)
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                problem = f"loading them failed: {exc}"
        if problem is not None:
            self.log.warning("optimizer.moments_not_carried", checkpoint=str(ckpt.path),
                             reason=problem, note="this job starts with fresh AdamW moments")
            return
        self.log.info("optimizer.moments_carried", checkpoint=str(ckpt.path),
                      **({"sharded": True} if isinstance(saved, Path)
                         else {"params": len(saved["state"])}))

    def _optimizer_state(self, saved: dict | None, folder: Path) -> dict | Path | None:
        """What checkpoint ``folder`` holds of the optimizer, in the form this job loads: an
        index-keyed state dict (``trainer_state.pt``'s, or a sharded job's shards read whole
        for a job that is not sharded), or for a sharded job the shards folder itself."""
        shards = folder / sharding.SHARDS
        if saved is None and shards.is_dir():
            return shards if self.sharded else \
                sharding.optimizer_from_shards(shards, self.token_loss, self.optimizer)
        return saved

    def _load_optimizer(self, state: dict | Path) -> None:
        """``_optimizer_state``'s answer into the live optimizer (a sharded job's: into its
        shards, resharded to this world size)."""
        if isinstance(state, Path):
            sharding.load_optimizer_shards(self.loss_module, self.optimizer, state)
        elif self.sharded:
            sharding.load_full_optimizer_state(self.loss_module, self.optimizer, state)
        else:
            self.optimizer.load_state_dict(state)

    def _resume(self, ckpt: Checkpoint, state: dict) -> None:
        """This job's own checkpoint: optimizer, scheduler, RNG and counters exactly."""
        self._load_torch_state(ckpt.torch_state(), ckpt.path)
        self.state = TrainState.from_json(state)
        self.stats.loss_ewma = self.state.loss_ewma
        self.resumed_from = ckpt.step
        self.log.info("job.resumed", checkpoint=str(ckpt.path), step=ckpt.step,
                      epoch=self.state.epoch, rows_done=self.state.rows_done)

    def _load_torch_state(self, saved: dict, folder: Path) -> None:
        self._load_optimizer(self._optimizer_state(saved["optimizer"], folder))
        self.scheduler.load_state_dict(saved["scheduler"])
        self._set_rng(saved["rng_cpu"], saved.get("rng_cuda"))

    def _set_rng(self, cpu: torch.Tensor, cuda: torch.Tensor | None) -> None:
        torch.set_rng_state(cpu)
        if self.device.type == "cuda" and cuda is not None:
            torch.cuda.set_rng_state(cuda)

    # --- the governor's rollback to disk ---------------------------------------------------

    def prepare_disk_rollback(self) -> None:
        """Called at the start (every rank) when the governor keeps fewer than two snapshots:
        keep what restoring the start needs. A job that starts from no checkpoint writes its
        initial trainable weights once (rank 0, to a temporary folder every rank reads)."""
        if self.sharded and self.cfg.adapter.method != "none":
            raise ConfigError(
                "the governor's snapshots do not fit governor.snapshot_memory_gb, and rolling "
                "an adapter back from disk is not built for training.parallelism fsdp: raise "
                "governor.snapshot_memory_gb (an adapter's snapshots are small) or use "
                "training.parallelism ddp.")
        ckpt, weights, own = self.start_checkpoint, None, False
        if ckpt is not None:
            weights = ckpt.path
        else:
            # every rank names rank 0's folder (wherever rank 0 runs: the realm is shared)
            pid, host = self._main_writer()
            weights, own = initial_weights_dir(self.spec.checkpoint_root, self.spec.job_id,
                                               pid, host), True
            # sharded: every rank takes part in gathering the weights whole
            whole = sharding.trainable_weights(self.model, self.group.main) \
                if self.sharded else None
            if self.group.main:
                save_trainable(self.model, weights, whole)
            self.group.barrier()
        groups = copy.deepcopy(self.optimizer.state_dict()["param_groups"])
        self.start_point = StartPoint(
            self.state.copy(), weights, {"state": {}, "param_groups": groups},
            ckpt if self.optimizer.state else None, copy.deepcopy(self.scheduler.state_dict()),
            torch.get_rng_state(),
            torch.cuda.get_rng_state() if self.device.type == "cuda" else None, own)

    def approved_on_disk(self) -> Checkpoint | None:
        """This job's newest committed checkpoint past its start (every committed checkpoint
        was approved); None when the last approved state on disk is the job's start."""
        start, me = self.start_point.state.global_step, (self.spec.job_id, False)
        mine = [c for c in complete_checkpoints(self.spec.checkpoint_root)
                if c.step > start and c.lineage() == me]
        return mine[-1] if mine else None

    def _main_writer(self) -> tuple[int, str]:
        """Rank 0's process id and host, agreed by every rank (they name the temporary folders
        the ranks share, so a dead writer's are recognised and cleaned on its host)."""
        pid, host = self.group.broadcast((os.getpid(), host_name()))
        return int(pid), str(host)

    def restore_from_disk(self) -> TrainState:
        """Load the last approved state on disk into the live model (trainable weights),
        optimizer, scheduler and RNG; return its counters. This job's checkpoint is restored as
        ``_resume`` does; the start as the job started (weights, moments carried or fresh,
        schedule, RNG). Every rank reads the same folder."""
        ckpt = self.approved_on_disk()
        if ckpt is None:
            return self._restore_start()
        load_trainable(self.model, ckpt.path)
        self._load_torch_state(ckpt.torch_state(), ckpt.path)
        self.log.info("governor.restored_from_disk", step=ckpt.step, path=str(ckpt.path))
        return TrainState.from_json(ckpt.state())

    def _restore_start(self) -> TrainState:
        start = self.start_point
        load_trainable(self.model, start.weights)
        self.optimizer.load_state_dict(copy.deepcopy(start.optimizer))
        if start.moments is not None:  # carried at the start: carried again, shards or whole
            saved = start.moments.torch_state()["optimizer"]
            with keep_hyperparameters(self.optimizer):
                self._load_optimizer(self._optimizer_state(saved, start.moments.path))
        self.scheduler.load_state_dict(copy.deepcopy(start.scheduler))
        self._set_rng(start.rng_cpu, start.rng_cuda)
        self.log.info("governor.restored_from_disk", step=start.state.global_step,
                      path=str(start.weights), start=True)
        return start.state.copy()

    def _drop_initial_weights(self) -> None:
        start = self.start_point
        if start is not None and start.own_weights and self.group.main:
            shutil.rmtree(start.weights, ignore_errors=True)

    # --- judging states -------------------------------------------------------------------

    def after_step(self, m: StepMetrics) -> None:
        """Step N's loss was measured on state N-1: judge that state (committing what was
        staged for it), then offer state N at snapshot and checkpoint points."""
        decision = self.guard.judge(m.loss, m.grad_norm, step=m.step)
        self._settle_staged(decision.approved)
        if decision.action is Action.FAIL:
            raise decision.error
        if decision.action is Action.ROLLBACK:
            self._rollback(decision)
            return
        if self.finished() or self.stop_agreed:
            return  # judged by the final pass instead
        job_step = self.state.job_step
        save = job_step % self.cfg.checkpoint.save_steps == 0
        if save or job_step % self.cfg.governor.snapshot_steps == 0:
            self.guard.propose(self.state)
        if save:
            self.staged = self._stage(finished=False)

    def _settle_staged(self, approved: bool) -> None:
        staged, self.staged = self.staged, None
        if staged is None:
            return
        if not approved:
            self.log.info("checkpoint.not_approved", step=staged.step)
            staged.discard()
            return
        ckpt = staged.commit()
        apply_retention(self.spec.checkpoint_root, self.cfg.checkpoint.keep_last,
                        protect={ckpt.path}, job_id=self.spec.job_id)
        self.log.info("checkpoint.saved", step=ckpt.step, path=str(ckpt.path))

    def _rollback(self, decision: Decision) -> None:
        """The guard restored weights, optimizer and scheduler. Of the counters, the loss EWMA
        and the campaign's trained tokens go back with the weights (the discarded steps taught
        nothing); the step counter and the data position move on."""
        restored = self.guard.rollback(decision, self.state)
        self.state.loss_ewma = self.stats.loss_ewma = restored.loss_ewma
        self.state.campaign_tokens = restored.campaign_tokens

    def _judge_final(self) -> Decision:
        """One no-grad pass on a fixed batch judges the live weights; when they fail, roll back
        to the last approved state (or FAIL when that is where the job started)."""
        decision = self.guard.judge(self._judge_loss(), final=True, step=self.global_step)
        if decision.action is Action.ROLLBACK:
            self._rollback(decision)
        return decision

    @torch.no_grad()
    def _judge_loss(self) -> float:
        """Loss of the live weights on the first training rows: the same distribution as the
        losses the governor's history holds (a validation batch of an overfitting job sits
        legitimately far above them)."""
        rows = self.rows[:self.cfg.training.micro_batch_size]
        batch = collate(rows, self.store, self.tokenizer.pad_token_id).to(self.device)
        self.model.eval()
        try:
            loss = float(self._loss_sum(batch))
        finally:
            self.model.train()
        return loss / max(1, batch.target_tokens)

    def stop(self) -> None:
        """A stop was agreed: judge the live state and leave a resume point holding the last
        approved state (none when nothing past the job's start was approved)."""
        decision = self._judge_final()
        ckpt = None
        staged = self._stage(finished=False) if decision.action is not Action.FAIL else None
        if staged is not None:
            ckpt = staged.commit()
            self.log.info("checkpoint.saved", step=ckpt.step, path=str(ckpt.path))
        raise StopRequested(ckpt, self.global_step)

    # --- checkpoints ----------------------------------------------------------------------

    def _stage(self, *, finished: bool) -> Staged | None:
        """Rank 0 writes the live state into a staged checkpoint; other ranks return None. A
        sharded model's weights and optimizer state are gathered to rank 0 first (every rank
        takes part)."""
        weights = shards = None
        if self.sharded and self.cfg.adapter.method != "none":
            # only the adapter is saved: its weights gathered, named as the peft model's
            weights = sharding.trainable_weights(self.model, self.group.main)
        elif self.sharded:
            weights = sharding.full_weights(self.loss_module)
        if self.sharded:
            shards = shards_dir(self.spec.checkpoint_root, self.global_step, *self.shards_writer)
            sharding.save_optimizer_shards(self.loss_module, self.optimizer, shards)
        if not self.group.main:
            return None
        last = self.stats.last
        state = {**self.state.to_json(), "job_id": self.spec.job_id, "job_finished": finished,
                 "last_loss": last.loss if last else None, "world_size": self.group.world,
                 "dataset_sha256": self.spec.dataset_sha256, "config_hash": self.spec.config_hash,
                 "tokens_seen": self.stats.tokens}
        torch_state = {"optimizer": None if self.sharded else self.optimizer.state_dict(),
                       "scheduler": self.scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
                       "rng_cuda": torch.cuda.get_rng_state() if self.device.type == "cuda"
                       else None}
        return stage_checkpoint(self.spec.checkpoint_root, self.global_step, self.model,
                                self.tokenizer, state=state, torch_state=torch_state,
                                locked=self.spec.locked, config=self.spec.config_record,
                                weights=weights,
                                move_in={sharding.SHARDS: shards} if shards else None)

    def _discard_own_checkpoints(self) -> None:
        if self.group.main:
            remove_unfinished_of(self.spec.checkpoint_root, self.spec.job_id,
                                 "checkpoint.failed_job_removed")

    # --- the end --------------------------------------------------------------------------

    def _finalize(self) -> TrainResult:
        before = self.finished_before
        if before is None:
            decision = self._judge_final()
            if decision.action is Action.FAIL:
                raise decision.error
        counts = self.guard.counts()
        if self.group.active:
            self.data_stats["ranks"] = self._check_replicas(counts)
        ckpt = before or self._write_final()
        val = self._evaluate_and_sample() if self.group.main or self.sharded else None
        last = self.stats.last
        self.status.write({"state": "finished", "job_id": self.spec.job_id,
                           "step": self.global_step, "eval": self.last_eval()}, force=True)
        self.data_stats["loss_curve"] = downsample(self.stats.history, 60)
        self.data_stats.update(self._record_extras(last))
        if before is not None:
            self.data_stats["already_trained"] = True
        return TrainResult(self.state.job_start_step, self.global_step,
                           last.loss if last else self.last_loss, val,
                           self.stats.tokens_per_sec_avg, ckpt, self.data_stats,
                           self.resumed_from, counts,
                           trained_tokens_per_sec_avg=self.stats.trained_tokens_per_sec_avg)

    def _record_extras(self, last: StepMetrics | None) -> dict:
        """What the job record keeps about precision, schedule and evaluations."""
        extras = {"precision": self.precision, "param_dtype": self.cfg.training.param_dtype,
                  "optimizer_state_dtype": _state_dtype(self.optimizer),
                  "adapter": {"method": self.cfg.adapter.method, **adapter_summary(self.model)},
                  "schedule": {**self.schedule.describe(), "lr_start": self.lr_start,
                               "lr_end": last.lr if last else None,
                               "campaign_tokens_seen": self.state.campaign_tokens}}
        extras["memory"] = peak_memory(self.device, self.setup_cuda_peak)
        if self.evals:
            extras["eval"] = {"every_steps": self.cfg.eval.every_steps,
                              "losses": [list(e) for e in thin(self.evals, MAX_EVAL_POINTS)],
                              "last": self.last_eval()}
        return extras

    def _write_final(self) -> Checkpoint | None:
        """The approved final state becomes the campaign's head; then retention over all."""
        staged = self._stage(finished=True)
        if staged is None:
            return None
        ckpt = staged.commit()
        apply_retention(self.spec.checkpoint_root, self.cfg.checkpoint.keep_last,
                        protect={ckpt.path})
        self.log.info("checkpoint.saved", step=ckpt.step, path=str(ckpt.path), final=True)
        return ckpt

    def _check_replicas(self, counts: dict) -> dict:
        """All ranks must end with the same weights and the same rollbacks; otherwise nothing
        is saved (a replica that missed a rollback would be silently different)."""
        digest = [0.0, 0.0] if self.sharded else weights_digest(self.model)  # shards differ
        rows = self.group.gather(digest + [counts.get("rollbacks", 0)])
        rollbacks = [int(r[2]) for r in rows]
        if any(r != rows[0] for r in rows):
            raise RanksDiverged(f"replicas differ at step {self.global_step}: weight digests "
                                f"{[r[:2] for r in rows]}, rollbacks per rank {rollbacks}")
        return {"world": self.group.world, "rollbacks_per_rank": rollbacks,
                "parallelism": self.parallelism, "nodes": self.group.nodes,
                "hosts": self.group.gather_object(host_name()),
                "weights_agree": True if not self.sharded else None}

    # --- evaluation -----------------------------------------------------------------------

    def maybe_evaluate(self) -> None:
        """Every ``eval.every_steps`` job steps, rank 0 measures the validation loss (no
        collectives: the other ranks go on and wait in the next step's all-reduce). The last
        step is left to the final evaluation, which judges the weights the job keeps."""
        every = self.cfg.eval.every_steps
        if (not every or not (self.group.main or self.sharded) or not self.val_rows
                or self.finished() or self.state.job_step % every):
            return  # sharded: every rank runs the model (it gathers weights layer by layer)
        self._evaluate_and_sample()

    def _evaluate_and_sample(self) -> float | None:
        """Validation loss of the live weights (None without a validation split), recorded
        and logged, then the sample prompts' greedy continuations."""
        start = time.perf_counter()
        loss = self.evaluate(self.val_rows) if self.val_rows else None
        if loss is not None:
            self.evals.append((self.global_step, round(loss, 6)))
            if self.board is not None:
                self.board.scalars(self.global_step, {"eval/loss": loss})
            self.log.info("eval.loss", step=self.global_step, job_step=self.state.job_step,
                          eval_loss=round(loss, 6), seconds=round(time.perf_counter() - start, 3))
        self._samples()
        return loss

    def last_eval(self) -> dict | None:
        if not self.evals:
            return None
        step, loss = self.evals[-1]
        return {"step": step, "eval_loss": loss}

    @torch.no_grad()
    def _samples(self) -> None:
        """Greedy continuations of ``eval.sample_prompts``, one prompt at a time (no padding:
        the span-wise attention then falls back to plain causal sdpa, which generation uses)."""
        if not self.sample_prompts:
            return
        tok, new = self.tokenizer, self.cfg.eval.sample_max_new_tokens
        self.model.eval()
        # fsdp: generate() calls the LM outside the sharded root; every rank decodes the same
        # prompts greedily in step (the layers' gathers are collectives)
        with self._whole_root():
            self._sample_each(tok, new)

    def _whole_root(self):
        return sharding.gathered(self.loss_module) if self.sharded else contextlib.nullcontext()

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The live model's logits for ``ids`` (sharded or not; every rank of a sharded job
        calls it), on the CPU in fp32."""
        self.model.eval()
        try:
            with self._whole_root():
                return self.lm(input_ids=ids.to(self.device)).logits.float().cpu()
        finally:
            self.model.train()

    def _sample_each(self, tok, new: int) -> None:
        try:
            for prompt in self.sample_prompts:
                ids = tok(prompt, add_special_tokens=False)["input_ids"]
                if not ids:
                    continue
                ids = torch.tensor([ids], device=self.device)
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    # stops at the model's generation_config stop tokens (EOS, end of turn)
                    # fsdp: a rank whose decode ends first (a stop token on a near tie that
                    # another device breaks the other way) keeps running forwards until every
                    # rank is done, or its next collective would meet another's layer gather
                    out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                              max_new_tokens=new, do_sample=False,
                                              pad_token_id=tok.pad_token_id,
                                              synced_gpus=self.sharded)
                text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                self.log.info("eval.sample", step=self.global_step, prompt=prompt,
                              completion=text)
        finally:
            self.model.train()

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        """The summed token loss of a batch outside a training step: through the sharded root
        (its hooks gather the weights) or, unsharded, straight through the model (not DDP's
        forward, which would arm a gradient all-reduce)."""
        if self.sharded:
            return self.loss_module(batch)
        return token_loss_sum(self.lm, batch, self.autocast_dtype)

    @torch.no_grad()
    def evaluate(self, rows: list[list[int]]) -> float:
        self.model.eval()
        total, count = 0.0, 0
        B = self.cfg.training.micro_batch_size
        for i in range(0, len(rows), B):
            batch = collate(rows[i:i + B], self.store, self.tokenizer.pad_token_id).to(self.device)
            total += float(self._loss_sum(batch))
            count += batch.target_tokens
        self.model.train()
        return total / max(1, count)


MAX_EVAL_POINTS = 200
"""Evaluations the job record keeps (evenly thinned, the last one always kept)."""
LIVE_CURVE_POINTS = 300
"""Points of the running job's loss curve in its progress file (evenly thinned)."""
LIVE_ROLLBACKS = 50
"""The newest rollbacks the progress file lists."""


def _fsdp_problem(cfg) -> str | None:
    """Why ``training.parallelism: fsdp`` cannot run this job (None: it can)."""
    if not sharding.available():
        return (f"training.parallelism fsdp needs FSDP2 (torch >= 2.6); this is torch "
                f"{torch.__version__}. Use training.parallelism ddp.")
    if cfg.adapter.method == "qlora":
        return ("training.parallelism fsdp does not shard a 4-bit base (adapter.method qlora): "
                "bitsandbytes' packed weights are not DTensors. Use training.parallelism ddp, or "
                "adapter.method lora.")
    return None


def thin(points: list, limit: int) -> list:
    """At most ``limit`` evenly spaced items, first and last included."""
    if len(points) <= limit:
        return list(points)
    last = len(points) - 1
    return [points[round(i * last / (limit - 1))] for i in range(limit)]


def downsample(values: list[float], points: int) -> list[float]:
    """At most ``points`` means of consecutive chunks (the job record keeps a short curve)."""
    if len(values) <= points:
        return [round(v, 4) for v in values]
    size = len(values) / points
    return [round(sum(chunk) / len(chunk), 4) for chunk in
            (values[int(i * size):int((i + 1) * size)] for i in range(points)) if chunk]


def token_loss_sum(model, batch: Batch, autocast_dtype) -> torch.Tensor:
    """Sum of next-token cross-entropy over target tokens (fp32 logits math).

    The language-model head runs only on positions that have a target: prompt, padding and
    boundary positions need hidden states but no logits.
    """
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE
    with torch.autocast(batch.input_ids.device.type, dtype=autocast_dtype,
                        enabled=autocast_dtype is not None):
        hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                             **_attention_kwargs(model, batch)).last_hidden_state
        logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")


def _attention_kwargs(model, batch: Batch) -> dict:
    """Span-wise attention where the model uses it, else the 4D block-diagonal mask."""
    if model.config._attn_implementation == ATTENTION:
        return {"realm_segments": batch.segments}
    return {"attention_mask": batch.attention_mask}


class EpochRunner:
    """One epoch from the trainer's data position: the loop reads top to bottom."""

    def __init__(self, trainer: Trainer):
        self.t = trainer

    def run(self) -> None:
        for groups in self._step_groups():
            metrics = self.train_step(groups)
            self.t.maybe_evaluate()  # outside the step's timing
            self._update_metrics(metrics)
            self.t.after_step(metrics)
            self.t.heartbeat(f"step:{self.t.global_step}")
            if self.t.stop_agreed:
                self.t.stop()  # raises StopRequested
            if self.t.finished():
                return
        self._finalize_epoch()

    # --- helpers, in loop order -----------------------------------------------------------

    def _step_groups(self):
        """Global microbatches (lists of row indices, ``micro_batch_size`` x world rows each)
        grouped per optimizer step, from the saved position."""
        t = self.t
        A = t.cfg.training.grad_accum
        size = t.cfg.training.micro_batch_size * t.group.world
        order = self._epoch_order(t.state.epoch)
        micro = [order[i:i + size] for i in range(t.state.rows_done, len(order), size)]
        for start in range(0, len(micro), A):
            yield micro[start:start + A]

    def _local(self, global_micro: list[int]) -> tuple[list[list[int]], float]:
        """This rank's rows of one global microbatch, and its weight. A rank left without rows
        (the epoch's last, short microbatch) runs the first row with weight 0: DDP needs every
        rank in every backward pass."""
        t = self.t
        B = t.cfg.training.micro_batch_size
        mine = global_micro[t.group.rank * B:(t.group.rank + 1) * B]
        if not mine:
            return [t.rows[global_micro[0]]], 0.0
        return [t.rows[r] for r in mine], 1.0

    def _epoch_order(self, epoch: int) -> list[int]:
        n = len(self.t.rows)
        if not self.t.cfg.data.shuffle:
            return list(range(n))
        gen = torch.Generator().manual_seed(self.t.cfg.training.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=gen).tolist()

    def train_step(self, groups: list[list[int]]) -> StepMetrics:
        t, group = self.t, self.t.group
        t0 = time.perf_counter()
        local = [self._local(g) for g in groups]
        batches, wait_ms = self._prepare_microbatches([rows for rows, _ in local])
        weights = [w for _, w in local]
        local_tokens = sum(int(b.target_tokens * w) for b, w in zip(batches, weights))
        local_inputs = sum(int((b.example_ids >= 0).sum()) * w for b, w in zip(batches, weights))
        step_tokens, step_inputs = (int(x) for x in group.sum([local_tokens, local_inputs]))
        loss_sum, h2d_ms = 0.0, 0.0
        for i, (batch, weight) in enumerate(zip(batches, weights)):
            device_batch, ms = self._to_device(batch)
            h2d_ms += ms
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last or not group.active else \
                    sharding.no_gradient_sync(t.loss_module) if t.sharded else \
                    t.loss_module.no_sync():  # one gradient all-reduce per step
                loss_sum += self._forward_backward(device_batch, step_tokens, weight)
        grad_norm, lr = self._optimizer_step()
        t.state.rows_done += sum(len(g) for g in groups)
        t.state.micro_done += len(groups)
        t.state.global_step += 1
        t.state.campaign_tokens += step_tokens
        t.scheduler.step()  # after the counters: the campaign schedule reads them
        if t.loss_hook is not None:  # on this rank's loss, before the ranks combine theirs
            loss_sum = t.loss_hook(t.global_step, loss_sum / max(1, local_tokens)) * local_tokens
        stop = t.stop_requested()
        loss_sum, stops = group.sum([loss_sum, 1.0 if stop else 0.0])
        t.stop_agreed = stops > 0
        latency = (time.perf_counter() - t0) * 1000
        loss = loss_sum / max(1, step_tokens)
        seconds = latency / 1000
        return StepMetrics(t.global_step, loss, math.nan, grad_norm, lr, tokens=step_tokens,
                           processed_tokens=step_inputs, tokens_per_sec=step_inputs / seconds,
                           trained_tokens_per_sec=step_tokens / seconds, input_wait_ms=wait_ms,
                           h2d_copy_ms=h2d_ms, step_latency_ms=latency)

    def _prepare_microbatches(self, groups: list[list[list[int]]]) -> tuple[list[Batch], float]:
        start = time.perf_counter()
        pin = self.t.device.type == "cuda"
        batches = [collate(rows, self.t.store, self.t.tokenizer.pad_token_id) for rows in groups]
        if pin:
            batches = [b.pin_memory() for b in batches]
        return batches, (time.perf_counter() - start) * 1000

    def _to_device(self, batch: Batch) -> tuple[Batch, float]:
        if self.t.device.type == "cpu":
            return batch, 0.0
        start = time.perf_counter()
        moved = batch.to(self.t.device, non_blocking=True)  # pinned source: async copy
        return moved, (time.perf_counter() - start) * 1000

    def _forward_backward(self, batch: Batch, step_tokens: int, weight: float = 1.0) -> float:
        loss_sum = self.t.loss_module(batch)
        # DDP averages gradients over the ranks: x world makes the result the global token mean
        scale = weight * self.t.group.world / max(1, step_tokens)
        (loss_sum * scale).backward()
        return float(loss_sum.detach()) * weight

    def _optimizer_step(self) -> tuple[float, float]:
        t = self.t
        max_norm = t.cfg.training.max_grad_norm
        params = [p for p in t.model.parameters() if p.grad is not None]
        norm = sharding.full(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0
                                                            else math.inf))
        lr = t.optimizer.param_groups[0]["lr"]
        t.guard.before_optimizer_step()  # e.g. a snapshot copy still reading the weights
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        return float(norm), lr

    def _update_metrics(self, m: StepMetrics) -> None:
        t = self.t
        if math.isfinite(m.loss):
            m.loss_ewma = t.state.loss_ewma = t.stats.update_ewma(m.loss)
            t.stats.history.append(m.loss)
            t.curve.append((m.step, round(m.loss, 6)))
        if t.board is not None:
            t.board.step(m)
        t.stats.record(m)
        job_step = t.state.job_step
        eta = (t.total_steps - job_step) * t.stats.seconds / max(1, t.stats.steps)
        t.log.debug("train.step", step=m.step, **{k: getattr(m, k) for k in STEP_METRICS})
        last_eval = t.last_eval()
        if job_step % t.cfg.logging.log_every_steps == 0 or job_step == t.total_steps:
            line = progress_line(m, job_step, t.total_steps, eta,
                                 last_eval["eval_loss"] if last_eval else None)
            t.log.info("train.progress", line=line)
        t.status.write(lambda: status_payload(t.spec.job_id, m, job_step=job_step,
                                              total_steps=t.total_steps, stats=t.stats,
                                              evaluation=last_eval,
                                              curve=thin(t.curve, LIVE_CURVE_POINTS),
                                              rollbacks=t.rollbacks[-LIVE_ROLLBACKS:],
                                              world=t.group.world, nodes=t.group.nodes,
                                              parallelism=t.parallelism),
                       force=job_step == t.total_steps)  # the bar and status see the last step

    def _finalize_epoch(self) -> None:
        self.t.state.new_epoch()
        self.t.log.info("epoch.done", epoch=self.t.state.epoch, step=self.t.global_step)
