"""LoRA adapters on the tiny hero: what changes, what is saved, resume, the locked shape, export,
QLoRA without CUDA, bf16 weights and gradient checkpointing. Real jobs, real peft, real files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import exitcodes
from core.training_queue import TrainingQueue
from tests.trainer.test_training import (FAST, ckpt_root, claim,
                                         kill_after_first_checkpoint_then_resume, make_realm,
                                         record)
from trainer.run_job import _StopFlag, run

LORA = {**FAST, "training": {**FAST["training"], "learning_rate": 1e-2},
        "adapter": {"method": "lora", "r": 8, "alpha": 16}}


def lora(**changes) -> dict:
    out = json.loads(json.dumps(LORA))
    for key, value in changes.items():
        section, name = key.split("__")
        out.setdefault(section, {})[name] = value
    return out


def realm_cmd(base: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", "--base-dir", str(base), *args],
                          capture_output=True, text=True, timeout=300)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def latest(paths) -> Path:
    return max(ckpt_root(paths).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def base_dir(paths) -> Path:
    return ckpt_root(paths).parent / "base"


def load_base(paths):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir(paths)).eval()


def with_adapter(paths, folder: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(paths), str(folder)).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two LoRA jobs of one campaign; the base folder's digest taken after the first."""
    paths = make_realm(tmp_path_factory.mktemp("lora") / "r", lora())
    first = claim(paths)
    assert run(paths, first) == exitcodes.COMPLETED, record(paths, first)["last_error"]
    base_after_first = digest(base_dir(paths))
    first_job = record(paths, first)
    TrainingQueue(paths.base).complete(TrainingQueue(paths.base).find(first_job["id"]))
    second = claim(paths, seed=1, name="e.jsonl")
    assert run(paths, second) == exitcodes.COMPLETED, record(paths, second)["last_error"]
    return paths, first_job, record(paths, second), base_after_first


def test_a_lora_checkpoint_holds_only_the_adapter_in_peft_format(trained):
    paths, job, _, _ = trained
    folder = ckpt_root(paths) / "step-12"
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt",
            "trainer_state.json", "COMPLETE", "tokenizer.json",
            "generation_config.json"} <= names
    assert "model.safetensors" not in names, "the frozen base is never copied into a checkpoint"
    weights = load_file(folder / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert config["base_model_name_or_path"] == str(base_dir(paths))
    adapter = job["metadata"]["data"]["adapter"]
    assert adapter["method"] == "lora" and 0 < adapter["trainable_params"] < \
        adapter["total_params"] / 5
    assert job["metadata"]["data"]["optimizer_state_dtype"] == "float32"


def test_only_adapter_weights_change_the_base_stays_bit_identical(trained):
    paths, _, _, base_after_first = trained
    assert digest(base_dir(paths)) == base_after_first, "the second job rewrote the base"
    base = load_file(base_dir(paths) / "model.safetensors")
    model = with_adapter(paths, latest(paths))
    trained_base = {k: v for k, v in model.get_base_model().state_dict().items()
                    if "lora_" not in k}
    for name, tensor in base.items():
        key = name.replace(".weight", ".base_layer.weight") \
            if name.replace(".weight", ".base_layer.weight") in trained_base else name
        assert torch.equal(trained_base[key], tensor), f"base weight {name} changed"
    lora_b = [v for k, v in model.state_dict().items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "lora_B starts at 0: it trained"


def test_the_next_lora_job_continues_from_the_adapter(trained):
    paths, first, second, _ = trained
    assert (first["start_step"], first["final_step"]) == (0, 12)
    assert (second["start_step"], second["final_step"]) == (12, 24)
    assert second["final_loss"] < first["metadata"]["data"]["loss_curve"][0]


def test_the_adapter_on_its_base_gives_the_campaigns_loss(trained):
    """What realm trained is exactly what PeftModel.from_pretrained(base, folder) loads: the
    final pass's loss on the same rows, recomputed from the files."""
    paths, _, second, _ = trained
    model = with_adapter(paths, latest(paths))
    plain = load_base(paths)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 250]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-4)


@pytest.mark.slow(seconds=25)
def test_a_lora_job_killed_and_resumed_ends_bit_identical(tmp_path):
    overrides = lora(training__max_steps=24)
    straight = make_realm(tmp_path / "straight", overrides)
    assert run(straight, claim(straight)) == exitcodes.COMPLETED

    killed = make_realm(tmp_path / "killed", overrides)
    kill_after_first_checkpoint_then_resume(killed, claim(killed), steps=24, wait=0.5)
    a = load_file(latest(straight) / "adapter_model.safetensors")
    b = load_file(latest(killed) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert digest(base_dir(straight)) == digest(base_dir(killed)), "same seed, same base"


def test_a_stopped_lora_job_resumes_to_the_same_adapter(tmp_path):
    straight = make_realm(tmp_path / "straight", lora())
    assert run(straight, claim(straight)) == exitcodes.COMPLETED
    stopped = make_realm(tmp_path / "stopped", lora())
    sidecar = claim(stopped)

    class StopAtStepFour(_StopFlag):
        calls = 0

        def __call__(self, *_):
            self.calls += 1
            return self.calls >= 4

    assert run(stopped, sidecar, stop=StopAtStepFour()) == exitcodes.STOPPED
    assert run(stopped, sidecar) == exitcodes.COMPLETED
    a = load_file(latest(straight) / "adapter_model.safetensors")
    b = load_file(latest(stopped) / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- the locked shape ------------------------------------------------------------------------

def _second_job_with(paths, realm_config: dict) -> dict:
    (paths.base / "config.json").write_text(json.dumps(realm_config))
    sidecar = claim(paths, seed=1, name="later.jsonl")
    code = run(paths, sidecar)
    return {**record(paths, sidecar), "code": code}


@pytest.mark.parametrize("change, diff", [
    ({"adapter": {"r": 4}}, "adapter.r: checkpoint has 8, campaign has 4"),
    ({"adapter": {"target_modules": "q_proj,v_proj"}},
     "adapter.target_modules: checkpoint has 'all-linear', campaign has 'q_proj,v_proj'"),
    ({"adapter": {"method": "none"}}, "adapter.method: checkpoint has 'lora', campaign has "
                                      "'none'"),
    ({"adapter": {"alpha": 8}}, "adapter.alpha: checkpoint has 16"),
])
def test_a_later_job_that_changes_the_adapter_shape_is_refused_with_the_diff(tmp_path, change,
                                                                             diff):
    paths = make_realm(tmp_path / "r", lora(training__max_steps=3))
    assert run(paths, claim(paths)) == exitcodes.COMPLETED
    before = digest(latest(paths))
    job = _second_job_with(paths, change)
    assert job["code"] == exitcodes.PERMANENT and job["kind"] == "config"
    assert diff in job["last_error"] and "create a new campaign" in job["last_error"]
    assert digest(latest(paths)) == before and latest(paths).name == "step-3"


def test_a_campaign_whose_base_folder_was_removed_is_refused_not_rebuilt(tmp_path):
    """A random-init hero's base lives in the campaign: built again (here from another seed)
    it would be another model under the trained adapter."""
    import shutil

    paths = make_realm(tmp_path / "r", lora(training__max_steps=3))
    assert run(paths, claim(paths)) == exitcodes.COMPLETED
    shutil.rmtree(base_dir(paths))
    job = _second_job_with(paths, {"training": {"seed": 7}})
    assert job["code"] == exitcodes.PERMANENT, job["last_error"]
    assert f"{base_dir(paths)} is missing" in job["last_error"]
    assert "Restore the folder from a backup" in job["last_error"]
    assert not base_dir(paths).exists() and latest(paths).name == "step-3"


@pytest.mark.parametrize("damage, error", [
    (lambda f: f.unlink(), "the adapter checkpoint has no adapter_model.safetensors (damaged)"),
    (lambda f: f.write_bytes(f.read_bytes()[:-64]), "adapter_model.safetensors: unreadable"),
], ids=["missing", "truncated"])
def test_a_damaged_adapter_checkpoint_is_refused_by_the_next_job_and_by_export(tmp_path, damage,
                                                                              error, capsys):
    from cli.main import main

    paths = make_realm(tmp_path / "r", lora(training__max_steps=3))
    assert run(paths, claim(paths)) == exitcodes.COMPLETED
    damage(latest(paths) / "adapter_model.safetensors")
    job = _second_job_with(paths, {})
    assert (job["code"], job["kind"]) == (exitcodes.PERMANENT, "config"), job["last_error"]
    assert error in job["last_error"] and "Retire the checkpoint" in job["last_error"]
    assert "trained without an adapter" not in job["last_error"]
    for merged in ([], ["--merged"]):
        code = main(["--base-dir", str(paths.base), "export", "c1", "--out",
                     str(tmp_path / "out"), *merged])
        assert code == 2 and error in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_adapter_dropout_may_change_between_jobs(tmp_path):
    paths = make_realm(tmp_path / "r", lora(training__max_steps=3))
    assert run(paths, claim(paths)) == exitcodes.COMPLETED
    job = _second_job_with(paths, {"adapter": {"dropout": 0.2}})
    assert job["code"] == exitcodes.COMPLETED, job["last_error"]
    assert (job["start_step"], job["final_step"]) == (3, 6)


def test_a_full_fine_tuning_campaign_refuses_an_adapter_later(tmp_path):
    paths = make_realm(tmp_path / "r", {**FAST, "training": {**FAST["training"], "max_steps": 3}})
    assert run(paths, claim(paths)) == exitcodes.COMPLETED
    job = _second_job_with(paths, {"adapter": {"method": "lora"}})
    assert job["code"] == exitcodes.PERMANENT
    assert "adapter.method: checkpoint has 'none', campaign has 'lora'" in job["last_error"]


def test_target_modules_that_the_model_lacks_are_a_config_error_naming_its_layers(tmp_path):
    paths = make_realm(tmp_path / "r", lora(adapter__target_modules="q_proj,qkv_proj"))
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.PERMANENT
    error = record(paths, sidecar)["last_error"]
    assert "adapter.target_modules: qkv_proj not found in the model" in error
    assert "q_proj" in error and "down_proj" in error and "lm_head" not in error


@pytest.mark.parametrize("setting, error", [
    ({"adapter__target_modules": "q_proj,norm"},
     "adapter.target_modules: norm names Qwen3RMSNorm modules, which an adapter cannot wrap"),
    ({"adapter__target_modules": "foo.q_proj"}, "adapter.target_modules: foo.q_proj not found"),
    # peft matches modules_to_save by the end of a module's name: this one matches nothing
    ({"adapter__modules_to_save": "foo.norm"}, "adapter.modules_to_save: foo.norm not found"),
    ({"adapter__modules_to_save": "layers"}, "adapter.modules_to_save 'layers': peft refuses"),
])
def test_modules_an_adapter_cannot_use_are_a_config_error_not_a_crash(tmp_path, setting, error):
    paths = make_realm(tmp_path / "r", lora(training__max_steps=3, **setting))
    sidecar = claim(paths)
    code = run(paths, sidecar)
    job = record(paths, sidecar)
    assert (code, job["kind"]) == (exitcodes.PERMANENT, "config"), job["last_error"]
    assert error in job["last_error"]
    assert not list(ckpt_root(paths).glob("step-*"))


def test_bad_adapter_values_are_refused_when_the_campaign_is_created(tmp_path):
    base = tmp_path / "r"
    assert realm_cmd(base, "init").returncode == 0
    out = realm_cmd(base, "campaign", "create", "c", "--hero", "tiny-qwen3", "--set",
                    "adapter.r=0", "--set", "adapter.target_modules=q_proj;rm -rf",
                    "--set", "adapter.method=dora")
    assert out.returncode == 2
    assert "adapter.r: must be between 1 and 4096" in out.stderr
    assert "adapter.target_modules" in out.stderr and "adapter.method" in out.stderr
    assert not (base / "campaigns" / "tiny-qwen3" / "c").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_qlora_without_cuda_is_a_config_error_with_exit_2(tmp_path):
    base = tmp_path / "r"
    assert realm_cmd(base, "init").returncode == 0
    out = realm_cmd(base, "campaign", "create", "q", "--hero", "tiny-qwen3", "--set",
                    "adapter.method=qlora")
    assert out.returncode == 2
    assert "adapter.method qlora needs a CUDA GPU" in out.stderr
    assert "adapter.method lora" in out.stderr, "names the fix"
    assert not (base / "campaigns" / "tiny-qwen3" / "q").exists()
    # a campaign set up elsewhere (or a later layer) asking for it: the job fails for good
    paths = make_realm(tmp_path / "r2", lora(adapter__method="qlora"))
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.PERMANENT
    job = record(paths, sidecar)
    assert job["kind"] == "config" and "needs a CUDA GPU" in job["last_error"]
    assert not list(ckpt_root(paths).glob("step-*"))


# --- export -----------------------------------------------------------------------------------

def test_export_merged_generates_the_same_tokens_as_base_plus_adapter(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths, _, _, _ = trained
    out = realm_cmd(paths.base, "export", "tiny-qwen3/c1", "--out", str(tmp_path / "merged"),
                    "--merged")
    assert out.returncode == 0, out.stderr
    assert "step 24" in out.stdout
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert not any((tmp_path / "merged" / n).exists() for n in ("trainer_state.pt", "COMPLETE"))
    reference = with_adapter(paths, latest(paths))
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([tok("12+30=", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-5)
        a = merged.generate(ids, max_new_tokens=12, do_sample=False)
        b = reference.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)
    assert merged.generation_config.eos_token_id == reference.generation_config.eos_token_id


def test_export_of_the_adapter_alone_loads_with_peft(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    paths, _, _, _ = trained
    out = realm_cmd(paths.base, "export", "c1", "--step", "12", "--out", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(ckpt_root(paths) / "step-12" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((tmp_path / "a" / "realm_export.json").read_text())["step"] == 12
    assert (tmp_path / "a" / "tokenizer.json").exists()
    assert model.get_base_model().config.vocab_size == 512


def test_export_refuses_a_missing_step_and_a_folder_in_use(trained, tmp_path):
    paths, _, _, _ = trained
    out = realm_cmd(paths.base, "export", "c1", "--step", "7", "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "no complete checkpoint step-7" in out.stderr
    assert "complete steps: 3, 6, 9, 12" in out.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    out = realm_cmd(paths.base, "export", "c1", "--out", str(busy))
    assert out.returncode == 2 and "not empty" in out.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".*tmp*")), "no scratch folder left behind"


def test_export_refuses_a_symlink_and_a_folder_among_the_campaigns(trained, tmp_path, capsys):
    """realm removes a step folder without COMPLETE and retires old checkpoints: an export
    there would vanish. A link is refused as the file it may point to would be."""
    from cli.main import main

    paths, _, _, _ = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    inside = [ckpt_root(paths) / "step-99", latest(paths) / "x", base_dir(paths).parent / "x"]
    for out, error in [(tmp_path / "link", "a symbolic link"),
                       *((p, "inside the realm's campaigns folder") for p in inside)]:
        assert main(["--base-dir", str(paths.base), "export", "c1", "--out", str(out)]) == 2
        assert error in capsys.readouterr().err
        assert not out.exists() or out.is_symlink()
    assert not list((tmp_path / "empty").iterdir())


def test_export_of_a_full_fine_tuning_campaign_is_the_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    paths = make_realm(tmp_path / "r", {**FAST, "training": {**FAST["training"], "max_steps": 3}})
    assert run(paths, claim(paths)) == exitcodes.COMPLETED
    out = realm_cmd(paths.base, "export", "tiny-qwen3/c1", "--out", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in names and not names & {"trainer_state.pt", "locked.json",
                                                         "realm_config.json", "COMPLETE"}
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    b = load_file(ckpt_root(paths) / "step-3" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


# --- dtype and memory settings ----------------------------------------------------------------

def test_bf16_weights_train_and_are_saved_in_bf16(tmp_path):
    overrides = {**FAST, "training": {**FAST["training"], "max_steps": 3, "param_dtype": "bf16"}}
    paths = make_realm(tmp_path / "r", overrides)
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.COMPLETED, record(paths, sidecar)["last_error"]
    job = record(paths, sidecar)
    assert job["metadata"]["data"]["param_dtype"] == "bf16"
    assert job["metadata"]["data"]["optimizer_state_dtype"] == "bfloat16"
    weights = load_file(latest(paths) / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_lora_on_a_bf16_base_keeps_the_base_bf16_and_trains_the_adapter_in_fp32(tmp_path):
    paths = make_realm(tmp_path / "r", lora(training__max_steps=3, training__param_dtype="bf16"))
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.COMPLETED, record(paths, sidecar)["last_error"]
    job = record(paths, sidecar)
    assert job["metadata"]["data"]["optimizer_state_dtype"] == "float32"
    weights = load_file(latest(paths) / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_gradient_checkpointing_keeps_fewer_activations_and_trains_the_same_weights(tmp_path):
    from core.job import Job
    from trainer.data.packing import collate
    from trainer.engine import Trainer
    from trainer.run_job import build_spec

    def run_with(name: str, checkpointing: bool) -> tuple[dict, int]:
        overrides = {**FAST, "training": {**FAST["training"], "max_steps": 3,
                                          "gradient_checkpointing": checkpointing}}
        paths = make_realm(tmp_path / name, overrides)
        sidecar = claim(paths)
        spec, _ = build_spec(paths, Job.from_dict(json.loads(sidecar.read_text())))
        probe = Trainer(spec)
        probe._setup_model()
        probe._setup_data()
        batch = collate(probe.rows[:4], probe.store, probe.tokenizer.pad_token_id)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            probe.loss_module(batch)
        assert run(paths, sidecar) == exitcodes.COMPLETED, record(paths, sidecar)["last_error"]
        return load_file(latest(paths) / "model.safetensors"), sum(saved)

    (a, plain_bytes), (b, ckpt_bytes) = run_with("plain", False), run_with("ckpt", True)
    assert ckpt_bytes < plain_bytes / 2, (ckpt_bytes, plain_bytes)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# --- the governor's memory with an adapter ----------------------------------------------------

def test_an_adapters_snapshot_is_the_adapter_and_a_disk_rollback_restores_it(tmp_path):
    """Two slots hold the adapter and its moments only; with a bound below one snapshot every
    rollback reads the last approved adapter checkpoint, and ends where memory does."""
    from tests.trainer.test_governor_engine import overrides, trainer_for

    ends = {}
    for mode, bound in (("two_slots", 100.0), ("disk", 1e-6)):
        paths = make_realm(tmp_path / mode, overrides(
            training={"max_steps": 12, "learning_rate": 1e-2}, checkpoint={"save_steps": 3},
            governor={"snapshot_steps": 3, "snapshot_memory_gb": bound},
            adapter={"method": "lora", "r": 4}))
        trainer = trainer_for(paths, claim(paths), {7: "nan"})
        result = trainer.train()
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        assert result.governor["snapshot_bytes"] < trainable * 4 * 3 + 4096, "adapter only"
        assert trainable * 4 * 3 < 1e6 and result.governor["rollbacks"] == 1
        ends[mode] = (result.governor["snapshot_mode"],
                      {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                       if p.requires_grad}, result.final_loss)
    assert (ends["two_slots"][0], ends["disk"][0]) == ("two_slots", "disk")
    a, b = ends["two_slots"][1], ends["disk"][1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ends["two_slots"][2] == ends["disk"][2]
