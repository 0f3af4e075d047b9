"""TensorBoard event files: what a job writes, read back with tensorboard's own reader; a purge
marker hides what an earlier attempt wrote past the start; a writer that cannot keep up or
cannot write never holds a step; ``logging.report_to: none`` writes nothing."""

from __future__ import annotations

import threading
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.trainer.test_training import claim, make_realm, record
from trainer.run_job import run
from trainer.telemetry import TensorBoardLog


def scalars(folder: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def test_a_later_writer_purges_what_an_earlier_attempt_wrote_past_its_start(tmp_path):
    first = TensorBoardLog(tmp_path, purge_step=1)
    for step in range(1, 11):
        first.scalars(step, {"train/loss": 10.0 - step, "eval/loss": None})
    first.close()
    second = TensorBoardLog(tmp_path, purge_step=6)  # resumed from step 5
    for step in range(6, 9):
        second.scalars(step, {"train/loss": 100.0 + step})
    second.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert scalars(tmp_path, "train/loss") == {**{s: 10.0 - s for s in range(1, 6)},
                                               6: 106.0, 7: 107.0, 8: 108.0}
    assert scalars(tmp_path, "eval/loss") == {}, "None values are not points"


def test_a_writer_that_cannot_keep_up_drops_points_instead_of_waiting(tmp_path, monkeypatch):
    """The writer thread is held (a stalled disk): a step's put never waits, the overflow is
    counted, and what was queued is written once the writer moves again."""
    from torch.utils import tensorboard

    gate = threading.Event()
    real = tensorboard.SummaryWriter

    def stalled(*args, **kwargs):
        gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(tensorboard, "SummaryWriter", stalled)
    board = TensorBoardLog(tmp_path, purge_step=1, max_pending=5)
    for step in range(1, 101):
        board.scalars(step, {"train/loss": float(step)})
    assert board.dropped == 95
    gate.set()
    board.close()
    assert scalars(tmp_path, "train/loss") == {s: float(s) for s in range(1, 6)}


def test_a_writer_that_fails_is_reported_once_and_takes_nothing_more(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the event folder should go")
    board = TensorBoardLog(blocker / "campaign", purge_step=1)
    board._thread.join(30)
    assert board.failed and "not-a-folder" in board.failed
    board.scalars(1, {"train/loss": 1.0})
    board.close()
    assert board._queue.empty()


def test_a_job_writes_its_scalars_on_the_campaign_step_axis_and_none_writes_nothing(tmp_path):
    paths = make_realm(tmp_path / "r")
    sidecar = claim(paths)
    assert run(paths, sidecar) == 0
    folder = paths.logs / "tensorboard" / "tiny-qwen3" / "c1"
    final = record(paths, sidecar)["final_step"]
    loss = scalars(folder, "train/loss")
    assert sorted(loss) == list(range(1, final + 1))
    lr = scalars(folder, "train/lr")
    assert lr[1] < lr[3], "warm-up is visible"
    assert all(v > 0 for v in scalars(folder, "train/tokens_per_sec").values())

    quiet = make_realm(tmp_path / "q", {"training": {"micro_batch_size": 4, "max_steps": 3},
                                        "data": {"max_length": 128},
                                        "logging": {"report_to": "none"}})
    assert run(quiet, claim(quiet)) == 0
    assert not (quiet.logs / "tensorboard").exists()
