"""Evaluation during a job (validation loss every N steps, greedy samples), the two throughputs
(processed and trained tokens per second) and the precision a job really used."""

from __future__ import annotations

import json
from pathlib import Path

import structlog
import torch

from core import exitcodes
from trainer.attention import use_packed_attention
from trainer.metrics import STEP_METRICS, RunningStats, StepMetrics, status_payload
from trainer.run_job import run
from tests.trainer.test_governor_engine import overrides
from tests.trainer.test_training import claim, make_realm, record

GOLDEN = Path(__file__).parent.parent / "golden" / "step_metrics.json"


def log_events(err: str, name: str | None = None) -> list[dict]:
    """The job log's JSON lines (run() logs to stderr), optionally of one event."""
    out = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return [e for e in out if name is None or e["event"] == name]


def test_step_metric_names_match_the_golden():
    assert list(STEP_METRICS) == json.loads(GOLDEN.read_text())["step_metrics"]
    m = StepMetrics(3, 2.0, 2.1, 0.5, 1e-3, tokens=40, processed_tokens=100,
                    tokens_per_sec=1000.0, trained_tokens_per_sec=400.0, input_wait_ms=1.0,
                    h2d_copy_ms=0.0, step_latency_ms=100.0)
    stats = RunningStats()
    stats.record(m)
    payload = status_payload("j", m, job_step=3, total_steps=9, stats=stats,
                             evaluation={"step": 2, "eval_loss": 2.5})
    assert set(STEP_METRICS) <= set(payload["metrics"])
    assert payload["eval"] == {"step": 2, "eval_loss": 2.5}
    assert (stats.tokens_per_sec_avg, stats.trained_tokens_per_sec_avg) == (1000.0, 400.0)


def test_a_job_evaluates_every_n_steps_and_writes_samples(tmp_path, capsys):
    paths = make_realm(tmp_path / "r", overrides(
        training={"max_steps": 6}, data={"val_fraction": 0.2},
        eval={"every_steps": 2, "sample_prompts": "prompts.txt", "sample_max_new_tokens": 4}))
    (paths.base / "prompts.txt").write_text('What is 2 + 2?\n\n"two\\nlines"\n')
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.COMPLETED
    job, err = record(paths, sidecar), capsys.readouterr().err
    ev = job["metadata"]["data"]["eval"]
    assert [step for step, _ in ev["losses"]] == [2, 4, 6], "every 2 steps, the last = final"
    assert ev["last"] == {"step": 6, "eval_loss": ev["losses"][-1][1]}
    assert ev["last"]["eval_loss"] == round(job["final_val_loss"], 6)
    status = json.loads((paths.status / "jobs" / f"{job['id']}.progress.json").read_text())
    assert status["eval"] == ev["last"]
    assert [e["step"] for e in log_events(err, "eval.loss")] == [2, 4, 6]
    samples = log_events(err, "eval.sample")
    assert [s["prompt"] for s in samples] == ["What is 2 + 2?", "two\nlines"] * 3
    assert all(isinstance(s["completion"], str) for s in samples)
    progress = [e["line"] for e in log_events(err, "train.progress")]
    assert "| val " in progress[-1] and " trained) " in progress[-1]


def test_processed_and_trained_throughput_are_both_recorded(tmp_path):
    paths = make_realm(tmp_path / "r", overrides(training={"max_steps": 3}))
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.COMPLETED
    job = record(paths, sidecar)
    # prompts and system turns are processed but carry no loss
    assert job["tokens_per_sec_avg"] > job["trained_tokens_per_sec_avg"] > 0
    status = json.loads((paths.status / "jobs" / f"{job['id']}.progress.json").read_text())
    assert status["state"] == "finished"
    assert job["metadata"]["data"]["schedule"]["scope"] == "campaign"


def test_a_missing_prompts_file_is_a_config_error_naming_key_and_path(tmp_path):
    paths = make_realm(tmp_path / "r", overrides(eval={"sample_prompts": "nowhere.txt"}))
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.PERMANENT
    job = record(paths, sidecar)
    assert job["kind"] == "config"
    assert "eval.sample_prompts" in job["last_error"]
    assert str(paths.base / "nowhere.txt") in job["last_error"]


def test_every_steps_without_a_validation_split_warns_once(tmp_path, capsys):
    paths = make_realm(tmp_path / "r", overrides(training={"max_steps": 4},
                                                 eval={"every_steps": 2}))
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.COMPLETED
    err = capsys.readouterr().err
    assert len(log_events(err, "eval.no_validation_split")) == 1
    assert log_events(err, "eval.loss") == []
    assert "eval" not in record(paths, sidecar)["metadata"]["data"]


def test_bf16_on_cpu_warns_and_the_record_says_fp32(tmp_path, capsys):
    paths = make_realm(tmp_path / "r", overrides(training={"max_steps": 2, "precision": "bf16"}))
    sidecar = claim(paths)
    assert run(paths, sidecar) == exitcodes.COMPLETED
    [warning] = log_events(capsys.readouterr().err, "training.precision_unavailable")
    assert (warning["requested"], warning["used"], warning["level"]) == ("bf16", "fp32",
                                                                          "warning")
    assert record(paths, sidecar)["metadata"]["data"]["precision"] == "fp32"


@torch.no_grad()
def test_greedy_generation_is_the_same_with_the_packed_attention(tiny_model, tokenizer):
    ids = torch.tensor([tokenizer("What is 12 + 30?", add_special_tokens=False)["input_ids"]])

    def greedy():
        return tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)

    reference = greedy()
    use_packed_attention(tiny_model)
    assert tiny_model.config._attn_implementation == "realm_packed"
    assert torch.equal(greedy(), reference)


def test_eval_samples_are_logged_by_the_trainer_itself(tmp_path):
    """The Trainer API (no child protocol): samples at the end when every_steps is unset."""
    from core.job import Job
    from trainer.engine import Trainer
    from trainer.run_job import build_spec

    paths = make_realm(tmp_path / "r", overrides(training={"max_steps": 2},
                                                 eval={"sample_prompts": str(tmp_path / "p")}))
    (tmp_path / "p").write_text("hello\n")
    sidecar = claim(paths)
    spec, _ = build_spec(paths, Job.from_dict(json.loads(sidecar.read_text())))
    with structlog.testing.capture_logs() as logs:
        Trainer(spec).train()
    samples = [e for e in logs if e["event"] == "eval.sample"]
    assert [(s["prompt"], s["step"]) for s in samples] == [("hello", 2)]
