"""Heroes, campaigns and `realm config show` through the real CLI, on real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.paths import RealmPaths
from guild.heroes import install_shipped, load_hero, load_hero_file

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "config_explain_six_layers.json"


def realm_cmd(base, *args, module="cli", cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "REALM_DEBUG"}
    return subprocess.run([sys.executable, "-m", module, "--base-dir", str(base), *args],
                          capture_output=True, text=True, env=env, timeout=60, cwd=cwd)


@pytest.fixture
def hero_realm(realm: RealmPaths) -> RealmPaths:
    install_shipped(realm)
    return realm


# --- heroes -----------------------------------------------------------------------------------

def test_shipped_heroes_load_and_list(hero_realm):
    tiny = load_hero(hero_realm, "tiny-qwen3")
    assert (tiny.model.architecture, tiny.model.init, tiny.model.vocab_size) == (
        "Qwen3ForCausalLM", "random", 512)
    qwen = load_hero(hero_realm, "qwen3-0.6b")
    assert qwen.model.hf_name == "Qwen/Qwen3-0.6B" and qwen.model.vocab_size == 151936
    out = realm_cmd(hero_realm.base, "hero", "list", "--json")
    assert {h["id"] for h in json.loads(out.stdout)["heroes"]} == {"tiny-qwen3", "qwen3-0.6b"}
    show = realm_cmd(hero_realm.base, "hero", "show", "tiny-qwen3")
    assert show.returncode == 0 and "architecture: Qwen3ForCausalLM" in show.stdout


def _write_hero(realm: RealmPaths, text: str, name: str = "broken") -> Path:
    path = realm.heroes / f"{name}.yaml"
    path.write_text(text)
    return path


GOOD = """id: broken
model:
  architecture: Qwen3ForCausalLM
  vocab_size: 512
  context_length: 256
  init: random
  config: {hidden_size: 64}
"""


def test_hero_yaml_syntax_error_names_file_and_line(hero_realm):
    path = _write_hero(hero_realm, GOOD + "training_defaults:\n  training: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+:\d+: YAML syntax error"):
        load_hero(hero_realm, "broken")
    out = realm_cmd(hero_realm.base, "hero", "show", "broken")
    assert out.returncode == 2 and f"{path}:" in out.stderr and "Traceback" not in out.stderr


def test_hero_missing_architecture_names_the_key(hero_realm):
    path = _write_hero(hero_realm, GOOD.replace("  architecture: Qwen3ForCausalLM\n", ""))
    with pytest.raises(ConfigError, match=rf"{path}: missing required key 'model.architecture'"):
        load_hero(hero_realm, "broken")


def test_hero_unknown_key_names_file_line_and_suggests(hero_realm):
    path = _write_hero(hero_realm, GOOD.replace("  vocab_size: 512", "  vocab_sise: 512"))
    with pytest.raises(ConfigError) as info:
        load_hero(hero_realm, "broken")
    assert f"{path}:4: unknown key 'model.vocab_sise' (did you mean 'model.vocab_size'?)" in str(
        info.value)


def test_hero_unknown_training_default_names_line(hero_realm):
    path = _write_hero(hero_realm, GOOD + "training_defaults:\n  training:\n    lr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"unknown key 'training.lr'.*{path}:10"):
        load_hero(hero_realm, "broken")


def test_unknown_hero_lists_known_ones(hero_realm):
    out = realm_cmd(hero_realm.base, "campaign", "create", "c1", "--hero", "tiny-qwen")
    assert out.returncode == 2
    assert "unknown hero 'tiny-qwen'" in out.stderr and "Did you mean 'tiny-qwen3'" in out.stderr


# --- campaigns --------------------------------------------------------------------------------

def test_create_writes_campaign_and_activates(hero_realm):
    out = realm_cmd(hero_realm.base, "campaign", "create", "c1", "--hero", "tiny-qwen3",
                    "--set", "training.learning_rate=5e-4", "--description", "first run")
    assert out.returncode == 0, out.stderr
    data = json.loads((hero_realm.campaigns / "tiny-qwen3" / "c1" / "campaign.json").read_text())
    assert data["name"] == "c1" and data["hero_id"] == "tiny-qwen3"
    assert data["overrides"] == {"training": {"learning_rate": 5e-4}}
    assert data["status"] == "open" and data["description"] == "first run"
    assert data["config_hash"].startswith("sha256:") and data["created_at"]
    assert data["code_version"] is None or len(data["code_version"]) >= 7
    assert (hero_realm.campaigns / "tiny-qwen3" / "c1" / "checkpoints").is_dir()
    active = json.loads((hero_realm.campaigns / "active.json").read_text())
    assert (active["hero_id"], active["campaign"]) == ("tiny-qwen3", "c1")
    shown = json.loads(realm_cmd(hero_realm.base, "campaign", "show", "--json").stdout)
    assert shown["active"] is True and shown["name"] == "c1"


def test_duplicate_campaign_fails_and_leaves_the_first_untouched(hero_realm):
    assert realm_cmd(hero_realm.base, "campaign", "create", "c1", "--hero", "tiny-qwen3",
                     "--set", "training.epochs=2").returncode == 0
    path = hero_realm.campaigns / "tiny-qwen3" / "c1" / "campaign.json"
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    out = realm_cmd(hero_realm.base, "campaign", "create", "c1", "--hero", "tiny-qwen3",
                    "--set", "training.epochs=9")
    assert out.returncode == 2 and "already exists" in out.stderr
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in path.parent.parent.iterdir()) == ["c1"], "no stray temp folder"


@pytest.mark.parametrize("name", ["..", "a/b", "has space", "../escape"])
def test_unsafe_campaign_names_are_refused(hero_realm, name):
    out = realm_cmd(hero_realm.base, "campaign", "create", name, "--hero", "tiny-qwen3")
    assert out.returncode == 2 and "is not a safe name" in out.stderr
    assert not any(hero_realm.campaigns.rglob("campaign.json"))


def test_bad_override_fails_before_anything_is_written(hero_realm):
    out = realm_cmd(hero_realm.base, "campaign", "create", "c1", "--hero", "tiny-qwen3",
                    "--set", "training.learning_rat=1")
    assert out.returncode == 2 and "did you mean 'training.learning_rate'" in out.stderr
    assert not (hero_realm.campaigns / "tiny-qwen3").exists() or not any(
        (hero_realm.campaigns / "tiny-qwen3").iterdir())


def test_config_hash_changes_when_and_only_when_resolved_config_changes(hero_realm):
    def create(name, *sets):
        args = ["campaign", "create", name, "--hero", "tiny-qwen3", "--no-activate"]
        for s in sets:
            args += ["--set", s]
        assert realm_cmd(hero_realm.base, *args).returncode == 0
        path = hero_realm.campaigns / "tiny-qwen3" / name / "campaign.json"
        return json.loads(path.read_text())["config_hash"]

    a = create("a", "training.learning_rate=5e-4")
    same = create("b", "training.learning_rate=0.0005", "training.seed=42")  # 42 is the default
    other = create("c", "training.learning_rate=4e-4")
    assert a == same and a != other
    assert not (hero_realm.campaigns / "active.json").exists(), "--no-activate"


def test_activate_and_list(hero_realm):
    for name in ("one", "two"):
        realm_cmd(hero_realm.base, "campaign", "create", name, "--hero", "tiny-qwen3")
    assert realm_cmd(hero_realm.base, "campaign", "activate", "tiny-qwen3/one").returncode == 0
    listing = json.loads(realm_cmd(hero_realm.base, "campaign", "list", "--json").stdout)
    assert listing["active"] == "tiny-qwen3/one"
    assert [(c["name"], c["active"]) for c in listing["campaigns"]] == [("one", True),
                                                                         ("two", False)]
    out = realm_cmd(hero_realm.base, "campaign", "activate", "tiny-qwen3/nope")
    assert out.returncode == 2 and "no campaign 'tiny-qwen3/nope'" in out.stderr


def test_module_form_of_campaign_create(hero_realm):
    out = subprocess.run([sys.executable, "-m", "guild.campaigns.cli", "create", "m1", "--hero",
                          "tiny-qwen3", "--base-dir", str(hero_realm.base)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (hero_realm.campaigns / "tiny-qwen3" / "m1" / "campaign.json").is_file()


# --- config show ------------------------------------------------------------------------------

def _six_layer_realm(realm: RealmPaths) -> str:
    assert realm_cmd(realm.base, "campaign", "create", "c1", "--hero", "tiny-qwen3",
                     "--set", "training.learning_rate=5e-4", "--set", "training.weight_decay=0.01",
                     "--set", "governor.window=30").returncode == 0
    (realm.base / "config.json").write_text(json.dumps(
        {"training": {"grad_accum": 2, "weight_decay": 0.02}, "daemon": {"max_attempts": 5}}))
    data = realm.state_dir("normal") / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    (realm.state_dir("normal") / "d.jsonl.job.json").write_text(json.dumps(
        {"overrides": {"training": {"epochs": 2}, "checkpoint.keep_last": 5}}))
    return str(data)


def test_golden_explain_across_all_six_layers(hero_realm):
    job = _six_layer_realm(hero_realm)
    out = realm_cmd(hero_realm.base, "config", "show", "--job", job, "--explain", "--json",
                    "--set", "training.learning_rate=1e-4", "--max-steps", "7", "--seed", "3")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    if os.environ.get("REALM_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=2) + "\n")
    assert got == json.loads(GOLDEN.read_text())
    rows = {r["key"]: r for r in got["explain"]}
    assert (rows["training.learning_rate"]["value"], rows["training.learning_rate"]["layer"]) == (
        1e-4, "cli"), "set in campaign.json and again by --set: cli wins"
    assert {r["layer"] for r in got["explain"]} == {"schema", "hero", "campaign", "realm", "job",
                                                    "cli", "locked"}
    assert rows["training.weight_decay"]["layer"] == "realm"
    assert rows["governor.window"]["source"] == "campaigns/tiny-qwen3/c1/campaign.json"
    assert rows["checkpoint.keep_last"]["source"] == "queue/normal/d.jsonl.job.json"
    assert rows["training.max_steps"]["source"] == "--max-steps"
    assert rows["training.micro_batch_size"]["source"].startswith("configs/heroes/tiny-qwen3.yaml:")


def test_explain_text_table(hero_realm):
    out = realm_cmd(hero_realm.base, "config", "show", "--explain", "--learning-rate", "3e-4")
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("training.learning_rate"))
    assert line.split()[1:] == ["0.0003", "cli", "--learning-rate"]


def test_set_typo_exits_2_with_suggestion(hero_realm):
    out = realm_cmd(hero_realm.base, "config", "show", "--set", "trainig.learning_rate=1e-4")
    assert out.returncode == 2
    assert "did you mean 'training.learning_rate'?" in out.stderr and "Traceback" not in out.stderr


def test_set_locked_field_fails_naming_the_layer(hero_realm):
    out = realm_cmd(hero_realm.base, "config", "show", "--set", "locked.vocab_size=10")
    assert out.returncode == 2
    assert "locked.vocab_size: set by the cli layer (--set)" in out.stderr


def test_campaign_json_setting_locked_field_fails_naming_layer_and_file(hero_realm):
    assert realm_cmd(hero_realm.base, "campaign", "create", "c1", "--hero",
                     "tiny-qwen3").returncode == 0
    path = hero_realm.campaigns / "tiny-qwen3" / "c1" / "campaign.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "model_architecture": "LlamaForCausalLM"}))
    out = realm_cmd(hero_realm.base, "config", "show")
    assert out.returncode == 2
    assert ("model_architecture: set by the campaign layer "
            "(campaigns/tiny-qwen3/c1/campaign.json)") in out.stderr


def test_max_length_above_context_has_both_numbers(hero_realm):
    out = realm_cmd(hero_realm.base, "config", "show", "--max-length", "2048")
    assert out.returncode == 2
    assert "2048 is above the hero's context length 1024" in out.stderr


def test_config_json_syntax_error_names_line(hero_realm):
    (hero_realm.base / "config.json").write_text('{\n  "training": {\n    "epochs": 2,\n  }\n}\n')
    out = realm_cmd(hero_realm.base, "config", "show")
    assert out.returncode == 2 and "config.json:4:" in out.stderr and "invalid JSON" in out.stderr


@pytest.mark.slow
def test_init_installs_heroes_from_an_installed_package(tmp_path):
    """Build a wheel, install it into a target folder, run `realm init` from elsewhere."""
    repo = Path(__file__).resolve().parents[2]
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(repo)], check=True, capture_output=True)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(next(wheels.glob("*.whl")))], check=True,
                   capture_output=True)
    code = ("import sys, guild, cli.main; assert guild.__file__.startswith(sys.argv[1]), "
            "guild.__file__; sys.exit(cli.main.main(['--base-dir', sys.argv[2], 'init']))")
    realm_dir = tmp_path / "fresh-realm"
    out = subprocess.run([sys.executable, "-c", code, str(target), str(realm_dir)],
                         capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(target)))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (realm_dir / "configs" / "heroes").iterdir()) == [
        "qwen3-0.6b.yaml", "tiny-qwen3.yaml"]
    installed = load_hero_file(realm_dir / "configs" / "heroes" / "tiny-qwen3.yaml")
    assert installed.model.architecture == "Qwen3ForCausalLM"
    shutil.rmtree(target)
