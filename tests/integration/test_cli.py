"""`realm` as a person runs it: real subprocesses, exit codes, error text, read-only reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core.training_queue import TrainingQueue
from tests.conftest import drop, tree, write_dataset


def realm_cmd(base, *args, env_extra=None, module="cli"):
    env = {k: v for k, v in os.environ.items() if k != "REALM_DEBUG"} | (env_extra or {})
    return subprocess.run([sys.executable, "-m", module, "--base-dir", str(base), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_init_is_idempotent(tmp_path):
    base = tmp_path / "new-realm"
    first = realm_cmd(base, "init")
    assert first.returncode == 0 and "folders created" in first.stdout
    for folder in ("high", "normal", "low", "processing", "completed", "failed", "skipped"):
        assert (base / "queue" / folder).is_dir()
    (base / "queue" / "normal" / "keep.jsonl").write_text('{"text": "x"}\n')
    second = realm_cmd(base, "init")
    assert second.returncode == 0 and "nothing to do" in second.stdout
    assert (base / "queue" / "normal" / "keep.jsonl").read_text() == '{"text": "x"}\n'


def test_add_show_and_json(realm, tmp_path):
    src = write_dataset(tmp_path / "chat.jsonl", n=7)
    out = realm_cmd(realm.base, "queue", "add", str(src), "--priority", "high", "--hero",
                    "tiny-qwen3", "--set", "training.learning_rate=1e-4")
    assert out.returncode == 0, out.stderr
    assert "queue/high/chat.jsonl (7 examples" in out.stdout
    shown = json.loads(realm_cmd(realm.base, "queue", "show", "chat.jsonl", "--json").stdout)
    assert shown["priority"] == "high" and shown["hero_id"] == "tiny-qwen3"
    assert shown["overrides"] == {"training": {"learning_rate": 1e-4}}
    text = realm_cmd(realm.base, "queue", "show", shown["id"][:18]).stdout
    assert shown["id"] in text and "added by realm queue add" in text
    assert src.read_text().count("\n") == 7, "add copies; the source is left alone"


def test_status_and_list_are_read_only(realm, tmp_path):
    q = TrainingQueue(realm.base, settle_seconds=0)
    drop(realm, "high", "a.jsonl")
    drop(realm, "low", "b.jsonl")
    q.adopt_new()
    q.claim_next()
    drop(realm, "normal", "fresh.jsonl")  # not adopted yet: reading must not adopt it
    before = tree(realm.base)
    status = realm_cmd(realm.base, "queue", "status", "--json")
    listing = realm_cmd(realm.base, "queue", "list", "--json")
    text = realm_cmd(realm.base, "queue", "status")
    assert tree(realm.base) == before, "status/list wrote or moved something"
    data = json.loads(status.stdout)
    assert data["schema"] == 1
    assert data["counts"]["queued"] == 2 and data["counts"]["processing"] == 1
    assert data["queued_by_priority"] == {"high": 0, "normal": 1, "low": 1}
    assert data["waiting_for_adoption"] == 1
    assert [r["dataset"] for r in data["in_progress"]] == ["a.jsonl"]
    assert [(r["status"], r["dataset"]) for r in json.loads(listing.stdout)["jobs"]] == [
        ("waiting", "fresh.jsonl"), ("queued", "b.jsonl")]
    assert "In progress" in text.stdout and "a.jsonl" in text.stdout


def test_status_shows_recent_failures_with_reasons(realm):
    q = TrainingQueue(realm.base, settle_seconds=0)
    drop(realm, "normal", "a.jsonl")
    drop(realm, "normal", "b.jsonl")
    q.fail(q.claim_next(), "bad data at a.jsonl:2: not JSON")
    q.complete(q.claim_next(), final_step=5, final_loss=0.5)
    out = realm_cmd(realm.base, "queue", "status").stdout
    assert "Recently failed" in out and "bad data at a.jsonl:2: not JSON" in out
    assert "Recently completed" in out and "b.jsonl" in out
    data = json.loads(realm_cmd(realm.base, "queue", "status", "--json").stdout)
    assert data["recent_failed"][0]["last_error"] == "bad data at a.jsonl:2: not JSON"


def test_retry_and_cancel_record_reason_in_history_and_ledger(realm):
    q = TrainingQueue(realm.base, settle_seconds=0)
    drop(realm, "low", "a.jsonl")
    drop(realm, "low", "b.jsonl")
    failed = q.fail(q.claim_next(), "boom")
    out = realm_cmd(realm.base, "queue", "retry", failed.id, "--reason", "fixed the data")
    assert out.returncode == 0, out.stderr
    assert (realm.state_dir("low") / "a.jsonl").is_file()
    out = realm_cmd(realm.base, "queue", "cancel", "b.jsonl", "--reason", "not needed")
    assert out.returncode == 0, out.stderr
    assert (realm.state_dir("cancelled") / "b.jsonl").is_file()
    a = json.loads((realm.state_dir("low") / "a.jsonl.job.json").read_text())
    b = json.loads((realm.state_dir("cancelled") / "b.jsonl.job.json").read_text())
    assert a["status"] == "queued" and a["history"][-1]["reason"].startswith("fixed the data")
    assert b["status"] == "cancelled" and b["history"][-1]["reason"] == "not needed"
    ledger = [json.loads(l) for l in realm.ledger.read_text().splitlines()]
    assert {(e["job_id"], e["from"], e["to"], e["reason"].split(" (")[0]) for e in ledger} >= {
        (a["id"], "failed", "queued", "fixed the data"),
        (b["id"], "queued", "cancelled", "not needed")}
    again = realm_cmd(realm.base, "queue", "cancel", b["id"])
    assert again.returncode == 2 and "cannot move from cancelled to cancelled" in again.stderr


@pytest.mark.parametrize("args,message", [
    (("queue", "show", "nope"), "no job matches 'nope'"),
    (("queue", "add", "/definitely/missing.jsonl"), "no such file"),
    (("queue", "add", "x.jsonl", "--hero", "../etc"), "--hero '../etc' is not a safe name"),
    (("queue", "add", "x.jsonl", "--set", "oops"), "expected KEY=VALUE"),
])
def test_bad_input_exits_2_with_one_clear_error(realm, args, message):
    out = realm_cmd(realm.base, *args)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert "Traceback" not in out.stderr


def test_not_a_realm_and_debug_traceback(tmp_path):
    out = realm_cmd(tmp_path, "queue", "status")
    assert out.returncode == 2 and "is not a realm" in out.stderr and "realm init" in out.stderr
    debug = realm_cmd(tmp_path, "--debug", "queue", "status")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_bad_usage_exits_2(realm):
    out = realm_cmd(realm.base, "queue", "frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_module_form_of_queue_status(realm):
    drop(realm, "high", "a.jsonl")
    out = subprocess.run([sys.executable, "-m", "core.training_queue", "status", "--json"],
                         capture_output=True, text=True, env=dict(os.environ,
                                                                   REALM_HOME=str(realm.base)))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["queued_by_priority"]["high"] == 1


def test_the_design_cards_module_forms_and_options_after_the_subcommand(realm):
    """``python -m core.training_daemon --plan``, ``python -m core.training_queue status``,
    ``python -m guild.campaigns.cli create`` and ``python -m core.cli``: the same commands as
    ``realm``, with --base-dir accepted before or after the subcommand."""
    drop(realm, "high", "a.jsonl")
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], capture_output=True, text=True,
                                    timeout=60)
    plan = run("core.training_daemon", "--plan", "--base-dir", str(realm.base))
    assert plan.returncode == 0 and "queue/high/a.jsonl" in plan.stdout, plan.stderr
    status = run("core.training_queue", "status", "--json", "--base-dir", str(realm.base))
    assert json.loads(status.stdout)["queued_by_priority"]["high"] == 1, status.stderr
    made = run("guild.campaigns.cli", "create", "forms", "--hero", "tiny-qwen3", "--base-dir",
               str(realm.base))
    assert made.returncode == 0 and (realm.campaigns / "tiny-qwen3" / "forms").is_dir(), made.stderr
    for argv in (["cli", "--base-dir", str(realm.base), "campaign", "list"],
                 ["core.cli", "campaign", "list", "--base-dir", str(realm.base)]):
        listed = run(*argv)
        assert listed.returncode == 0 and "tiny-qwen3/forms" in listed.stdout, listed.stderr
    bad = run("cli", "queue", "status", "--base-dir", str(realm.base / "nowhere"))
    assert bad.returncode == 2 and "is not a realm" in bad.stderr


def test_core_never_imports_torch():
    code = ("import sys, cli.main, cli.plan, cli.status, core.training_queue, config.layers, "
            "daemon.training_daemon, daemon.supervisor, guild.selection; "
            "cli.main.build_parser(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_status_watch_refreshes_and_ctrl_c_exits_0(realm):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "cli", "--base-dir", str(realm.base),
                             "queue", "status", "--watch", "--json", "--interval", "0.2"],
                            stdout=subprocess.PIPE, text=True)
    first = json.loads(proc.stdout.readline())
    drop(realm, "high", "later.jsonl")
    deadline = time.monotonic() + 10
    seen = first
    while seen["queued_by_priority"]["high"] == 0 and time.monotonic() < deadline:
        seen = json.loads(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    proc.stdout.close()
    assert first["queued_by_priority"]["high"] == 0 and seen["queued_by_priority"]["high"] == 1


def test_status_shows_the_running_jobs_progress(realm):
    q = TrainingQueue(realm.base, settle_seconds=0)
    drop(realm, "high", "a.jsonl")
    job = q.claim_next()
    realm.status.mkdir(exist_ok=True)
    (realm.status / "jobs").mkdir(parents=True)
    (realm.status / "jobs" / f"{job.id}.progress.json").write_text(json.dumps({
        "schema": 1, "state": "training", "job_id": job.id, "step": 12, "job_step": 12,
        "total_steps": 40, "eta_seconds": 31.0,
        "metrics": {"loss": 3.2109, "tokens_per_sec": 7012.4}}))
    out = realm_cmd(realm.base, "queue", "status")
    assert "step 12/40  loss 3.2109  7,012 tokens/s  eta 31s" in out.stdout
    data = json.loads(realm_cmd(realm.base, "queue", "status", "--json").stdout)
    assert data["in_progress"][0]["progress"]["job_step"] == 12
