"""Per-step metrics, the throttled status file, and the compact progress line.

Metric names (golden-tested, ``tests/golden/step_metrics.json``): loss, loss_ewma, grad_norm,
lr, tokens_per_sec, trained_tokens_per_sec, input_wait_ms, h2d_copy_ms, step_latency_ms.

Two token counts, because packing and masking make them differ by several times on chat data:
processed tokens are every non-pad input token that went through the model (``tokens_per_sec``:
what the hardware did, and what the plan's dataset-size estimates divide by); trained tokens are
the loss-bearing ones (``trained_tokens_per_sec``: what the model learned from). Step latency
covers the step alone: evaluations and checkpoint writes happen outside it.

``status/jobs/<job>.progress.json`` is rewritten atomically at most every
``logging.status_every_seconds``; it carries the latest evaluation when there is one, the job's
loss curve so far and the governor's rollbacks (what ``realm serve`` draws live).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import structlog

from core.fsutil import write_json_atomic
from core.job import utc_now

STEP_METRICS = ("loss", "loss_ewma", "grad_norm", "lr", "tokens_per_sec",
                "trained_tokens_per_sec", "input_wait_ms", "h2d_copy_ms", "step_latency_ms")


@dataclass
class StepMetrics:
    step: int
    loss: float
    loss_ewma: float
    grad_norm: float
    lr: float
    tokens: int
    """Trained (loss-bearing) tokens in this optimizer step, over all ranks."""
    processed_tokens: int
    """Non-pad input tokens the model ran on in this optimizer step, over all ranks."""
    tokens_per_sec: float
    """Processed tokens per second of step latency."""
    trained_tokens_per_sec: float
    input_wait_ms: float
    h2d_copy_ms: float
    step_latency_ms: float


@dataclass
class RunningStats:
    """Job-level aggregates the job record keeps."""

    ewma_alpha: float = 0.1
    loss_ewma: float | None = None
    tokens: int = 0
    """Trained (loss-bearing) tokens."""
    processed_tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    last: StepMetrics | None = None
    history: list[float] = field(default_factory=list)

    def update_ewma(self, loss: float) -> float:
        if self.loss_ewma is None or not math.isfinite(self.loss_ewma):
            self.loss_ewma = loss
        else:
            self.loss_ewma = self.ewma_alpha * loss + (1 - self.ewma_alpha) * self.loss_ewma
        return self.loss_ewma

    def record(self, m: StepMetrics) -> None:
        self.tokens += m.tokens
        self.processed_tokens += m.processed_tokens
        self.seconds += m.step_latency_ms / 1000
        self.steps += 1
        self.last = m

    @property
    def tokens_per_sec_avg(self) -> float:
        """Processed tokens per second of step time."""
        return self.processed_tokens / self.seconds if self.seconds else 0.0

    @property
    def trained_tokens_per_sec_avg(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class StatusWriter:
    """Atomic, throttled ``status/jobs/<job>.progress.json``."""

    def __init__(self, path: Path | None, every_seconds: float, clock=time.monotonic):
        self.path, self.every, self.clock = path, every_seconds, clock
        self._last = -math.inf

    def write(self, payload: dict[str, Any] | Callable[[], dict[str, Any]], *,
              force: bool = False) -> bool:
        """``payload`` may be a function: it is called only when the file is rewritten."""
        if self.path is None:
            return False
        now = self.clock()
        if not force and now - self._last < self.every:
            return False
        self._last = now
        if callable(payload):
            payload = payload()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"schema": 1, "updated_at": utc_now(), **payload},
                          fsync=False)
        return True


def status_payload(job_id: str, m: StepMetrics, *, job_step: int, total_steps: int,
                   stats: RunningStats, state: str = "training",
                   evaluation: dict[str, Any] | None = None,
                   curve: list | None = None, rollbacks: list | None = None,
                   world: int = 1, parallelism: str = "single", nodes: int = 1
                   ) -> dict[str, Any]:
    """``evaluation``: the latest ``{"step", "eval_loss"}``, when the job evaluated; ``curve``:
    ``[global step, loss]`` pairs of the job so far; ``rollbacks``: the governor's rollback
    events of the job (reason, step, loss, threshold, learning rate after)."""
    remaining = max(0, total_steps - job_step)
    sec_per_step = stats.seconds / stats.steps if stats.steps else 0.0
    payload = {"state": state, "job_id": job_id, "step": m.step, "job_step": job_step,
               "total_steps": total_steps, "eta_seconds": round(remaining * sec_per_step, 1),
               "world_size": world, "parallelism": parallelism, "nodes": nodes,
               "metrics": {k: v for k, v in asdict(m).items() if k != "step"}}
    if evaluation is not None:
        payload["eval"] = evaluation
    if curve is not None:
        payload["curve"] = [list(p) for p in curve]
    if rollbacks is not None:
        payload["rollbacks"] = rollbacks
    return payload


def progress_line(m: StepMetrics, job_step: int, total_steps: int, eta_s: float,
                  eval_loss: float | None = None) -> str:
    """nanochat style: one compact line every N steps (tok/s: processed, of which trained)."""
    val = f" | val {eval_loss:.4f}" if eval_loss is not None else ""
    return (f"step {job_step}/{total_steps} | loss {m.loss:.4f} (ewma {m.loss_ewma:.4f}){val} | "
            f"lr {m.lr:.2e} | grad {m.grad_norm:.3f} | {m.step_latency_ms:.0f} ms | "
            f"{m.tokens_per_sec:,.0f} tok/s ({m.trained_tokens_per_sec:,.0f} trained) | "
            f"eta {eta_s:.0f}s")


def get_logger(**bound):
    return structlog.get_logger("realm.trainer").bind(**bound)
