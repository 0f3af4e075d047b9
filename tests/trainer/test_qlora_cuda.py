"""QLoRA and the bf16 paths on a GPU (run by scripts/gpu_check.sh when a GPU is lent; on a
machine without CUDA and bitsandbytes these cannot run, and tests/trainer/test_adapters.py checks
the refusal instead)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from core import exitcodes
from core.job import Job
from tests.trainer.test_adapters import latest, lora, realm_cmd
from tests.trainer.test_training import claim, make_realm, record
from trainer.run_job import build_spec, run


def _bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _bitsandbytes()),
                                reason="QLoRA needs CUDA and bitsandbytes")


def test_a_qlora_job_trains_a_4_bit_base_and_saves_the_adapter(tmp_path):
    from trainer.engine import Trainer

    paths = make_realm(tmp_path / "r", lora(adapter__method="qlora", training__max_steps=12))
    sidecar = claim(paths)
    spec, _ = build_spec(paths, Job.from_dict(json.loads(sidecar.read_text())))
    probe = Trainer(spec)
    probe._setup_model()
    layer = probe.lm.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit", type(layer.base_layer)
    assert probe.model.device.type == "cuda"
    del probe
    assert run(paths, sidecar) == exitcodes.COMPLETED, record(paths, sidecar)["last_error"]
    job = record(paths, sidecar)
    curve = job["metadata"]["data"]["loss_curve"]
    assert curve[-1] < curve[0], curve
    assert job["metadata"]["data"]["memory"]["cuda_peak_bytes"] > 0
    weights = load_file(latest(paths) / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    out = realm_cmd(paths.base, "export", "c1", "--merged", "--out", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.tensor([[5, 17, 99, 3]])
    assert torch.isfinite(merged(ids).logits).all()


def test_lora_on_a_bf16_base_on_cuda(tmp_path):
    paths = make_realm(tmp_path / "r", lora(training__param_dtype="bf16", training__max_steps=12))
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.COMPLETED, record(paths, sidecar)["last_error"]
    data = record(paths, sidecar)["metadata"]["data"]
    assert data["precision"] == "bf16" and data["param_dtype"] == "bf16"
    assert data["optimizer_state_dtype"] == "float32"
    assert data["memory"]["cuda_peak_bytes"] > 0
    print("lora bf16 on cuda:", json.dumps(data["memory"]))


def test_full_fine_tuning_in_bf16_on_cuda(tmp_path):
    paths = make_realm(tmp_path / "r", lora(adapter__method="none", training__param_dtype="bf16",
                                            training__max_steps=12))
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.COMPLETED, record(paths, sidecar)["last_error"]
    data = record(paths, sidecar)["metadata"]["data"]
    assert data["optimizer_state_dtype"] == "bfloat16"
    weights = load_file(latest(paths) / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
