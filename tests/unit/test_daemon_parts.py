"""Daemon pieces without processes: the terminal progress view and the disk floor."""

from __future__ import annotations

import io
import json

from core.job import Job
from core.training_daemon import Daemon, ProgressView
from trainer.config.schema import DaemonConfig


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_shows_step_total_and_loss(tmp_path):
    status = tmp_path / "training_status.json"
    status.write_text(json.dumps({"job_id": "j1", "job_step": 12, "total_steps": 40,
                                  "metrics": {"loss": 3.2109, "tokens_per_sec": 7012.0}}))
    out = Terminal()
    view = ProgressView(status, stream=out)
    view.update(Job(id="j1", dataset_path="queue/processing/a.jsonl", dataset_name="a.jsonl"))
    view.close()
    text = out.getvalue()
    assert "a.jsonl" in text and "12/40" in text and "loss=3.2109" in text


def test_no_progress_bar_when_not_a_terminal(tmp_path):
    out = io.StringIO()
    view = ProgressView(tmp_path / "missing.json", stream=out)
    view.update(Job(id="j1", dataset_path="x", dataset_name="a.jsonl"))
    assert out.getvalue() == "" and view.bar is None


def test_disk_floor_grows_with_the_checkpoint_size(realm):
    ckpt = realm.campaigns / "tiny-qwen3" / "c1" / "checkpoints" / "step-5"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"\0" * (3 << 20))
    (ckpt / "COMPLETE").write_text("ok")
    daemon = Daemon(realm, DaemonConfig(min_free_disk_gb=0.001), keep_last=3)
    floor, why = daemon.disk_floor_gb()
    assert abs(floor - 4 * 3 / 1024) < 1e-4 and "keep_last + 1" in why
