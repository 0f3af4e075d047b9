"""TensorBoard event files for a campaign, written beside training without ever holding a step.

One folder per campaign, ``logs/tensorboard/<hero>/<campaign>/``, stepped by the campaign's
global step, so every job of a campaign (one event file each) continues the same curves:
``train/loss``, ``train/loss_ewma``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_sec``,
``train/trained_tokens_per_sec``, ``eval/loss``, ``governor/rollbacks`` (the job's rollback count
at the step it happened) and ``governor/lr_after_rollback``.

A job that starts from global step S writes a purge marker at S + 1: TensorBoard then drops what
an earlier attempt wrote past S (a crashed attempt resumed from its checkpoint, a cancelled job
whose checkpoints were removed), so a curve never shows steps the lineage does not hold.

A thread owns the writer (and imports tensorboard). A step only puts its numbers on a bounded
queue and never waits: when the queue is full (a stalled disk) points are dropped and counted,
and a writer that fails (tensorboard missing, disk full) is reported once and training goes on.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import structlog

log = structlog.get_logger("realm.tensorboard")

MAX_PENDING = 10_000
"""Points queued for the writer before new ones are dropped (a few MB)."""
CLOSE_SECONDS = 10.0
"""How long the end of a job waits for the writer to drain."""
STEP_SCALARS = {"loss": "train/loss", "loss_ewma": "train/loss_ewma", "lr": "train/lr",
                "grad_norm": "train/grad_norm", "tokens_per_sec": "train/tokens_per_sec",
                "trained_tokens_per_sec": "train/trained_tokens_per_sec"}


class TensorBoardLog:
    def __init__(self, logdir: Path, purge_step: int, max_pending: int = MAX_PENDING):
        self.logdir, self.purge_step = logdir, purge_step
        self.dropped = 0
        self.failed: str | None = None
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="tensorboard", daemon=True)
        self._thread.start()

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """Queue ``{tag: value}`` at ``step`` (None values are skipped); never blocks."""
        if self.failed is not None:
            return
        try:
            self._queue.put_nowait((step, values))
        except queue.Full:
            self.dropped += 1

    def step(self, metrics) -> None:
        """A ``StepMetrics``' scalars at its global step."""
        self.scalars(metrics.step, {tag: getattr(metrics, name)
                                    for name, tag in STEP_SCALARS.items()})

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        if not self._thread.is_alive():
            return  # failed, and said so
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self.dropped or self._thread.is_alive():
            log.warning("tensorboard.incomplete", dropped=self.dropped,
                        still_writing=self._thread.is_alive(), logdir=str(self.logdir))

    def _run(self) -> None:
        writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.logdir.mkdir(parents=True, exist_ok=True)
            writer = SummaryWriter(str(self.logdir), purge_step=self.purge_step, flush_secs=5)
            while (item := self._queue.get()) is not None:
                step, values = item
                for tag, value in values.items():
                    if value is not None:
                        writer.add_scalar(tag, value, step)
        except Exception as exc:  # missing package, full disk: the job trains on without it
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("tensorboard.failed", error=self.failed, logdir=str(self.logdir),
                        fix="pip install tensorboard, free disk space, or set "
                            "logging.report_to none")
        finally:
            if writer is not None:
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 - already reported or nothing left to save
                    pass
