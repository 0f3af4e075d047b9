"""TrainState: where a job is. The one owner of the counters that checkpoint, resume and the
governor's snapshots all read and write.

- ``global_step`` counts every optimizer step the campaign has taken, including steps a rollback
  later discarded, so it never goes back: a checkpoint folder name is never reused.
- ``job_start_step`` is the step of the checkpoint the job started from.
- ``epoch``/``rows_done`` are the data position: rows of this epoch's order consumed
  (independent of batch and world size, so a resume is exact on any number of devices).
- ``micro_done`` counts microbatches consumed by this job (the governor's skipped window).
- ``loss_ewma`` is the smoothed training loss (shown in progress lines, restored on rollback).
- ``campaign_tokens`` counts the loss-bearing tokens the campaign's weights were trained on,
  across jobs (the campaign schedule's clock for ``training.campaign_tokens``). Unlike
  ``global_step`` it rolls back with the weights: tokens of discarded steps were never learned.
  Checkpoints written before it existed read as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# keys of trainer_state.json (checkpoint schema 1); "step" is the folder's step
STEP, JOB_START_STEP, EPOCH, ROWS_DONE, MICRO_DONE, LOSS_EWMA, CAMPAIGN_TOKENS = (
    "step", "job_start_step", "epoch", "rows_done", "micro_done", "loss_ewma",
    "campaign_tokens_seen")


@dataclass
class TrainState:
    global_step: int = 0
    job_start_step: int = 0
    epoch: int = 0
    rows_done: int = 0
    micro_done: int = 0
    loss_ewma: float | None = None
    campaign_tokens: int = 0

    @property
    def job_step(self) -> int:
        """Optimizer steps this job has taken (rolled-back ones included)."""
        return self.global_step - self.job_start_step

    def copy(self) -> "TrainState":
        return replace(self)

    def to_json(self) -> dict[str, Any]:
        return {STEP: self.global_step, JOB_START_STEP: self.job_start_step, EPOCH: self.epoch,
                ROWS_DONE: self.rows_done, MICRO_DONE: self.micro_done,
                LOSS_EWMA: self.loss_ewma, CAMPAIGN_TOKENS: self.campaign_tokens}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainState":
        return cls(int(data[STEP]), int(data[JOB_START_STEP]), int(data[EPOCH]),
                   int(data[ROWS_DONE]), int(data.get(MICRO_DONE, 0)), data.get(LOSS_EWMA),
                   campaign_tokens_of(data))

    def new_epoch(self) -> None:
        self.epoch, self.rows_done = self.epoch + 1, 0


def campaign_tokens_of(data: dict[str, Any]) -> int:
    """The campaign's trained tokens recorded in a trainer_state.json (0 when it predates the
    counter)."""
    return int(data.get(CAMPAIGN_TOKENS) or 0)
