"""The optimizer across a campaign: no weight decay on biases, norms and embeddings; one warmup
per campaign (or per job), a warmup-stable-decay over a token budget; AdamW moments carried
from the checkpoint a job continues from. Whole jobs run on tiny-qwen3 with the real engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import structlog
import torch
from safetensors.torch import load_file

from core.job import Job
from core.training_queue import TrainingQueue
from trainer.checkpoint import lineage_head
from config.schema import TrainingConfig
from trainer.data.synthetic import write_dataset
from trainer.engine import StopRequested, Trainer
from trainer.optim import Schedule, moments_problem, param_groups
from trainer.run_job import build_spec
from tests.trainer.test_governor_engine import overrides, trainer_for
from tests.trainer.test_training import ckpt_root, claim, make_realm

PEAK = 1e-3  # training.learning_rate of the tiny hero


def add_job(paths, name: str, n: int = 80, seed: int = 0, **sections) -> Path:
    """Queue and claim one job (its own config overrides, as a job sidecar carries them)."""
    src = write_dataset(paths.base / name, n, seed)
    queue = TrainingQueue(paths.base)
    queue.add(src, overrides=json.loads(json.dumps(sections)) or None)
    job = queue.claim_next()
    return paths.base / (job.dataset_path + ".job.json")


class Recorder(Trainer):
    """The real trainer, noting the learning rate of every step and the AdamW state it holds
    when training starts."""

    def __init__(self, spec, **kw):
        super().__init__(spec, **kw)
        self.lrs: list[float] = []
        self.start_moments: dict = {}

    def _setup_guard(self) -> None:  # runs right after _restore
        self.start_moments = {i: {k: v.clone() for k, v in s.items()}
                              for i, s in self.optimizer.state_dict()["state"].items()}
        super()._setup_guard()

    def after_step(self, m) -> None:
        self.lrs.append(m.lr)
        super().after_step(m)


def train(paths, sidecar: Path) -> Recorder:
    spec, _ = build_spec(paths, Job.from_dict(json.loads(sidecar.read_text())))
    trainer = Recorder(spec)
    trainer.train()
    return trainer


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


# --- 1. parameter groups ------------------------------------------------------------------

def _decay_step(model, no_decay: str) -> dict[str, torch.Tensor]:
    """One AdamW step with zero gradients: only weight decay moves a parameter."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups, _ = param_groups(model, 0.5, no_decay)
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return before


def test_norms_and_the_tied_embedding_do_not_decay_while_linear_weights_shrink(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight, "tiny-qwen3 ties"
    before = _decay_step(tiny_model, "bias,norm,embedding")
    after = dict(tiny_model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_norm.weight"):
        assert torch.equal(after[name], before[name]), f"{name} decayed"
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(after[name], before[name] * (1 - 0.1 * 0.5)), "a linear weight decays"


def test_no_decay_none_decays_every_parameter(tiny_model):
    groups, summary = param_groups(tiny_model, 0.5, "none")
    assert len(groups) == 1 and summary["no_decay_params"] == 0
    before = _decay_step(tiny_model, "none")
    for name, p in tiny_model.named_parameters():
        assert torch.allclose(p, before[name] * 0.95), f"{name} did not decay"


def test_a_subset_exempts_only_its_kinds(tiny_model):
    groups, summary = param_groups(tiny_model, 0.1, "norm")
    exempt = {id(p) for p in groups[1]["params"]}
    assert id(tiny_model.model.embed_tokens.weight) not in exempt
    assert id(tiny_model.model.norm.weight) in exempt
    assert summary["no_decay_kinds"] == {"norm": summary["no_decay_params"]}
    total = sum(1 for _ in tiny_model.parameters())
    assert summary["decay_params"] + summary["no_decay_params"] == total, "each param once"


def test_no_decay_takes_none_or_known_kinds_only(tmp_path):
    from core.errors import ConfigError

    paths = make_realm(tmp_path / "r")
    sidecar = add_job(paths, "a.jsonl", training={"no_decay": "bias,norms"})
    with pytest.raises(ConfigError, match="training.no_decay: 'bias,norms' is not none or a "
                       "comma-separated subset of bias, norm, embedding"):
        build_spec(paths, Job.from_dict(json.loads(sidecar.read_text())))
    sidecar = add_job(paths, "b.jsonl", training={"no_decay": "none"})
    spec, _ = build_spec(paths, Job.from_dict(json.loads(sidecar.read_text())))
    assert spec.config.training.no_decay is None


# --- 2. the schedule as a function --------------------------------------------------------

def schedule(**kw) -> Schedule:
    return Schedule.of(TrainingConfig(**{"warmup_steps": 4, "min_lr_ratio": 0.1, **kw}), 100)


def test_campaign_scope_warms_up_once_then_holds_the_peak():
    s = schedule(schedule_scope="campaign")
    assert [s.campaign_factor(i, 0) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert s.campaign_factor(10_000, 10 ** 12) == 1.0, "no budget: constant forever"


def test_warmup_stable_decay_over_the_token_budget():
    s = schedule(schedule_scope="campaign", campaign_tokens=1000, decay_fraction=0.2)
    factors = [s.campaign_factor(50, tokens) for tokens in range(0, 1300, 10)]
    assert all(f == 1.0 for f in factors[:81]), "stable until 80% of the budget"
    assert all(a >= b for a, b in zip(factors, factors[1:])), "then never rises"
    assert math.isclose(s.campaign_factor(50, 900), 0.55), "half way down the cosine"
    assert factors[100:] == [0.1] * len(factors[100:]), "at the floor from the budget on"
    assert s.exhausted(1000) and not s.exhausted(999)


def test_job_scope_is_the_per_job_cosine():
    s = schedule(schedule_scope="job")
    assert s.job_factor(0) == 0.25 and s.job_factor(4) == 1.0
    assert math.isclose(s.job_factor(100), 0.1)


# --- 3. schedule across jobs ----------------------------------------------------------------

@pytest.mark.parametrize("scope", ["campaign", "job"])
def test_the_second_job_rewarms_only_with_job_scope(tmp_path, scope):
    paths = make_realm(tmp_path / "r", overrides(training={
        "max_steps": 4, "warmup_steps": 3, "schedule_scope": scope, "schedule": "constant"}))
    first = train(paths, add_job(paths, "a.jsonl"))
    assert first.lrs == pytest.approx([PEAK / 3, 2 * PEAK / 3, PEAK, PEAK])
    second = train(paths, add_job(paths, "b.jsonl", seed=1))
    assert second.state.job_start_step == 4
    if scope == "campaign":
        assert second.lrs == pytest.approx([PEAK] * 4), "no second warmup"
    else:
        assert second.lrs == pytest.approx(first.lrs), "every job warms up again"
    sched = second.data_stats["schedule"]
    assert sched["scope"] == scope and sched["lr_start"] == pytest.approx(second.lrs[0])
    assert sched["lr_end"] == pytest.approx(second.lrs[-1])


def test_a_token_budget_decays_across_jobs_and_stays_at_the_floor(tmp_path):
    paths = make_realm(tmp_path / "r", overrides(training={"max_steps": 4, "warmup_steps": 2}))
    first = train(paths, add_job(paths, "a.jsonl"))
    t1 = first.state.campaign_tokens
    assert t1 == first.stats.tokens > 0, "the campaign counter counts trained tokens"
    assert lineage_head(ckpt_root(paths)).state()["campaign_tokens_seen"] == t1
    budget = {"campaign_tokens": 3 * t1, "decay_fraction": 2 / 3}  # decay over [t1, 3 t1]
    with structlog.testing.capture_logs() as logs:
        second = train(paths, add_job(paths, "b.jsonl", seed=1, training=budget))
        third = train(paths, add_job(paths, "c.jsonl", seed=2,
                                     training={**budget, "max_steps": 10}))
    lrs = second.lrs + third.lrs
    assert lrs[0] == pytest.approx(PEAK), "the decay starts where job 1 ended"
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), f"not monotone: {lrs}"
    assert len({lr for lr in lrs if 0.1 * PEAK < lr < PEAK}) >= 3, f"no gradual decay: {lrs}"
    assert lrs[-1] == pytest.approx(0.1 * PEAK), "at the floor once the budget is spent"
    assert len(events(logs, "lr.budget_exhausted")) >= 1
    assert third.data_stats["schedule"]["campaign_tokens_seen"] == third.state.campaign_tokens


def test_a_stopped_campaign_job_with_a_budget_resumes_bitwise(tmp_path):
    budgeted = overrides(training={"max_steps": 8, "warmup_steps": 2, "campaign_tokens": 2500,
                                   "decay_fraction": 0.9})
    straight = make_realm(tmp_path / "straight", budgeted)
    reference = train(straight, claim(straight))
    assert reference.lrs[-1] < reference.lrs[2], "the decay runs inside this job"

    stopped = make_realm(tmp_path / "stopped", budgeted)
    sidecar = claim(stopped)
    spec, _ = build_spec(stopped, Job.from_dict(json.loads(sidecar.read_text())))
    calls = []
    with pytest.raises(StopRequested):
        Trainer(spec, stop_requested=lambda: calls.append(1) or len(calls) >= 3).train()
    resumed = train(stopped, sidecar)
    assert resumed.resumed_from == 3
    assert resumed.lrs == reference.lrs[3:], "the same learning rates after the resume"
    a = load_file(lineage_head(ckpt_root(straight)).path / "model.safetensors")
    b = load_file(lineage_head(ckpt_root(stopped)).path / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_rollback_takes_the_campaign_token_counter_back(tmp_path):
    paths = make_realm(tmp_path / "r", overrides(checkpoint={"save_steps": 100},
                                                 governor={"snapshot_steps": 3}))
    trainer = trainer_for(paths, claim(paths), {5: "nan"})
    tokens = []
    after_step = trainer.after_step

    def note(m):
        tokens.append(m.tokens)
        after_step(m)

    trainer.after_step = note
    trainer.train()
    [event] = trainer.guard.governor.events
    assert event.snapshot_step == 3, "states 4 and 5 were discarded"
    assert trainer.state.campaign_tokens == sum(tokens) - tokens[3] - tokens[4]
    # the back-off still holds under the campaign schedule (constant after warmup 2)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(PEAK * 0.5)


# --- 4. AdamW moments across jobs -----------------------------------------------------------

@pytest.mark.parametrize("carry", [True, False])
def test_the_next_job_starts_from_the_saved_moments_only_when_carried(tmp_path, carry):
    paths = make_realm(tmp_path / "r", overrides(training={"max_steps": 3,
                                                           "carry_optimizer": carry}))
    train(paths, add_job(paths, "a.jsonl"))
    saved = lineage_head(ckpt_root(paths)).torch_state()["optimizer"]
    second = train(paths, add_job(paths, "b.jsonl", seed=1,
                                  training={"adam_beta2": 0.99, "weight_decay": 0.1}))
    if not carry:
        assert second.start_moments == {}, "fresh moments"
        return
    assert second.start_moments.keys() == saved["state"].keys() and saved["state"]
    for i, moments in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(second.start_moments[i][key], moments[key]), (i, key)
    decayed, exempt = second.optimizer.param_groups
    assert decayed["betas"] == (0.9, 0.99) and decayed["weight_decay"] == 0.1, \
        "hyperparameters come from this job's config, not the checkpoint"
    assert exempt["weight_decay"] == 0.0


def test_moments_that_do_not_fit_are_dropped_with_a_warning(tmp_path):
    # written with one group for every parameter (as before realm exempted norms)
    paths = make_realm(tmp_path / "r", overrides(training={"max_steps": 2, "no_decay": "none"}))
    train(paths, add_job(paths, "a.jsonl"))
    with structlog.testing.capture_logs() as logs:
        second = train(paths, add_job(paths, "b.jsonl", seed=1,
                                      training={"no_decay": "bias,norm,embedding"}))
    [warning] = events(logs, "optimizer.moments_not_carried")
    assert "parameter groups hold" in warning["reason"]
    assert second.start_moments == {} and second.state.job_step == 2


def test_moments_problem_names_a_shape_mismatch(tiny_model):
    groups, _ = param_groups(tiny_model, 0.0, "none")
    opt = torch.optim.AdamW(groups)
    for p in tiny_model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    assert moments_problem(saved, opt) is None
    saved["state"][0]["exp_avg"] = torch.zeros(3)
    assert "parameter 0: saved exp_avg has shape (3,)" in moments_problem(saved, opt)
    assert moments_problem({}, opt) == "the checkpoint holds no optimizer state"
