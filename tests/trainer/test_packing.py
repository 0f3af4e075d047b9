"""Packing: every example placed once, rows within max_length, attention isolated per example."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from trainer.data.packing import IGNORE, collate, pack_rows, packing_efficiency
from trainer.attention import use_packed_attention
from trainer.engine import token_loss_sum


class Store:
    def __init__(self, examples):
        self.examples = examples

    def example(self, i):
        return self.examples[i]


@given(st.lists(st.integers(1, 64), min_size=1, max_size=60), st.integers(64, 200))
@settings(max_examples=60, deadline=None)
def test_every_example_once_and_rows_fit(lengths, max_length):
    rows = pack_rows(lengths, max_length)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max_length for row in rows)


def test_best_fit_beats_one_per_row():
    lengths = [100, 30, 60, 10, 90, 28, 70, 40] * 10
    packed = pack_rows(lengths, 128)
    assert len(packed) < len(pack_rows(lengths, 128, packing=False))
    assert packing_efficiency(packed, lengths, 128) > 0.9


def test_collate_restarts_positions_and_masks_boundaries():
    store = Store([(np.array([5, 6, 7]), np.array([1, 1, 1])), (np.array([8, 9]), np.array([0, 1]))])
    b = collate([[0, 1]], store, pad_id=0, length=6)
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert b.labels.tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE]]
    assert b.segments == [[(0, 3), (3, 5)]]
    mask = b.attention_mask[0, 0]
    assert mask[4, 3] and not mask[3, 2] and not mask[4, 1], "no attention across examples"
    assert not mask[1, 2], "causal"
    assert b.target_tokens == 3


def per_example_losses(model, batch, packed_attention: bool = False) -> dict[int, float]:
    kwargs = {"realm_segments": batch.segments} if packed_attention else \
        {"attention_mask": batch.attention_mask}
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                       **kwargs).logits
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
        ignore_index=IGNORE, reduction="none").view(batch.labels.shape[0], -1)
    seg, valid = batch.example_ids[:, 1:], batch.labels[:, 1:] != IGNORE
    return {i: float(losses[(seg == i) & valid].sum()) for i in seg.unique().tolist() if i >= 0}


def random_examples(seed=0, sizes=(5, 40, 17, 60, 33, 8, 90, 21, 64, 3)):
    rng = np.random.default_rng(seed)
    return Store([(rng.integers(0, 259, n), rng.random(n) > 0.3) for n in sizes])


@pytest.mark.parametrize("packed_attention", [False, True], ids=["4d-mask", "span-attention"])
def test_packed_losses_equal_one_by_one_losses(tiny_model, packed_attention):
    store = random_examples()
    n = len(store.examples)
    rows = pack_rows([len(e[0]) for e in store.examples], 128)
    assert any(len(r) > 1 for r in rows), "the test must really pack"
    if packed_attention:
        use_packed_attention(tiny_model)
    packed = per_example_losses(tiny_model, collate(rows, store, pad_id=256, length=128),
                                packed_attention)
    tiny_model.set_attn_implementation("sdpa")
    for i in range(n):
        alone = per_example_losses(tiny_model, collate([[i]], store, pad_id=256))
        assert abs(packed[i] - alone[i]) <= 1e-5 * max(1.0, abs(alone[i])), (i, packed[i], alone[i])


def test_engine_loss_equals_the_sum_of_per_example_losses(tiny_model):
    store = random_examples(1)
    rows = pack_rows([len(e[0]) for e in store.examples], 128)
    batch = collate(rows, store, pad_id=256, length=128)
    reference = sum(per_example_losses(tiny_model, batch).values())
    use_packed_attention(tiny_model)
    with torch.no_grad():
        total = float(token_loss_sum(tiny_model, batch, None))
    assert abs(total - reference) < 1e-3


def test_without_isolation_examples_would_leak(tiny_model):
    """The checks above could fail: plain causal attention over a packed row changes losses."""
    store = random_examples(2, sizes=(50, 50))
    batch = collate([[0, 1]], store, pad_id=256)
    isolated = per_example_losses(tiny_model, batch)
    with torch.no_grad():
        logits = tiny_model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    leaky = torch.nn.functional.cross_entropy(
        logits[0, 50:-1], batch.labels[0, 51:], ignore_index=IGNORE, reduction="sum")
    assert abs(float(leaky) - isolated[1]) > 1e-3
