"""`realm doctor` as a person runs it (a real subprocess): a healthy realm passes every check, a
broken hero and a disk floor above the free space fail with the fix, dead daemons are named."""

from __future__ import annotations

import json
import os

import psutil
import pytest

from core.fsutil import host_name
from core.paths import RealmPaths, init_layout
from guild.heroes import install_shipped
from tests.integration.test_cli import realm_cmd

CHECKS = ("layout", "config", "versions", "cuda", "bf16", "hero tiny-qwen3", "hero qwen3-0.6b",
          "disk", "memory", "rename", "flock", "inotify", "daemons")


def make_realm(base) -> RealmPaths:
    """A realm as `realm init` leaves it: the layout and the shipped hero profiles."""
    paths = RealmPaths(base)
    paths.base.mkdir()
    init_layout(paths)
    install_shipped(paths)
    return paths


def break_realm(paths: RealmPaths, scratch) -> None:
    """Two broken heroes (model.path gone; a damaged tokenizer.json), a disk floor above any
    free space, and two daemons registered: one alive (this process), one whose process is gone
    (same pid, another start time: what a reused pid looks like)."""
    folder = scratch / "damaged-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 512,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}))
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "Qwen2TokenizerFast"}')
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "voc')
    profile = ("id: {id}\nmodel:\n  architecture: Qwen3ForCausalLM\n  vocab_size: 512\n"
               "  context_length: 256\n  path: {path}\ntokenizer:\n  kind: pretrained\n")
    (paths.heroes / "gone.yaml").write_text(profile.format(id="gone", path=scratch / "nowhere"))
    (paths.heroes / "badtok.yaml").write_text(profile.format(id="badtok", path=folder))
    (paths.base / "config.json").write_text('{"daemon": {"min_free_disk_gb": 1000000000}}')
    for devices, started in (("0", psutil.Process().create_time()), ("1", 0.0)):
        (paths.status / f"daemon-{host_name()}-{devices}.json").write_text(json.dumps({
            "schema": 1, "state": "idle", "pid": os.getpid(), "host": host_name(),
            "started": started, "devices": devices, "updated_at": "2026-01-01T00:00:00+00:00"}))


def lines_of(out) -> dict[str, str]:
    """check name -> its whole line (``ok   name: detail``), the summary line left out."""
    rows = {}
    for line in out.stdout.splitlines()[:-1]:
        status, rest = line.split(" ", 1)
        rows[rest.strip().split(":", 1)[0]] = line
    return rows


# Each doctor run imports torch and transformers: seconds, more on a loaded machine.

@pytest.mark.slow(seconds=5)
def test_a_healthy_realm_passes_every_check(tmp_path):
    paths = make_realm(tmp_path / "realm")
    out = realm_cmd(paths.base, "doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = lines_of(out)
    assert set(CHECKS) <= set(rows), out.stdout
    assert all(not line.startswith("FAIL") for line in rows.values()), out.stdout
    assert rows["hero tiny-qwen3"].startswith("ok   hero tiny-qwen3: Qwen3ForCausalLM random init")
    assert rows["versions"].startswith("ok   versions: torch ")
    assert "transformers" in rows["versions"]
    assert rows["disk"].startswith("ok   disk: ") and "floor 1 GB" in rows["disk"]
    assert out.stdout.splitlines()[-1].endswith(" 0 failed")
    assert not list(paths.base.glob(".doctor-*")), "the scratch folder was left behind"
    assert out.stderr == ""


@pytest.mark.slow(seconds=10)
def test_a_broken_realm_fails_each_check_with_its_fix_and_json_has_the_same_rows(tmp_path):
    paths = make_realm(tmp_path / "realm")
    break_realm(paths, tmp_path)
    out = realm_cmd(paths.base, "doctor")
    assert out.returncode == 1, out.stdout + out.stderr
    rows = lines_of(out)
    assert out.stdout.splitlines()[-1].endswith(" 4 failed"), out.stdout

    # the broken heroes, named, with the fix; the good one still loads
    gone, badtok = rows["hero gone"], rows["hero badtok"]
    assert gone.startswith("FAIL hero gone: ") and "nowhere' does not exist" in gone
    assert badtok.startswith("FAIL hero badtok: ") and "the tokenizer in " in badtok
    assert "damaged-model does not load" in badtok
    for line, hero in ((gone, "gone"), (badtok, "badtok")):
        assert f"; fix: fix model.path / tokenizer in {paths.heroes / hero}.yaml" in line
    assert rows["hero tiny-qwen3"].startswith("ok   "), "one bad hero hides no good one"

    # the disk floor, with both numbers and where the floor is set
    disk = rows["disk"]
    assert disk.startswith("FAIL disk: ")
    assert "GB free < 1000000000 GB (daemon.min_free_disk_gb from config.json)" in disk
    assert "; fix: free space there" in disk and "lower daemon.min_free_disk_gb" in disk

    # a live daemon and one whose process is gone
    alive, dead = rows[f"daemon {host_name()}/0"], rows[f"daemon {host_name()}/1"]
    assert alive.startswith(f"ok   daemon {host_name()}/0: alive (pid {os.getpid()}")
    assert dead.startswith(f"FAIL daemon {host_name()}/1: gone: ")
    assert "the process is dead" in dead and "fix: start it again: realm daemon --devices 1" in dead

    # --json: schema 1, the same rows
    out = realm_cmd(paths.base, "doctor", "--json")
    assert out.returncode == 1
    data = json.loads(out.stdout)
    assert data["schema"] == 1 and data["ok"] is False and data["failed"] == 4
    assert data["warnings"] == sum(r["status"] == "warn" for r in data["checks"])
    assert all(set(r) == {"name", "status", "detail", "fix"} for r in data["checks"])
    assert [r["name"] for r in data["checks"]] == list(rows)
    assert [r["status"] for r in data["checks"]] == [line[:4].strip().lower()
                                                     for line in rows.values()]
    row = next(r for r in data["checks"] if r["name"] == "disk")
    assert row["status"] == "fail" and "lower daemon.min_free_disk_gb" in row["fix"]


def test_not_a_realm_is_a_clear_error(tmp_path):
    out = realm_cmd(tmp_path / "nothing-here", "doctor")
    assert out.returncode == 2
    assert "is not a realm" in out.stderr and "realm init" in out.stderr
    assert out.stdout == ""
