"""The one did-you-mean (``core.validate.did_you_mean``) and the one is-this-process-alive check
(``core.fsutil.process_alive``) that every validator and every lease or lock reader uses."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from config.resolver import SPECS
from core.fsutil import process_alive
from core.validate import did_you_mean

KEYS = list(SPECS)


@pytest.mark.parametrize("typed, meant", [
    ("training.lr", "training.learning_rate"),           # an abbreviation, not training.seed
    ("training.learnig_rate", "training.learning_rate"),  # spelling
    ("training.wd", "training.weight_decay"),
    ("training.mbs", "training.micro_batch_size"),        # initials
    ("training.warmup", "training.warmup_steps"),         # contained in a key
    ("data.seq_len", "data.max_length"),                  # another trainer's name
    ("training.gradient_accumulation_steps", "training.grad_accum"),
    ("trainig.epochs", "training.epochs"),                # the section misspelt
    ("optimizer.lr", "training.learning_rate"),           # a section realm does not have
])
def test_did_you_mean_prefers_the_same_section_and_known_abbreviations(typed, meant):
    assert did_you_mean(typed, KEYS) == f" (did you mean '{meant}'?)"


def test_did_you_mean_stays_silent_when_nothing_is_close():
    assert did_you_mean("zzz.qqq", KEYS) == ""
    assert did_you_mean("qqqq", ["status", "hero_id"]) == ""
    assert did_you_mean("hero", ["hero_id", "campaign_id"]) == " (did you mean 'hero_id'?)"


def test_every_validator_uses_it():
    """A sidecar field, a config key, a hero key and a campaign key all get the same hint."""
    from config.resolver import check_values, Layer
    from core.errors import SidecarError
    from core.job import Job

    with pytest.raises(SidecarError, match=r"unknown field 'hero' \(did you mean 'hero_id'\?\)"):
        Job.from_dict({"id": "a", "dataset_path": "d", "dataset_name": "d", "hero": "x"})
    assert "did you mean 'training.learning_rate'" in " ".join(
        check_values(Layer("cli", "--set", {"training": {"lr": 1}})))


def test_process_alive_knows_a_live_process_a_dead_one_and_a_reused_pid():
    me = psutil.Process(os.getpid())
    assert process_alive(os.getpid()) and process_alive(str(os.getpid()), me.create_time())
    assert not process_alive(os.getpid(), me.create_time() - 3600)  # same pid, another start
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not process_alive(child.pid)
    for garbage in (None, "x", -1, {"pid": 1}):
        assert process_alive(garbage) is False
