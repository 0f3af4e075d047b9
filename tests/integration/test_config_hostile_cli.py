"""Hostile config through the real CLI: refused with exit 2 and a message, nothing claimed or
queued; bad hero files listed, not fatal; the plan reports instead of crashing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core.paths import RealmPaths
from guild.heroes import install_shipped
from tests.conftest import drop, tree, write_dataset


def realm_cmd(base, *args):
    env = {k: v for k, v in os.environ.items() if k != "REALM_DEBUG"}
    return subprocess.run([sys.executable, "-m", "cli", "--base-dir", str(base), *args],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def hrealm(realm: RealmPaths) -> RealmPaths:
    install_shipped(realm)
    return realm


def test_daemon_refuses_bad_cli_layer_before_claiming(hrealm, tmp_path):
    from core.training_queue import TrainingQueue

    job = TrainingQueue(hrealm.base).add(write_dataset(tmp_path / "q.jsonl"))  # adopted, queued
    drop(hrealm, "normal", "a.jsonl")  # not adopted yet
    before = tree(hrealm.queue)
    for args, message in [
        (["--set", "training.x=1"], "unknown key 'training.x'"),
        (["--set", "training.learning_rate=nan"], "training.learning_rate is nan; write a finite"),
        (["--learning-rate=-inf"], "training.learning_rate is -inf; write a finite number "
                                      "(from the cli layer, --learning-rate)"),
        (["--set", "daemon.poll_interval=Infinity"], "daemon.poll_interval is inf"),
        (["--set", "daemon.devices=gpu"], "not a device set"),  # daemon.* from --set is used
    ]:
        out = realm_cmd(hrealm.base, "daemon", "--once", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    assert tree(hrealm.queue) == before, "nothing adopted, claimed or moved"
    assert (hrealm.state_dir("normal") / "a.jsonl").is_file()
    assert (hrealm.base / job.dataset_path).is_file() and job.dataset_path.startswith("queue/normal/")


def test_daemon_poll_refused_at_parse_time(hrealm):
    for value in ("0", "nan"):  # the other values: tests/unit/test_config_hostile.py
        out = realm_cmd(hrealm.base, "daemon", "--once", f"--poll={value}")
        assert out.returncode == 2, out.stderr
        assert f"argument --poll: --poll {value}: must be between 0.05 and 604800" in out.stderr


def test_queue_add_refuses_bad_overrides_and_copies_nothing(hrealm, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    before = tree(hrealm.queue)
    for item, message in [("training.lr=1", "unknown key 'training.lr' (did you mean "),
                          ("data.max_bad_fraction=NaN", "data.max_bad_fraction is nan")]:
        out = realm_cmd(hrealm.base, "queue", "add", str(data), "--set", item)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert "Nothing was queued." in out.stderr
    assert tree(hrealm.queue) == before


def test_hero_list_survives_a_bad_hero_and_show_names_the_reason(hrealm):
    bomb = "id: bomb\na: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join(['*a' if i == 1 else f'*a{i - 1}'] * 10)}]\n"
        for i in range(1, 8))
    (hrealm.heroes / "bomb.yaml").write_text(bomb)
    listing = realm_cmd(hrealm.base, "hero", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    assert {h["id"] for h in data["heroes"]} == {"tiny-qwen3", "qwen3-0.6b"}
    assert [p["id"] for p in data["problems"]] == ["bomb"]
    assert "expands to more than 100,000 values" in data["problems"][0]["problem"]
    text = realm_cmd(hrealm.base, "hero", "list")
    assert text.returncode == 0 and "tiny-qwen3" in text.stdout
    assert "problem: hero bomb (" in text.stdout and "bomb.yaml" in text.stdout
    show = realm_cmd(hrealm.base, "hero", "show", "bomb")
    assert show.returncode == 2 and "expands to more than 100,000 values" in show.stderr


def test_long_campaign_name_and_non_object_config(hrealm):
    out = realm_cmd(hrealm.base, "campaign", "create", "c" * 300, "--hero", "tiny-qwen3")
    assert out.returncode == 2 and "300 characters long; at most 64" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not list(hrealm.campaigns.rglob("campaign.json"))
    (hrealm.base / "config.json").write_text("[1, 2]")
    out = realm_cmd(hrealm.base, "config", "show")
    assert out.returncode == 2, out.stderr
    assert "config.json: realm config.json must be a JSON object" in out.stderr
    assert "got a list" in out.stderr and "unknown key ''" not in out.stderr


def test_plan_reports_config_problems_and_exits_0(hrealm):
    (hrealm.base / "config.json").write_text('{"daemon": {"poll_interval": 0}}')
    drop(hrealm, "normal", "a.jsonl")
    drop(hrealm, "high", "b.jsonl")
    (hrealm.state_dir("high") / "b.jsonl.job.json").write_text(
        json.dumps({"campaign_id": "c" * 300}))
    before = tree(hrealm.base)
    out = realm_cmd(hrealm.base, "daemon", "--plan", "--set", "training.seed=1e29")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "problem: config: 2 config problems" in text, text
    assert "daemon.poll_interval: must be between 0.05 and 604800.0, got 0.0 (set by the " \
           "realm layer" in text
    assert "training.seed: expected an integer, got 1e+29 (from the cli layer, --set)" in text
    assert "queue/high/b.jsonl.job.json: campaign_id" in text and "at most 64" in text
    assert tree(hrealm.base) == before
