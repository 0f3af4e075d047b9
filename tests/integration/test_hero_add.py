"""`realm hero add NAME --from PATH`: a hero from a model folder's config.json, trained by a
real daemon job; a folder without config.json or of an unknown architecture is refused."""

from __future__ import annotations

import json

import pytest
import yaml

from core.training_queue import TrainingQueue
from guild.heroes import load_hero_file, shipped_dir
from tests.integration.test_daemon_once import realm_cmd
from tests.trainer.test_training import make_realm


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from trainer.model import load_model

    folder = tmp_path_factory.mktemp("models") / "my-qwen"
    model, tokenizer = load_model(load_hero_file(shipped_dir() / "tiny-qwen3.yaml"),
                                  {"model_architecture": "Qwen3ForCausalLM", "vocab_size": 512})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow(seconds=30)
def test_hero_add_reads_the_folder_and_a_job_trains_on_it(tmp_path, model_folder):
    paths = make_realm(tmp_path / "r")
    out = realm_cmd(paths.base, "hero", "add", "mine", "--from", str(model_folder))
    assert out.returncode == 0, out.stderr
    assert "Qwen3ForCausalLM, vocab 512, context 1024" in out.stdout
    profile = yaml.safe_load((paths.heroes / "mine.yaml").read_text())
    assert profile["model"] == {"architecture": "Qwen3ForCausalLM", "vocab_size": 512,
                                "context_length": 1024, "path": str(model_folder),
                                "init": "pretrained"}
    assert profile["tokenizer"] == {"kind": "pretrained", "path": str(model_folder)}
    again = realm_cmd(paths.base, "hero", "add", "mine", "--from", str(model_folder))
    assert again.returncode == 2 and "mine.yaml already exists" in again.stderr
    assert realm_cmd(paths.base, "campaign", "create", "byo", "--hero", "mine").returncode == 0
    texts = [f"example {i} of my own model" for i in range(16)]
    (paths.state_dir("normal") / "d.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts))
    plan = json.loads(realm_cmd(paths.base, "daemon", "--plan", "--json").stdout)
    assert plan["jobs"][0]["hero"] == "mine"
    assert plan["jobs"][0]["token_estimate"].startswith("mine tokenizer on 16 lines")
    (paths.base / "config.json").write_text(json.dumps({"daemon": {"settle_seconds": 0.2}}))
    ran = realm_cmd(paths.base, "daemon", "--once", "--max-steps", "2")
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    [done] = TrainingQueue(paths.base).jobs_in("completed")
    assert done.final_step >= 1
    assert (paths.base / "campaigns/mine/byo/checkpoints" / f"step-{done.final_step}").is_dir()


def test_hero_add_refuses_a_folder_without_config_or_of_an_unknown_architecture(tmp_path):
    paths = make_realm(tmp_path / "r")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = realm_cmd(paths.base, "hero", "add", "x", "--from", str(empty))
    assert out.returncode == 2 and f"{empty}/config.json: missing" in out.stderr
    (empty / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                   "vocab_size": 50257}))
    out = realm_cmd(paths.base, "hero", "add", "x", "--from", str(empty))
    assert out.returncode == 2
    assert "architectures is ['GPT2LMHeadModel']; realm trains Qwen3ForCausalLM" in out.stderr
    (empty / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                   "vocab_size": 100}))
    out = realm_cmd(paths.base, "hero", "add", "x", "--from", str(empty))
    assert "'max_position_embeddings' is missing" in out.stderr
    assert not (paths.heroes / "x.yaml").exists()


def test_a_hero_with_only_model_path_reads_the_rest_from_the_folder(tmp_path, model_folder):
    paths = make_realm(tmp_path / "r")
    (paths.heroes / "bare.yaml").write_text(f"id: bare\nmodel:\n  path: {model_folder}\n")
    out = realm_cmd(paths.base, "hero", "show", "bare", "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert (shown["architecture"], shown["vocab_size"], shown["context_length"]) == (
        "Qwen3ForCausalLM", 512, 1024)
    (paths.heroes / "nowhere.yaml").write_text(f"id: nowhere\nmodel:\n  path: {tmp_path}/x\n")
    out = realm_cmd(paths.base, "hero", "show", "nowhere")
    assert out.returncode == 2
    assert f"nowhere.yaml: model.path {tmp_path}/x: no such folder" in out.stderr
    assert "read from the folder's config.json" in out.stderr
