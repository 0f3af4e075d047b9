"""Daemon pieces without child processes: progress view, disk floor, leases, device sets."""

from __future__ import annotations

import io
import json

import psutil
import pytest

from daemon.lock import DeviceSet
from core.errors import UsageError
from core.job import Job
from daemon.training_daemon import Daemon, LeaseWatch, ProgressView
from config.schema import DaemonConfig


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_shows_step_total_and_loss(tmp_path):
    status = tmp_path / "training_status.json"
    status.write_text(json.dumps({"job_id": "j1", "job_step": 12, "total_steps": 40,
                                  "eta_seconds": 75.0,
                                  "metrics": {"loss": 3.2109, "tokens_per_sec": 7012.0,
                                              "step_latency_ms": 2500.0}}))
    out = Terminal()
    view = ProgressView(stream=out)
    view.update(Job(id="j1", dataset_path="queue/processing/a.jsonl", dataset_name="a.jsonl"),
                status)
    view.close()
    text = out.getvalue()
    assert "a.jsonl" in text and "12/40" in text and "0/40" not in text  # the first frame
    assert "eta 01:15, 2.50 s/step, loss 3.2109, 7,012 tok/s" in text  # the child's numbers
    assert "step/s" not in text and "it/s" not in text  # never tqdm's own rate


def test_no_progress_bar_when_not_a_terminal(tmp_path):
    out = io.StringIO()
    view = ProgressView(stream=out)
    view.update(Job(id="j1", dataset_path="x", dataset_name="a.jsonl"), tmp_path / "missing.json")
    assert out.getvalue() == "" and view.bar is None


def test_disk_floor_grows_with_the_checkpoint_size(realm):
    ckpt = realm.campaigns / "tiny-qwen3" / "c1" / "checkpoints" / "step-5"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"\0" * (3 << 20))
    (ckpt / "COMPLETE").write_text("ok")
    daemon = Daemon(realm, DaemonConfig(min_free_disk_gb=0.001), keep_last=3)
    floor, why = daemon.disk_floor_gb()
    assert abs(floor - 3 * 3 / 1024) < 1e-4 and "keep_last + 1 - 1 on disk" in why


def test_disk_floor_counts_checkpoints_already_on_disk_once(realm):
    """keep_last 1000 with 5 checkpoints written must not ask for 996 more at once... but with
    the checkpoints already there, never for less than one more."""
    for step in range(1, 6):
        ckpt = realm.campaigns / "tiny-qwen3" / "c1" / "checkpoints" / f"step-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"\0" * (1 << 20))
        (ckpt / "COMPLETE").write_text("ok")
    few = Daemon(realm, DaemonConfig(min_free_disk_gb=0.0001), keep_last=2)
    assert abs(few.disk_floor_gb()[0] - 1 / 1024) < 1e-4  # all paid for: room for one more
    many = Daemon(realm, DaemonConfig(min_free_disk_gb=0.0001), keep_last=7)
    assert abs(many.disk_floor_gb()[0] - 3 / 1024) < 1e-4  # 8 - 5 still to come


def test_setup_limit_is_the_setup_timeout_when_set(monkeypatch):
    from daemon.supervisor import setup_limit

    monkeypatch.delenv("REALM_TEST_STARTUP_GRACE", raising=False)
    assert setup_limit(DaemonConfig(job_timeout=10, setup_timeout=30))[0] == 30
    limit, why = setup_limit(DaemonConfig(job_timeout=10))
    assert limit == 120 and "startup grace" in why
    assert setup_limit(DaemonConfig(job_timeout=300))[0] == 300


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def foreign(stamp: str) -> Job:
    return Job(id="j1", dataset_path="queue/processing/a.jsonl", dataset_name="a.jsonl",
               worker={"host": "some-other-host", "pid": 1}, heartbeat_at=stamp)


def test_foreign_lease_expires_only_after_lease_seconds_without_a_change_whatever_its_clock():
    clock = FakeClock()
    watch = LeaseWatch(lease_seconds=10, clock=clock)
    # the other host's clock is a year ahead: its timestamps mean nothing here, changes do
    assert watch.alive(foreign("2027-11-24T00:00:00+00:00"))
    clock.now += 9
    assert watch.alive(foreign("2027-11-24T00:00:00+00:00"))
    clock.now += 2  # 11 s without a renewal
    assert not watch.alive(foreign("2027-11-24T00:00:00+00:00"))
    assert watch.silent_for(foreign("x")) == 11
    # a renewal (any new value, even one from an hour "ago") restarts the watch
    assert watch.alive(foreign("2027-11-23T23:00:00+00:00"))
    clock.now += 9.9
    assert watch.alive(foreign("2027-11-23T23:00:00+00:00"))


def test_lease_on_this_host_is_judged_by_its_process(monkeypatch):
    monkeypatch.setenv("REALM_HOST", "here")
    watch = LeaseWatch(lease_seconds=1000)
    me = psutil.Process()
    alive = Job(id="a", dataset_path="x", dataset_name="a.jsonl", heartbeat_at="2020-01-01",
                worker={"host": "here", "pid": me.pid, "started": me.create_time()})
    dead = Job(id="b", dataset_path="x", dataset_name="b.jsonl", heartbeat_at=None,
               worker={"host": "here", "pid": me.pid, "started": me.create_time() - 50})
    assert watch.alive(alive) and not watch.alive(dead)  # pid reused by another process


def test_device_sets_parse_or_say_what_is_accepted():
    assert DeviceSet.parse("cpu") == DeviceSet("cpu", 1, "")
    assert DeviceSet.parse("cpu:2") == DeviceSet("cpu:2", 2, "")
    assert DeviceSet.parse("0,1") == DeviceSet("0,1", 2, "0,1")
    for bad in ("gpu", "0,0", "cpu:0", "0;1", ""):
        with pytest.raises(UsageError, match="cpu:N"):
            DeviceSet.parse(bad)
