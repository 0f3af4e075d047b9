"""Campaign checkpoints: complete or absent, never half, never non-finite.

``checkpoints/step-<N>/`` loads as is with ``AutoModelForCausalLM.from_pretrained`` (config,
safetensors weights, tokenizer; an adapter campaign's holds the adapter in PEFT format instead,
``adapter_config.json`` and ``adapter_model.safetensors``, which ``PeftModel.from_pretrained(base,
folder)`` loads: ``trainer.adapters``) and also holds ``trainer_state.pt`` (optimizer, scheduler, RNG;
read back with ``weights_only=True``), ``trainer_state.json`` (step, job, data position,
config_hash), ``locked.json``, ``realm_config.json`` (the job's resolved config with each
key's layer and source, the same config_hash) and, written last, ``COMPLETE``. A checkpoint is
assembled in ``.step-<N>.tmp-<host>-<pid>``, fsynced, then renamed into place without replacing
anything.
Only folders with ``COMPLETE`` count.

Lineage: a job's checkpoints are resume points until its final one, written with
``job_finished: true`` once the governor approved the final weights. The campaign's latest
checkpoint (``lineage_head``) is the newest finished one, so nothing a failed or unfinished
attempt wrote ever becomes what the next job continues from. A checkpoint is staged (written in
its temporary folder) and committed (marker, rename) only after a loss measured on its weights
was approved; a name is never reused, and a collision is an error, not a success.
Retention keeps ``keep_last`` and logs what it removes.

``load_trainable`` copies a folder's saved weights into the trainable parameters of a live
model (the governor's rollback to disk). A job that starts from fresh weights and may need that
rollback keeps its initial trainable weights in ``.initial-<job>.tmp-<host>-<pid>/`` in the
same layout (``save_trainable``); the job removes it at its end, ``clean_incomplete`` once its
writer is dead.

A checkpoint whose pickle a safe load refuses (``weights_only=True``: it names objects beyond
tensors and plain containers, as a malicious file does) is ``UnsafeCheckpoint``: a permanent
failure that names the folder and how to retire it. realm never loads it unsafely.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import InputError
from core.fsutil import fsync_dir, host_name, process_alive, rename_noreplace, write_json_atomic
from core.job import utc_now
from core.paths import CHECKPOINT_MARKER, STEP_DIR, complete_step_folders

log = structlog.get_logger("realm.checkpoint")

MARKER = CHECKPOINT_MARKER
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONFIG_FILE = "realm_config.json"
"""The resolved config of the job that wrote the checkpoint (values, layers, sources, hash)."""
STATE_SCHEMA = 1
_TMP_DIR = re.compile(r"\.(?:step|shards)-\d+\.tmp-(?P<host>.+)-(?P<pid>\d+)")
_INITIAL_DIR = re.compile(r"\.initial-.+?\.tmp-(?P<host>.+)-(?P<pid>\d+)")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


class NonFiniteWeights(RuntimeError):
    """Refusing to write a checkpoint whose weights hold NaN or Inf."""


class CheckpointExists(RuntimeError):
    """A checkpoint folder of this step already exists: names are never reused."""


class WeightsMismatch(RuntimeError):
    """A weights folder lacks a trainable parameter of the live model, or has another shape."""


class UnsafeCheckpoint(InputError):
    """A checkpoint file a safe load refuses (possibly malicious): permanent, never retried."""

    @classmethod
    def of(cls, folder: Path, file: str) -> "UnsafeCheckpoint":
        return cls(f"refusing checkpoint {folder}: {file} holds objects a safe load does not "
                   f"allow (it may be malicious; realm never loads such a file).{retire_hint(folder)}")


def retire_hint(folder: Path) -> str:
    """How to take a checkpoint realm refuses out of the lineage (the message's last sentence)."""
    return (f" Retire the checkpoint: move the folder {folder.name} out of {folder.parent} (for "
            f"example into {folder.parent.parent / 'retired'}/), then `realm queue retry` the "
            "job; the campaign continues from its previous checkpoint.")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path

    def state(self) -> dict[str, Any]:
        return json.loads((self.path / "trainer_state.json").read_text())

    def lineage(self) -> tuple[str | None, bool]:
        """(job id, finished) of the job that wrote it; (None, False) when unreadable."""
        try:
            state = self.state()
        except (OSError, ValueError):
            return None, False
        return state.get("job_id"), bool(state.get("job_finished"))

    def locked(self) -> dict[str, Any]:
        return json.loads((self.path / "locked.json").read_text())

    def torch_state(self) -> dict[str, Any]:
        try:
            return torch.load(self.path / "trainer_state.pt", weights_only=True,
                              map_location="cpu")
        except pickle.UnpicklingError:
            raise UnsafeCheckpoint.of(self.path, "trainer_state.pt") from None


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (numeric order: step-100 after step-99)."""
    return [Checkpoint(step, folder) for step, folder in complete_step_folders(root)]


def latest_checkpoint(root: Path) -> Checkpoint | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _check_finite(weights) -> None:
    """Every (name, tensor) of ``weights`` is finite."""
    for name, t in weights:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteWeights(f"parameter {name} holds NaN/Inf; checkpoint not written")


def fsync_tree(folder: Path) -> None:
    """The files of a written folder, then the folder itself, on disk."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


@dataclass
class Staged:
    """A checkpoint written in its temporary folder, waiting for its weights to be approved."""

    root: Path
    step: int
    tmp: Path

    def commit(self) -> Checkpoint:
        """Mark complete and rename into place (never over an existing folder)."""
        final = self.root / f"step-{self.step}"
        try:
            (self.tmp / MARKER).write_text(json.dumps({"step": self.step,
                                                       "saved_at": utc_now()}) + "\n")
            fsync_tree(self.tmp)
            try:
                rename_noreplace(self.tmp, final)
            except FileExistsError:
                raise CheckpointExists(
                    f"{final} already exists: checkpoint names are never reused, so this is a "
                    "second writer or a bug; nothing was overwritten") from None
            fsync_dir(self.root)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return Checkpoint(self.step, final)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def stage_checkpoint(root: Path, step: int, model, tokenizer, *, state: dict[str, Any],
                     torch_state: dict[str, Any], locked: dict[str, Any],
                     config: dict[str, Any] | None = None,
                     weights: dict[str, torch.Tensor] | None = None,
                     move_in: dict[str, Path] | None = None) -> Staged:
    """Write everything but the completion marker into ``.step-<step>.tmp-<host>-<pid>``;
    ``config`` (the job's ``Resolved.record()``) becomes ``realm_config.json``. ``weights``: the
    full state dict of a sharded model (gathered by the ranks), written instead of the live
    parameters. ``move_in``: folders other processes wrote for this checkpoint (a sharded job's
    optimizer shards), renamed into it under their names."""
    # the trained weights (frozen ones, such as an adapter's base, never change)
    _check_finite(weights.items() if weights is not None else
                  ((n, p) for n, p in model.named_parameters() if p.requires_grad))
    root.mkdir(parents=True, exist_ok=True)
    if (root / f"step-{step}").exists():
        raise CheckpointExists(f"{root / f'step-{step}'} already exists: checkpoint names are "
                               "never reused; nothing was overwritten")
    tmp = root / f".step-{step}.tmp-{host_name()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        generation = getattr(model, "generation_config", None)
        if generation is not None and not (tmp / "generation_config.json").exists():
            generation.save_pretrained(tmp)  # an adapter's folder: its stop tokens go along
        tokenizer.save_pretrained(tmp)
        torch.save(torch_state, tmp / "trainer_state.pt")
        write_json_atomic(tmp / "trainer_state.json",
                          {"schema": STATE_SCHEMA, "saved_at": utc_now(), **state, "step": step})
        write_json_atomic(tmp / "locked.json", locked)
        if config is not None:
            write_json_atomic(tmp / CONFIG_FILE, config)
        for name, folder in (move_in or {}).items():
            os.rename(folder, tmp / name)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Staged(root, step, tmp)


def save_checkpoint(root: Path, step: int, model, tokenizer, *, state: dict[str, Any],
                    torch_state: dict[str, Any], locked: dict[str, Any],
                    config: dict[str, Any] | None = None) -> Checkpoint:
    """Stage and commit at once (the weights are already approved)."""
    return stage_checkpoint(root, step, model, tokenizer, state=state, torch_state=torch_state,
                            locked=locked, config=config).commit()


def lineage_head(root: Path) -> Checkpoint | None:
    """The campaign's latest checkpoint: the newest one a job finished with."""
    for ckpt in reversed(complete_checkpoints(root)):
        if ckpt.lineage()[1]:
            return ckpt
    return None


def remove_checkpoint(ckpt: Checkpoint, event: str, **why) -> None:
    log.warning(event, step=ckpt.step, path=str(ckpt.path), **why)
    shutil.rmtree(ckpt.path)


def remove_unfinished_of(root: Path, job_id: str, event: str, **why) -> list[Path]:
    """Remove every resume point (unfinished checkpoint) ``job_id`` wrote: a failed or cancelled
    job leaves the campaign's lineage exactly as it found it. Its finished checkpoint, if any,
    is kept (the job did train to the end)."""
    removed = []
    for ckpt in complete_checkpoints(root):
        if ckpt.lineage() == (job_id, False):
            remove_checkpoint(ckpt, event, job_id=job_id, **why)
            removed.append(ckpt.path)
    return removed


def apply_retention(root: Path, keep_last: int, *, protect: set[Path] = frozenset(),
                    job_id: str | None = None) -> list[Path]:
    """Remove complete checkpoints beyond the newest ``keep_last`` (logged), except ``protect``.
    With ``job_id`` (during a job) only that job's own resume points are candidates, so a job
    that later fails leaves everything from before it exactly as it was."""
    removed = []
    found = complete_checkpoints(root)
    if job_id is not None:
        found = [c for c in found if c.lineage() == (job_id, False)]
    for ckpt in found[:-keep_last]:
        if ckpt.path in protect:
            continue
        remove_checkpoint(ckpt, "checkpoint.retention_removed", keep_last=keep_last)
        removed.append(ckpt.path)
    return removed


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or shards with an index)."""
    index = folder / WEIGHTS_INDEX
    if index.is_file() and not (folder / WEIGHTS).is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    with safe_open(folder / WEIGHTS, framework="pt") as f:
        return {name: folder / WEIGHTS for name in f.keys()}


@torch.no_grad()
def load_trainable(model: torch.nn.Module, folder: Path) -> None:
    """Copy the saved weights of every trainable parameter (``requires_grad``) into the live
    model; frozen parameters and buffers are left alone (no step changes them). Full
    fine-tuning: ``model.safetensors`` (or its shards) keyed by the model's parameter names,
    where a tied lm_head is absent (it is the embedding). Every trainable parameter must be
    there in its shape (``WeightsMismatch`` otherwise); nothing is loaded before that is known."""
    if (folder / ADAPTER_WEIGHTS).is_file():
        return _load_adapter(model, folder)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    files = _weight_files(folder)
    missing = sorted(set(params) - set(files))
    if missing:
        raise WeightsMismatch(f"{folder} lacks {len(missing)} trainable parameters of the model, "
                              f"e.g. {missing[:3]}")
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(params[name].shape):
                    raise WeightsMismatch(f"{folder}: {name} has shape {shape}, the model's "
                                          f"parameter {tuple(params[name].shape)}")
    from trainer import sharding

    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                sharding.assign(params[name], f.get_tensor(name))


def _load_adapter(model: torch.nn.Module, folder: Path) -> None:
    """An adapter checkpoint (PEFT format: saved names lack the adapter's name) into a live
    peft model: every trainable parameter must be in the file, in its shape."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(folder / ADAPTER_WEIGHTS)
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    if len(saved) < trainable:
        raise WeightsMismatch(f"{folder / ADAPTER_WEIGHTS} holds {len(saved)} tensors for the "
                              f"adapter's {trainable} trainable parameters")
    result = set_peft_model_state_dict(model, saved)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise WeightsMismatch(f"{folder / ADAPTER_WEIGHTS} does not fit the model's adapter: "
                              f"unexpected {unexpected[:3]}")


def save_trainable(model: torch.nn.Module, folder: Path,
                   tensors: dict[str, torch.Tensor] | None = None) -> None:
    """The trainable parameters in ``folder/model.safetensors``, as ``load_trainable`` reads
    them (the job's initial weights when it starts from no checkpoint); ``tensors``: those of a
    sharded model, gathered whole by its ranks."""
    folder.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = {name: p.detach().cpu() for name, p in model.named_parameters()
                   if p.requires_grad}
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / WEIGHTS)


def shards_dir(root: Path, step: int, pid: int, host: str | None = None) -> Path:
    """Where the ranks of a sharded job write a checkpoint's optimizer shards before rank 0
    (process ``pid`` on ``host``, this one by default) moves them into the staged checkpoint."""
    return root / f".shards-{step}.tmp-{host or host_name()}-{pid}"


def initial_weights_dir(root: Path, job_id: str, pid: int, host: str | None = None) -> Path:
    """Where process ``pid`` on ``host`` (this one by default) keeps a job's initial trainable
    weights (``clean_incomplete`` on that host removes it once that process is dead)."""
    return root / f".initial-{job_id}.tmp-{host or host_name()}-{pid}"


def clean_incomplete(root: Path) -> list[Path]:
    """Remove temp folders of dead writers on this host (staged checkpoints, initial weights)
    and step folders without COMPLETE."""
    removed = []
    if not root.is_dir():
        return removed
    host = host_name()
    for child in root.iterdir():
        tmp = _TMP_DIR.fullmatch(child.name) or _INITIAL_DIR.fullmatch(child.name)
        stale_tmp = tmp and tmp["host"] == host and not process_alive(tmp["pid"])
        unmarked = STEP_DIR.fullmatch(child.name) and not (child / MARKER).exists()
        if child.is_dir() and (stale_tmp or unmarked):
            log.warning("checkpoint.incomplete_removed", path=str(child))
            shutil.rmtree(child)
            removed.append(child)
    return removed
