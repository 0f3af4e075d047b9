"""The governor's memory: snapshots hold only what training changes, their host memory is
bounded (two slots, one slot, or none and rollbacks go to disk), and a rollback to disk restores
exactly what a rollback from memory does."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from structlog.testing import capture_logs

from config.schema import GovernorConfig
from trainer.checkpoint import (WeightsMismatch, clean_incomplete, complete_checkpoints,
                                initial_weights_dir, load_trainable, save_trainable)
from trainer.distributed import Group
from trainer.governor import (DISK, GB, ONE_SLOT, TWO_SLOTS, Governor, GovernorGuard,
                              snapshot_bytes)
from trainer.state import TrainState
from tests.trainer.test_governor_engine import overrides, trainer_for
from tests.trainer.test_training import ckpt_root, claim, make_realm


def freeze_all_but_layer(model, keep: int = 1) -> dict[str, torch.Tensor]:
    """Only ``model.layers.<keep>`` trains; returns its parameters by name."""
    prefix = f"model.layers.{keep}."
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefix))
    return {n: p for n, p in model.named_parameters() if n.startswith(prefix)}


def step(model, optimizer) -> None:
    ids = torch.arange(16).reshape(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


# --- what a snapshot holds ------------------------------------------------------------------

def test_a_snapshot_of_a_mostly_frozen_model_holds_only_the_trainable_layer(tiny_model):
    layer = freeze_all_but_layer(tiny_model)
    numel = sum(p.numel() for p in layer.values())
    assert numel < sum(p.numel() for p in tiny_model.parameters()) / 4
    optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad])
    expected = numel * 4 * 3 + 4 * len(layer)  # weights + 2 AdamW moments (fp32), step scalars
    assert snapshot_bytes(tiny_model, optimizer) == expected, "before the moments exist"
    step(tiny_model, optimizer)
    assert snapshot_bytes(tiny_model, optimizer) == expected, "once they do"
    snap = Governor(GovernorConfig(), 512).snapshot(1, tiny_model, optimizer)
    assert set(snap.model) == set(layer), "no frozen weight, no buffer"
    assert snap.nbytes == expected, "the estimate is what a snapshot really copies"


def test_a_restore_writes_back_exactly_the_trainable_parameters(tiny_model):
    layer = freeze_all_but_layer(tiny_model)
    optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad],
                                  lr=0.1)
    g = Governor(GovernorConfig(), 512)
    g.snapshot(0, tiny_model, optimizer)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    step(tiny_model, optimizer)
    assert not all(torch.equal(before[n], p) for n, p in layer.items()), "the step trained"
    g.restore(tiny_model, optimizer)
    assert all(torch.equal(before[n], p) for n, p in tiny_model.named_parameters())
    tiny_model.model.layers[2].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"missing \['model.layers.2.mlp.up_proj.weight'\]"):
        g.restore(tiny_model, optimizer)


def test_load_trainable_loads_only_trainable_parameters_and_names_what_is_missing(
        tmp_path, tiny_model):
    layer = freeze_all_but_layer(tiny_model)
    save_trainable(tiny_model, tmp_path / "w")
    saved = {n: p.detach().clone() for n, p in layer.items()}
    frozen = tiny_model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(1.0)
    load_trainable(tiny_model, tmp_path / "w")
    assert all(torch.equal(saved[n], p) for n, p in layer.items())
    assert torch.equal(tiny_model.model.embed_tokens.weight, frozen + 1), "frozen: untouched"
    tiny_model.model.norm.weight.requires_grad_(True)
    with pytest.raises(WeightsMismatch, match="lacks 1 trainable parameters.*model.norm.weight"):
        load_trainable(tiny_model, tmp_path / "w")


def test_initial_weights_of_a_dead_process_are_cleaned_and_a_live_ones_kept(tmp_path):
    dead = initial_weights_dir(tmp_path, "job-1", 999999)
    live = initial_weights_dir(tmp_path, "job-2", os.getpid())
    for folder in (dead, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    assert clean_incomplete(tmp_path) == [dead] and live.is_dir()


# --- the mode ---------------------------------------------------------------------------------

def started_guard(model, optimizer, gb):
    prepared = []
    trainer = SimpleNamespace(model=model, optimizer=optimizer, scheduler=None, group=Group(),
                              state=TrainState(), prepare_disk_rollback=lambda: prepared.append(1),
                              cfg=SimpleNamespace(training=SimpleNamespace(learning_rate=0.1)))
    guard = GovernorGuard(GovernorConfig(snapshot_memory_gb=gb), 512)
    with capture_logs() as logs:
        guard.start(trainer)
    return guard, [e for e in logs if e["event"] == "governor.snapshot_mode"], prepared


@pytest.mark.parametrize("factor,mode,in_memory", [(2.0, TWO_SLOTS, True), (1.5, ONE_SLOT, True),
                                                   (0.99, DISK, False)])
def test_the_bound_chooses_the_mode(tiny_model, factor, mode, in_memory):
    optimizer = torch.optim.AdamW(tiny_model.parameters())
    size = snapshot_bytes(tiny_model, optimizer)
    guard, events, prepared = started_guard(tiny_model, optimizer, factor * size / GB)
    assert len(events) == 1, "one event"
    event = events[0]
    assert (event["mode"], event["snapshot_bytes"]) == (mode, size)
    assert event["bound_bytes"] == int(factor * size)
    assert "governor.snapshot_memory_gb" in event["note"]
    counts = guard.counts()
    assert (counts["snapshot_mode"], counts["snapshot_bytes"]) == (mode, size)
    assert (guard.governor.last_good is not None) is in_memory
    assert bool(prepared) is (mode != TWO_SLOTS), "the trainer keeps the start on disk"
    if mode == DISK:
        assert "over the" in event["note"] and "checkpoint on disk" in event["note"]


def test_the_default_bound_is_a_quarter_of_the_available_memory(tiny_model):
    import psutil

    optimizer = torch.optim.AdamW(tiny_model.parameters())
    _, (event,), _ = started_guard(tiny_model, optimizer, None)
    quarter = psutil.virtual_memory().available / 4
    assert event["bound_bytes"] == pytest.approx(quarter, rel=0.05)
    assert "a quarter of the memory available" in event["note"]


def test_one_slot_has_no_last_good_in_memory_while_a_candidate_awaits_its_verdict(tiny_model):
    optimizer = torch.optim.AdamW(tiny_model.parameters())
    g = Governor(GovernorConfig(), 512, mode=ONE_SLOT)
    start = g.snapshot(0, tiny_model, optimizer, initial=True)
    assert g.last_good is start
    g.propose(3, tiny_model, optimizer)
    assert g.last_good is None and g.candidate.step == 3, "the slot was overwritten"
    g.discard()
    assert g.last_good is None and g.candidate is None
    g.propose(6, tiny_model, optimizer)
    assert g.approve().step == 6 and g.last_good.step == 6


def test_a_rollback_from_disk_backs_off_from_the_learning_rate_of_the_restored_state():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    g = Governor(GovernorConfig(lr_backoff=0.5), 512, mode=DISK)
    assert g.snapshot(0, model, optimizer, initial=True) is None, "nothing kept in memory"
    g.propose(3, model, optimizer)
    g.approve()
    # the trainer restored state 3 from its checkpoint: the learning rate it was trained with
    event = g.rolled_back(g.check(math.nan), 5, 3, optimizer, batches_skipped=2)
    assert (event.snapshot_step, event.batches_skipped, event.new_lr) == (3, 2, 0.05)
    g.propose(9, model, optimizer)  # trained on at 0.05
    g.approve()
    optimizer.param_groups[0]["lr"] = 0.05  # restored from step 9's checkpoint
    assert g.rolled_back(g.check(math.nan), 11, 9, optimizer).new_lr == pytest.approx(0.025)
    optimizer.param_groups[0]["lr"] = 0.1  # restored from the start
    assert g.rolled_back(g.check(math.nan), 12, 0, optimizer).new_lr == pytest.approx(0.0125)
    assert g.counts()["rollbacks"] == 3 and g.counts()["batches_skipped"] == 2


# --- rollbacks to disk on the real engine -------------------------------------------------------

def tiny_size(tiny_model) -> int:
    return snapshot_bytes(tiny_model, torch.optim.AdamW(tiny_model.parameters()))


def job(base, gb, plan, steps=12, head=False):
    """A job with checkpoint and snapshot points every 3 steps, governor.snapshot_memory_gb =
    gb; with ``head`` it continues from a first job's checkpoint."""
    paths = make_realm(base, overrides(training={"max_steps": steps},
                                       checkpoint={"save_steps": 3},
                                       governor={"snapshot_steps": 3, "snapshot_memory_gb": gb}))
    if head:
        from tests.trainer.test_governor_engine import add_job, head_job

        head_job(paths)
        trainer = trainer_for(paths, add_job(paths, "x.jsonl", n=120), plan)
    else:
        trainer = trainer_for(paths, claim(paths), plan)
    result = trainer.train()
    return trainer, result, paths


def summary(trainer, result) -> dict:
    g = trainer.guard.governor
    return {"events": [(e.reason, e.step, e.snapshot_step, e.batches_skipped, e.new_lr)
                       for e in g.events],
            "final_step": result.final_step, "final_loss": result.final_loss,
            "campaign_tokens": trainer.state.campaign_tokens,
            "lr": trainer.optimizer.param_groups[0]["lr"]}


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
    """The reference: two slots, a NaN at step 7 rejects state 6, back to state 3."""
    trainer, result, _ = job(tmp_path_factory.mktemp("mem") / "r", 100.0, {7: "nan"})
    assert trainer.guard.governor.mode == TWO_SLOTS
    return summary(trainer, result), {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("mode", [ONE_SLOT, DISK])
def test_a_rollback_to_disk_ends_with_the_same_weights_as_one_from_memory(
        tmp_path, tiny_model, in_memory, mode):
    size = tiny_size(tiny_model)
    gb = 1e-6 if mode == DISK else 1.5 * size / GB
    trainer, result, paths = job(tmp_path / "r", gb, {7: "nan"})
    assert result.governor["snapshot_mode"] == mode
    assert result.governor["snapshot_bytes"] == size
    reference, weights = in_memory
    got = summary(trainer, result)
    assert got["events"][0][:4] == ("nan", 7, 3, 4), "back to state 3, 4 microbatches skipped"
    assert got == reference
    live = trainer.model.state_dict()
    assert live.keys() == weights.keys() and all(torch.equal(live[k], weights[k])
                                                 for k in live)
    assert not list(ckpt_root(paths).glob(".initial-*")), "nothing temporary left"


def test_a_rollback_to_disk_before_any_checkpoint_restores_the_initial_weights(tmp_path):
    """A fresh campaign, nothing on disk yet: back to the initial weights, fresh moments and the
    job's schedule as it started (job scope: the scheduler's own step counter matters), as a
    rollback to the initial snapshot in memory does."""
    ends = {}
    for mode, gb in ((TWO_SLOTS, 100.0), (DISK, 1e-6)):
        paths = make_realm(tmp_path / mode, overrides(
            training={"max_steps": 5, "schedule_scope": "job"}, checkpoint={"save_steps": 100},
            governor={"snapshot_steps": 100, "snapshot_memory_gb": gb}))
        trainer = trainer_for(paths, claim(paths), {3: "nan"})
        restored = after_rollback(trainer, paths)
        result = trainer.train()
        assert result.governor["snapshot_mode"] == mode and result.governor["rollbacks"] == 1
        weights, moments, temporary = restored[0]
        initial = trainer.guard.approved[0]
        assert weights and all(torch.equal(initial[n], w) for n, w in weights.items())
        assert moments == 0, "fresh AdamW moments, as the job started"
        if mode == DISK:
            assert len(temporary) == 1
            assert temporary[0].startswith(f".initial-{trainer.spec.job_id}.tmp-")
        assert not list(ckpt_root(paths).glob(".initial-*")), "removed at the job's end"
        event = trainer.guard.governor.events[0]
        assert (event.snapshot_step, event.batches_skipped) == (0, 3)
        assert [c.path.name for c in complete_checkpoints(ckpt_root(paths))] == ["step-5"]
        ends[mode] = summary(trainer, result), trainer.model.state_dict()
    (s1, w1), (s2, w2) = ends[TWO_SLOTS], ends[DISK]
    assert s1 == s2 and all(torch.equal(w1[k], w2[k]) for k in w1)


def after_rollback(trainer, paths) -> list:
    """Records (trainable weights, optimizer states, temporary folders) after each rollback."""
    restored, rollback = [], trainer.guard.rollback

    def wrapped(decision, state):
        out = rollback(decision, state)
        restored.append(({n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                         len(trainer.optimizer.state),
                         [p.name for p in ckpt_root(paths).glob(".initial-*")]))
        return out

    trainer.guard.rollback = wrapped
    return restored


def test_a_continuing_job_rolls_back_to_its_start_checkpoint_with_the_carried_moments(tmp_path):
    """Before its first checkpoint, a job that continues the campaign rolls back to the
    checkpoint it started from: weights and AdamW moments as a rollback from memory has them."""
    ends = {}
    for mode, gb in ((TWO_SLOTS, 100.0), (DISK, 1e-6)):
        trainer, result, _ = job(tmp_path / mode, gb, {2: "nan"}, steps=6, head=True)
        assert result.governor["snapshot_mode"] == mode
        assert [e.snapshot_step for e in trainer.guard.governor.events] == [6]
        ends[mode] = (summary(trainer, result), trainer.model.state_dict(),
                      trainer.optimizer.state_dict()["state"])
    (s1, w1, o1), (s2, w2, o2) = ends[TWO_SLOTS], ends[DISK]
    assert s1 == s2 and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert o1.keys() == o2.keys() and all(torch.equal(o1[i]["exp_avg"], o2[i]["exp_avg"])
                                          for i in o1)
    assert math.isfinite(s1["final_loss"])
