"""Packing examples into fixed-length rows with attention isolated per example.

``pack_rows`` is best-fit decreasing: longest examples first, each into the row with the least
room that still fits it. ``collate`` builds a batch: ``input_ids``, ``labels`` (-100 on masked,
padding, and the first token of every example, so no example predicts from another), position ids
restarting at 0 per example, and the span of every example. Attention is isolated per example
either by ``trainer.attention`` (one causal sdpa call per span: the engine's path) or by the 4D
block-diagonal causal mask ``Batch.attention_mask`` (for stock sdpa/eager). Unpacked training is
the same code with one example per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100


def pack_rows(lengths: np.ndarray | list[int], max_length: int, packing: bool = True
              ) -> list[list[int]]:
    """Example indices per row; without packing, one example per row in index order."""
    lengths = [int(x) for x in lengths]
    if not packing:
        return [[i] for i in range(len(lengths))]
    by_room: list[list[int]] = [[] for _ in range(max_length + 1)]  # room left -> rows
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[i]
        row = None
        for room in range(size, max_length + 1):
            if by_room[room]:
                row, left = by_room[room].pop(), room
                break
        if row is None:
            row, left = len(rows), max_length
            rows.append([])
        rows[row].append(i)
        by_room[left - size].append(row)
    return rows


def packing_efficiency(rows: list[list[int]], lengths, max_length: int) -> float:
    """Real tokens / slots."""
    used = sum(int(lengths[i]) for row in rows for i in row)
    return used / max(1, len(rows) * max_length)


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segments: list[list[tuple[int, int]]]
    """Per row, the [start, stop) span of each packed example (for span-wise attention)."""
    example_ids: torch.Tensor
    """(B, L) example index per position, -1 on padding (for per-example losses)."""

    @property
    def target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, 1, L, L) bool block-diagonal causal mask, True where a query may attend.

        Built on demand: the engine's span-wise attention does not need it; sdpa/eager do.
        """
        seg = self.example_ids.to(self.input_ids.device)
        L = seg.shape[1]
        same = seg[:, :, None] == seg[:, None, :]  # padding (-1) attends to padding: no NaN rows
        causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
        return (same & causal)[:, None]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids),
                     self.segments, self.example_ids)

    def pin_memory(self) -> "Batch":
        return Batch(self.input_ids.pin_memory(), self.labels.pin_memory(),
                     self.position_ids.pin_memory(), self.segments, self.example_ids)


def collate(rows: list[list[int]], store, pad_id: int, length: int | None = None) -> Batch:
    """A batch of packed rows from a TokenStore-like object (``example(i) -> (ids, trained)``)."""
    examples = [[store.example(i) for i in row] for row in rows]
    L = length or max(sum(len(ids) for ids, _ in row) for row in examples)
    B = len(rows)
    ids = np.full((B, L), pad_id, dtype=np.int64)
    labels = np.full((B, L), IGNORE, dtype=np.int64)
    positions = np.zeros((B, L), dtype=np.int64)
    owner = np.full((B, L), -1, dtype=np.int64)
    segments = []
    for b, (row, row_examples) in enumerate(zip(rows, examples)):
        at, spans = 0, []
        for i, (tok, trained) in zip(row, row_examples):
            n = len(tok)
            ids[b, at:at + n] = tok
            labels[b, at:at + n] = np.where(np.asarray(trained, dtype=bool), tok, IGNORE)
            labels[b, at] = IGNORE  # never predicted from the previous example
            positions[b, at:at + n] = np.arange(n)
            owner[b, at:at + n] = i
            spans.append((at, at + n))
            at += n
        segments.append(spans)
    return Batch(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(positions),
                 segments, torch.from_numpy(owner))
