"""The settle rule (with an injectable clock) and --set parsing."""

from __future__ import annotations

import pytest

from core.errors import UsageError
from config.flags import parse_sets
from core.settle import Settler


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_file_settles_only_after_holding_still():
    clock = Clock()
    s = Settler(2.0, clock=clock)
    assert not s.is_settled("f", 10, 1)
    clock.now += 1.9
    assert not s.is_settled("f", 10, 1)
    clock.now += 0.2
    assert s.is_settled("f", 10, 1)


def test_any_change_restarts_the_window():
    clock = Clock()
    s = Settler(2.0, clock=clock)
    s.is_settled("f", 10, 1)
    clock.now += 1.5
    assert not s.is_settled("f", 11, 2)  # grew
    clock.now += 1.5
    assert not s.is_settled("f", 11, 2)
    clock.now += 0.6
    assert s.is_settled("f", 11, 2)


def test_open_writer_blocks_until_closed_then_settles():
    clock = Clock()
    s = Settler(1.0, clock=clock)
    s.note_written("f")
    s.is_settled("f", 5, 1)
    clock.now += 10
    assert not s.is_settled("f", 5, 1), "inotify says the writer still holds it open"
    s.note_closed("f")
    assert not s.is_settled("f", 5, 1), "the window starts again at close"
    clock.now += 1.0
    assert s.is_settled("f", 5, 1)


def test_parse_sets_types_and_nesting():
    assert parse_sets(["training.learning_rate=1e-4", "training.epochs=2", "data.packing=false",
                       "hero=tiny"]) == {
        "training": {"learning_rate": 1e-4, "epochs": 2}, "data": {"packing": False},
        "hero": "tiny"}


@pytest.mark.parametrize("bad,match", [
    ("novalue", "expected KEY=VALUE"),
    ("a..b=1", "expected KEY=VALUE"),
])
def test_parse_sets_rejects_bad_items(bad, match):
    with pytest.raises(UsageError, match=match):
        parse_sets([bad])


def test_parse_sets_rejects_section_clash():
    with pytest.raises(UsageError, match="already given a value"):
        parse_sets(["a=1", "a.b=2"])
    with pytest.raises(UsageError, match="is a section"):
        parse_sets(["a.b=2", "a=1"])
