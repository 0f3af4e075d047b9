"""The governor's behaviours, ported from esper-lite's Tolaria tests and extended."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from config.schema import GovernorConfig
from trainer.governor import Governor, GovernorGaveUp, GovernorGuard

VOCAB = 50257


def gov(vocab=VOCAB, sink=None, **kw) -> Governor:
    return Governor(GovernorConfig(**kw), vocab, sink=sink)


def feed(g: Governor, values):
    return [g.check(v) for v in values]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_panics_with_no_history(bad):
    v = gov().check(bad)
    assert v.panic and v.kind == "nan"


def test_non_finite_grad_norm_panics():
    assert gov().check(2.0, grad_norm=math.inf).kind == "nan"


def test_lobotomy_when_healthy_history_jumps_to_random_guess():
    g = gov(vocab=10)
    feed(g, [0.8] * 10)
    v = g.check(math.log(10))
    assert v.panic and v.kind == "lobotomy" and v.threshold == pytest.approx(math.log(10))


def test_no_lobotomy_when_history_was_already_bad():
    g = gov(vocab=10)
    feed(g, [2.0] * 10)
    assert not g.check(math.log(10)).panic


def test_lobotomy_tolerance_scales_with_vocabulary():
    g = gov()
    feed(g, [2.0] * 10)
    assert g.check(math.log(VOCAB) + 0.5).kind == "lobotomy"  # 0.5 < 0.065 * ln(50257) = 0.70
    small = gov(vocab=10)
    feed(small, [0.5] * 10)
    assert small.check(math.log(10) + 0.5).kind != "lobotomy"  # 0.5 > 0.065 * ln(10) = 0.15


def test_no_statistical_panic_before_min_history():
    g = gov(min_history=10)
    feed(g, [1.0] * 9)
    # 3.5 > 3 * mean would diverge with history, but is no spike (< 4 * EWMA, < ln V)
    assert [g.check(3.5).panic for _ in range(5)] == [False] * 5


def test_a_loss_far_worse_than_guessing_rolls_back_at_once_without_history():
    g = gov(vocab=512, min_panics=3)
    v = g.check(22113.0)  # what learning_rate 50 does here, on the very first step
    assert v.panic and v.kind == "spike" and v.threshold == pytest.approx(3 * math.log(512))
    g.check(6.3)
    v = g.check(74651.0)
    assert v.panic and v.kind == "spike"
    assert list(g.history) == [6.3]


def test_one_catastrophic_step_rolls_back_at_once():
    """learning rate x300 for one step: 2.7 -> 15.7 (below 3 ln V, far above the EWMA)."""
    g = gov(vocab=512, min_panics=3)
    g.check(2.7)
    v = g.check(15.7)
    assert v.panic and v.kind == "spike" and v.threshold == pytest.approx(4 * 2.7)


def test_above_guessing_never_enters_the_history_once_well_below_it():
    g = gov(vocab=512, min_panics=3, spike_factor=100)
    feed(g, [2.7, 2.6])
    verdicts = feed(g, [6.5, 7.0, 6.4])  # ln 512 = 6.24: worse than a uniform guess
    assert [v.anomalous for v in verdicts] == [True] * 3 and verdicts[-1].panic
    assert verdicts[-1].threshold == pytest.approx(math.log(512))
    assert list(g.history) == [2.7, 2.6]


def test_a_job_that_starts_near_guessing_may_stay_there():
    g = gov(vocab=512)
    assert not any(v.anomalous for v in feed(g, [6.3, 6.4, 6.2, 6.5, 6.3]))


def test_the_spike_rule_respects_the_absolute_floor():
    g = gov(vocab=512, divergence_floor=1.0)
    feed(g, [0.05] * 5)
    assert not g.check(0.9).anomalous  # 18 x the EWMA, but a tiny loss
    assert g.check(1.5).kind == "spike"


def test_slowly_rising_loss_never_panics():
    g = gov()
    assert not any(v.panic or v.anomalous for v in feed(g, [1.0 + 0.01 * i for i in range(300)]))


def test_divergence_panics_after_min_panics():
    g = gov(min_panics=3)
    feed(g, [2.0 + 0.01 * (i % 3) for i in range(20)])
    verdicts = feed(g, [7.5, 7.5, 7.5])  # > 3 x mean, < 4 x EWMA: divergence, not a spike
    assert [v.panic for v in verdicts] == [False, False, True]
    assert verdicts[-1].kind == "divergence" and verdicts[-1].consecutive == 3


def test_catastrophic_spike_panics_at_once():
    g = gov(min_panics=3)
    feed(g, [2.0 + 0.01 * (i % 3) for i in range(20)])
    assert g.check(50.0).panic and g.panics["spike"] == 1


@pytest.mark.parametrize("floor,multiplier,sigma_k,expect_panic", [
    (100.0, 3.0, 6.0, False),   # above k*std and multiplier*mean, below the absolute floor
    (1.0, 30.0, 6.0, False),    # below multiplier * mean
    (1.0, 3.0, 1e6, False),     # below mean + k * std
    (1.0, 3.0, 6.0, True),      # all three hold
])
def test_all_three_divergence_conditions_are_required(floor, multiplier, sigma_k, expect_panic):
    g = gov(divergence_floor=floor, multiplier=multiplier, sigma_k=sigma_k, min_panics=1,
            spike_factor=100)
    feed(g, [2.0 + 0.1 * (i % 2) for i in range(20)])
    assert g.check(9.0).panic is expect_panic  # 9 < ln V: only the divergence rules judge it


def test_a_normal_value_resets_the_consecutive_counter():
    g = gov(min_panics=3)
    feed(g, [2.0 + 0.01 * (i % 3) for i in range(20)])
    verdicts = feed(g, [7.5, 7.5, 2.0, 7.5, 7.5])
    assert not any(v.panic for v in verdicts) and verdicts[-1].consecutive == 2


def test_anomalies_never_enter_the_healthy_history():
    g = gov(min_panics=5)
    feed(g, [2.0] * 20)
    feed(g, [50.0, 60.0])
    assert max(g.history) == 2.0 and len(g.history) == 20


def test_nan_and_lobotomy_do_not_inflate_the_divergence_counter():
    g = gov(vocab=10, min_panics=3)
    feed(g, [0.8 + 0.01 * (i % 2) for i in range(20)])
    g.check(2.9)  # > 3 x mean, < 4 x EWMA, outside the lobotomy band
    assert g.consecutive == 1
    g.check(math.nan)
    g.check(math.log(10))
    assert g.consecutive == 1
    assert g.panics == {"nan": 1, "spike": 0, "lobotomy": 1, "divergence": 0}


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def train_one(model, opt, sched):
    loss = model(torch.randn(16, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_snapshot_is_an_independent_copy_without_grad_tracking():
    model, opt, sched = model_and_optimizer()
    g = gov()
    snap = g.snapshot(0, model, opt, sched)
    assert all(not t.requires_grad for t in snap.model.values())
    before = {k: v.clone() for k, v in snap.model.items()}
    train_one(model, opt, sched)
    assert all(torch.equal(before[k], snap.model[k]) for k in before)
    assert snap.nbytes > 0


def test_rollback_restores_weights_optimizer_and_scheduler():
    model, opt, sched = model_and_optimizer()
    train_one(model, opt, sched)
    g = gov(lr_backoff=0.5)
    g.snapshot(1, model, opt, sched)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    for _ in range(3):
        train_one(model, opt, sched)
    event = g.rollback(g.check(math.nan), 4, model, opt, sched, batches_skipped=3)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    state = opt.state[next(model.parameters())]
    assert all(torch.equal(moments[k], state[k]) for k in moments), "optimizer state restored"
    assert sched.last_epoch == 1
    assert event.new_lr == pytest.approx(0.05) and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert (event.snapshot_step, event.batches_skipped, event.reason) == (1, 3, "nan")


def test_rollback_to_the_initial_snapshot():
    model, opt, sched = model_and_optimizer()
    g = gov()
    g.snapshot(0, model, opt, sched)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train_one(model, opt, sched)
    g.rollback(g.check(math.inf), 1, model, opt, sched)
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())


def test_rollback_on_a_model_without_parameters():
    model = torch.nn.ReLU()
    g = gov()
    g.snapshot(0, model)
    event = g.rollback(g.check(math.nan), 1, model)
    assert event.rollback_number == 1


def test_key_mismatch_between_snapshot_and_model_raises():
    model, _, _ = model_and_optimizer()
    g = gov()
    g.snapshot(0, model)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8))
    with pytest.raises(RuntimeError, match="snapshot does not match the model"):
        g.rollback(g.check(math.nan), 1, other)


def test_exactly_one_event_with_the_full_context_and_panic_state_cleared():
    events = []
    model, opt, sched = model_and_optimizer()
    g = gov(sink=events.append, min_panics=2)
    g.snapshot(0, model, opt, sched)
    feed(g, [2.0 + 0.01 * (i % 3) for i in range(20)])
    g.check(7.5)
    verdict = g.check(7.5)
    assert verdict.panic
    g.rollback(verdict, 22, model, opt, sched, batches_skipped=2)
    assert len(events) == 1
    e = events[0]
    assert (e.name, e.reason, e.step, e.loss, e.consecutive) == ("governor.rollback", "divergence",
                                                                 22, 7.5, 2)
    assert e.threshold is not None and e.threshold < 7.5
    assert g.consecutive == 0 and not g.check(2.0).anomalous, "recovered: a normal step is healthy"


def test_a_failing_event_sink_does_not_stop_the_rollback():
    def broken(event):
        raise ConnectionError("telemetry is down")

    model, opt, sched = model_and_optimizer()
    g = gov(sink=broken)
    g.snapshot(0, model, opt, sched)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_one(model, opt, sched)
    g.rollback(g.check(math.nan), 1, model, opt, sched)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert g.rollbacks == 1


def test_a_failed_snapshot_keeps_the_previous_one():
    model, opt, sched = model_and_optimizer()
    g = gov()
    good = g.snapshot(3, model, opt, sched)

    class Exploding(torch.nn.Module):
        def named_parameters(self, *a, **k):  # what a snapshot copies
            raise MemoryError("out of host memory mid-copy")

        def parameters(self, recurse=True):
            return iter(())

    with pytest.raises(MemoryError):
        g.snapshot(9, Exploding())
    assert g.last_good is good and g.last_good.step == 3


@given(st.lists(st.floats(min_value=0.0, max_value=1.0, allow_nan=False), min_size=1,
                max_size=200))
@settings(max_examples=200, deadline=None)
def test_finite_losses_at_or_below_the_floor_never_panic(losses):
    g = gov(divergence_floor=1.0)
    assert not any(v.panic or v.anomalous for v in feed(g, losses))


@given(st.integers(1, 6), st.lists(st.integers(0, 8), min_size=1, max_size=12))
@settings(max_examples=200, deadline=None)
def test_a_panic_needs_exactly_min_panics_consecutive_anomalies(min_panics, runs):
    """Alternate runs of spikes with one healthy value: a run panics iff it reaches min_panics."""
    g = gov(min_panics=min_panics)
    feed(g, [2.0 + 0.01 * (i % 3) for i in range(20)])
    for run in runs:
        verdicts = feed(g, [7.5] * run)  # divergent, never a spike
        panics = [i for i, v in enumerate(verdicts) if v.panic]
        if run >= min_panics:
            assert panics and panics[0] == min_panics - 1
        else:
            assert not panics
        if panics:
            g.consecutive = 0  # what a rollback does
        g.check(2.0)


# --- approval: a state becomes last-known-good only on a loss measured on it ----------------

def test_a_candidate_becomes_last_good_only_when_approved():
    model, opt, sched = model_and_optimizer()
    g = gov()
    start = g.snapshot(0, model, opt, sched, initial=True)
    train_one(model, opt, sched)
    g.propose(1, model, opt, sched)
    assert g.last_good is start and g.candidate.step == 1
    g.discard()
    assert g.last_good is start and g.candidate is None
    g.propose(1, model, opt, sched)
    assert g.approve().step == 1 and g.last_good.step == 1 and g.candidate is None
    assert g.approve() is None, "nothing pending: nothing to approve"


def guard_for(model, opt, sched, **kw) -> GovernorGuard:
    from types import SimpleNamespace

    from trainer.distributed import Group
    from trainer.state import TrainState

    guard = GovernorGuard(GovernorConfig(**kw), VOCAB)
    guard.start(SimpleNamespace(model=model, optimizer=opt, scheduler=sched, group=Group(),
                                state=TrainState(), cfg=SimpleNamespace(
                                    training=SimpleNamespace(learning_rate=0.1))))
    return guard


def test_the_guard_decides_and_only_approval_promotes_the_candidate():
    from trainer.guard import Action
    from trainer.state import TrainState

    model, opt, sched = model_and_optimizer()
    guard = guard_for(model, opt, sched, min_panics=2)
    for _ in range(12):
        assert guard.judge(2.0).action is Action.APPROVE
    guard.propose(TrainState(global_step=5))
    assert guard.judge(7.5).action is Action.HOLD  # anomalous: the candidate is dropped
    assert guard.governor.last_good.initial
    decision = guard.judge(7.5)
    assert decision.action is Action.ROLLBACK and decision.kind == "divergence"
    guard.propose(TrainState(global_step=9))
    assert guard.judge(2.0).approved and guard.governor.last_good.step == 9


def test_the_final_judgement_rolls_back_or_fails_when_nothing_was_approved():
    from trainer.guard import Action
    from trainer.state import TrainState

    model, opt, sched = model_and_optimizer()
    guard = guard_for(model, opt, sched)
    decision = guard.judge(math.inf, final=True)
    assert decision.action is Action.FAIL and isinstance(decision.error, GovernorGaveUp)
    assert "approved no state of this job" in str(decision.error)
    guard.propose(TrainState(global_step=4))
    guard.judge(2.0)
    decision = guard.judge(40.0, final=True)  # the final state is not approved
    assert decision.action is Action.ROLLBACK
    assert guard.counts()["final"] == {"approved": False, "loss": 40.0, "kind": "spike",
                                       "rolled_back_to_step": 4}


def test_restores_are_copies_so_two_rollbacks_restore_the_same_moments():
    model, opt, sched = model_and_optimizer()
    train_one(model, opt, sched)
    g = gov(lr_backoff=1.0)
    snap = g.snapshot(1, model, opt, sched)
    train_one(model, opt, sched)
    g.rollback(g.check(math.nan), 2, model, opt, sched)
    first = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    live = opt.state[next(model.parameters())]["exp_avg"]
    assert live.data_ptr() != snap.optimizer["state"][0]["exp_avg"].data_ptr()
    train_one(model, opt, sched)  # would edit the snapshot if the restore aliased it
    g.rollback(g.check(math.nan), 3, model, opt, sched)
    second = opt.state[next(model.parameters())]
    assert all(torch.equal(first[k], second[k]) for k in first)
