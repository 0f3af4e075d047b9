"""Campaign checkpoints: complete or absent, never half, never non-finite.

``checkpoints/step-<N>/`` loads as is with ``AutoModelForCausalLM.from_pretrained`` (config,
safetensors weights, tokenizer) and also holds ``trainer_state.pt`` (optimizer, scheduler, RNG;
read back with ``weights_only=True``), ``trainer_state.json`` (step, job, data position),
``locked.json`` and, written last, ``COMPLETE``. A checkpoint is assembled in
``.step-<N>.tmp-<host>-<pid>``, fsynced, then renamed into place without replacing anything.
Only folders with ``COMPLETE`` count; the latest is chosen numerically. Retention keeps
``keep_last`` and logs what it removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from core.fsutil import fsync_dir, host_name, rename_noreplace, write_json_atomic
from core.job import utc_now

log = structlog.get_logger("realm.checkpoint")

MARKER = "COMPLETE"
STATE_SCHEMA = 1
_STEP_DIR = re.compile(r"step-(\d+)")
_TMP_DIR = re.compile(r"\.step-\d+\.tmp-(?P<host>.+)-(?P<pid>\d+)")


class NonFiniteWeights(RuntimeError):
    """Refusing to write a checkpoint whose weights hold NaN or Inf."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path

    def state(self) -> dict[str, Any]:
        return json.loads((self.path / "trainer_state.json").read_text())

    def locked(self) -> dict[str, Any]:
        return json.loads((self.path / "locked.json").read_text())

    def torch_state(self) -> dict[str, Any]:
        return torch.load(self.path / "trainer_state.pt", weights_only=True, map_location="cpu")


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (numeric order: step-100 after step-99)."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_DIR.fullmatch(child.name)
            if m and (child / MARKER).is_file():
                found.append(Checkpoint(int(m.group(1)), child))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(root: Path) -> Checkpoint | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _check_finite(model: torch.nn.Module) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise NonFiniteWeights(f"parameter {name} holds NaN/Inf; checkpoint not written")


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


def save_checkpoint(root: Path, step: int, model, tokenizer, *, state: dict[str, Any],
                    torch_state: dict[str, Any], locked: dict[str, Any]) -> Checkpoint:
    """Write ``step-<step>`` atomically; an existing complete one of that step is kept."""
    _check_finite(model)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-{host_name()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(torch_state, tmp / "trainer_state.pt")
        write_json_atomic(tmp / "trainer_state.json",
                          {"schema": STATE_SCHEMA, "step": step, "saved_at": utc_now(), **state})
        write_json_atomic(tmp / "locked.json", locked)
        _fsync_tree(tmp)
        (tmp / MARKER).write_text(json.dumps({"step": step, "saved_at": utc_now()}) + "\n")
        _fsync_tree(tmp)
        try:
            rename_noreplace(tmp, final)
        except FileExistsError:
            if not (final / MARKER).is_file():
                raise
            log.warning("checkpoint.exists", step=step, path=str(final))
        fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Checkpoint(step, final)


def apply_retention(root: Path, keep_last: int, *, protect: set[Path] = frozenset()
                    ) -> list[Path]:
    """Remove complete checkpoints beyond the newest ``keep_last`` (logged), except ``protect``."""
    removed = []
    for ckpt in complete_checkpoints(root)[:-keep_last]:
        if ckpt.path in protect:
            continue
        log.info("checkpoint.retention_removed", step=ckpt.step, path=str(ckpt.path),
                 keep_last=keep_last)
        shutil.rmtree(ckpt.path)
        removed.append(ckpt.path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_incomplete(root: Path) -> list[Path]:
    """Remove temp folders of dead writers on this host and step folders without COMPLETE."""
    removed = []
    if not root.is_dir():
        return removed
    host = host_name()
    for child in root.iterdir():
        tmp = _TMP_DIR.fullmatch(child.name)
        stale_tmp = tmp and tmp["host"] == host and not _pid_alive(int(tmp["pid"]))
        unmarked = _STEP_DIR.fullmatch(child.name) and not (child / MARKER).exists()
        if child.is_dir() and (stale_tmp or unmarked):
            log.warning("checkpoint.incomplete_removed", path=str(child))
            shutil.rmtree(child)
            removed.append(child)
    return removed
