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
