"""The realm layer from config.yaml (read, with line numbers) and `config show --doc`."""

from __future__ import annotations

import json
import subprocess
import sys


def realm(base, *args):
    return subprocess.run([sys.executable, "-m", "cli", "--base-dir", str(base), *args],
                          capture_output=True, text=True, timeout=60)


def test_a_realm_config_yaml_is_read_with_its_lines_and_two_files_are_refused(tmp_path):
    base = tmp_path / "r"
    assert realm(base, "init").returncode == 0
    (base / "config.yaml").write_text("training:\n  epochs: 3\n")
    shown = json.loads(realm(base, "config", "show", "--explain", "--json").stdout)
    row = next(r for r in shown["explain"] if r["key"] == "training.epochs")
    assert (row["value"], row["layer"], row["source"]) == (3, "realm", "config.yaml:2")

    (base / "config.yaml").write_text("training:\n  epochs: 3\n  lr: 1\n")
    bad = realm(base, "config", "show")
    assert bad.returncode == 2
    assert "unknown key 'training.lr' (did you mean 'training.learning_rate'?)" in bad.stderr
    assert "config.yaml:3" in bad.stderr

    (base / "config.yaml").write_text("- a list\n")
    assert "must be a mapping of sections" in realm(base, "config", "show").stderr

    (base / "config.yaml").write_text("training:\n  epochs: 3\n")
    (base / "config.json").write_text('{"training": {"epochs": 4}}')
    both = realm(base, "config", "show")
    assert both.returncode == 2 and "config.json and config.yaml both exist" in both.stderr


def test_config_show_doc_prints_each_keys_documentation(tmp_path):
    base = tmp_path / "r"
    assert realm(base, "init").returncode == 0
    text = realm(base, "config", "show", "--doc").stdout
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("training.epochs "))
    assert lines[at + 1].strip() == "Passes over the dataset; CLI --epochs."
    rows = json.loads(realm(base, "config", "show", "--doc", "--json").stdout)["explain"]
    documented = [r for r in rows if r["doc"]]
    assert len(documented) == len(rows), [r["key"] for r in rows if not r["doc"]]
    plain = json.loads(realm(base, "config", "show", "--explain", "--json").stdout)["explain"]
    assert "doc" not in plain[0]
