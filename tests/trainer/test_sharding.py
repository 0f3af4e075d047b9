"""trainer.sharding helpers that need no process group."""

from __future__ import annotations

import weakref

import torch

from trainer import sharding


def test_trainable_weights_keeps_what_it_gathers_on_rank_0_only(monkeypatch):
    """Every rank gathers every trainable parameter whole (a collective), but a rank other than
    0 drops each one at once: a full model held whole on every rank of a host at the same time
    (a disk roll-back's start weights) multiplied its memory by the ranks."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4),
                                torch.nn.Linear(4, 4))
    model[0].bias.requires_grad_(False)
    alive: list[weakref.ref] = []
    held: list[int] = []

    def fake_full(t):
        held.append(sum(r() is not None for r in alive))  # gathered tensors still held
        whole = t.clone()
        alive.append(weakref.ref(whole))
        return whole

    monkeypatch.setattr(sharding, "full", fake_full)
    assert sharding.trainable_weights(model, main=False) is None
    assert len(held) == 5 and max(held) == 0, held
    mine = sharding.trainable_weights(model, main=True)
    assert sorted(mine) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(mine[n], p) for n, p in model.named_parameters() if n in mine)


def test_sample_prompts_under_fsdp_decode_in_step_until_every_rank_is_done():
    """generate() under fsdp runs with synced_gpus: the model is sharded by hand (transformers
    does not see it as FSDP-managed), so without it a rank whose greedy decode stops first
    leaves the others in a layer's all-gather (a hang or mismatched collectives)."""
    from types import SimpleNamespace

    from trainer.engine import Trainer

    calls = []

    class Model:
        def generate(self, ids, **kwargs):
            calls.append(kwargs)
            return torch.cat([ids, ids], dim=1)

        def train(self):
            pass

    class Tok:
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2, 3]}

        def decode(self, ids, skip_special_tokens=True):
            return "x"

    for sharded in (True, False):
        fake = SimpleNamespace(sample_prompts=["a"], device=torch.device("cpu"),
                               autocast_dtype=None, model=Model(), global_step=1,
                               sharded=sharded, log=SimpleNamespace(info=lambda *a, **k: None))
        Trainer._sample_each(fake, Tok(), 4)
    assert [c.get("synced_gpus") for c in calls] == [True, False]
