"""Per-step metrics, the throttled status file, and the compact progress line.

Metric names (golden-tested): loss, loss_ewma, grad_norm, lr, tokens_per_sec (useful = trained
target tokens), input_wait_ms, h2d_copy_ms, step_latency_ms. ``status/jobs/<job>.progress.json`` is
rewritten atomically at most every ``logging.status_every_seconds``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from core.fsutil import write_json_atomic
from core.job import utc_now

STEP_METRICS = ("loss", "loss_ewma", "grad_norm", "lr", "tokens_per_sec", "input_wait_ms",
                "h2d_copy_ms", "step_latency_ms")


@dataclass
class StepMetrics:
    step: int
    loss: float
    loss_ewma: float
    grad_norm: float
    lr: float
    tokens: int
    """Useful (loss-bearing) tokens in this optimizer step."""
    tokens_per_sec: float
    input_wait_ms: float
    h2d_copy_ms: float
    step_latency_ms: float


@dataclass
class RunningStats:
    """Job-level aggregates the job record keeps."""

    ewma_alpha: float = 0.1
    loss_ewma: float | None = None
    tokens: int = 0
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
        self.seconds += m.step_latency_ms / 1000
        self.steps += 1
        self.last = m

    @property
    def tokens_per_sec_avg(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class StatusWriter:
    """Atomic, throttled ``status/jobs/<job>.progress.json``."""

    def __init__(self, path: Path | None, every_seconds: float, clock=time.monotonic):
        self.path, self.every, self.clock = path, every_seconds, clock
        self._last = -math.inf

    def write(self, payload: dict[str, Any], *, force: bool = False) -> bool:
        if self.path is None:
            return False
        now = self.clock()
        if not force and now - self._last < self.every:
            return False
        self._last = now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"schema": 1, "updated_at": utc_now(), **payload},
                          fsync=False)
        return True


def status_payload(job_id: str, m: StepMetrics, *, job_step: int, total_steps: int,
                   stats: RunningStats, state: str = "training") -> dict[str, Any]:
    remaining = max(0, total_steps - job_step)
    sec_per_step = stats.seconds / stats.steps if stats.steps else 0.0
    return {"state": state, "job_id": job_id, "step": m.step, "job_step": job_step,
            "total_steps": total_steps, "eta_seconds": round(remaining * sec_per_step, 1),
            "metrics": {k: v for k, v in asdict(m).items() if k != "step"}}


def progress_line(m: StepMetrics, job_step: int, total_steps: int, eta_s: float) -> str:
    """nanochat style: one compact line every N steps."""
    return (f"step {job_step}/{total_steps} | loss {m.loss:.4f} (ewma {m.loss_ewma:.4f}) | "
            f"lr {m.lr:.2e} | grad {m.grad_norm:.3f} | {m.step_latency_ms:.0f} ms | "
            f"{m.tokens_per_sec:,.0f} tok/s | eta {eta_s:.0f}s")


def get_logger(**bound):
    return structlog.get_logger("realm.trainer").bind(**bound)
