"""``realm export``: a campaign checkpoint as a folder other tools load, without realm's files.

- Full fine-tuning: the checkpoint's model, tokenizer and generation config
  (``AutoModelForCausalLM.from_pretrained(out)``).
- An adapter campaign: the adapter alone (PEFT format, ``base_model_name_or_path`` naming the
  base folder; ``PeftModel.from_pretrained(base, out)``), or with ``merged`` the base with the
  adapter folded in (``merge_and_unload``: a plain model ``from_pretrained`` loads), saved in the
  base's own dtype. Merging runs in fp32 on the CPU; a QLoRA adapter merges into the
  unquantized base.

The checkpoint is the campaign's latest (its newest finished one) or the one of ``step``. The
folder is assembled under a temporary name beside ``out`` and renamed into place without
replacing anything; ``realm_export.json`` in it records what it came from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from core.errors import InputError, UsageError
from core.fsutil import rename_noreplace, write_json_atomic
from core.job import utc_now
from trainer.adapters import (ADAPTER_CONFIG, adapter_files_problem, causal_lm, is_adapter_folder,
                              trained_base)
from trainer.checkpoint import (CONFIG_FILE, MARKER, Checkpoint, complete_checkpoints,
                                lineage_head)

REALM_FILES = {MARKER, CONFIG_FILE, "trainer_state.pt", "trainer_state.json", "locked.json",
               "README.md"}
"""What a checkpoint holds for realm alone (never exported)."""
RECORD = "realm_export.json"


def pick_checkpoint(root: Path, step: int | None) -> Checkpoint:
    found = complete_checkpoints(root)
    if step is None:
        head = lineage_head(root)
        if head is None:
            raise UsageError(f"{root}: no finished checkpoint yet (a job must train to the end "
                             "first); `realm queue status` shows the campaign's jobs.")
        return head
    for ckpt in found:
        if ckpt.step == step:
            return ckpt
    steps = ", ".join(str(c.step) for c in found) or "none"
    raise UsageError(f"no complete checkpoint step-{step} in {root} (complete steps: {steps}).")


def export(hero, campaign_dir: Path, out: Path, *, step: int | None = None,
           merged: bool = False) -> dict:
    """Write the export folder; returns its record."""
    ckpt = pick_checkpoint(campaign_dir / "checkpoints", step)
    _check_out(out, campaign_dir)
    adapter = is_adapter_folder(ckpt.path)
    problem = adapter_files_problem(ckpt.path) if adapter else None
    if problem:
        raise InputError(problem)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    record = {"schema": 1, "checkpoint": str(ckpt.path), "step": ckpt.step,
              "kind": "merged" if adapter and merged else "adapter" if adapter else "full",
              "exported_at": utc_now()}
    try:
        if adapter and merged:
            record["base"] = _write_merged(hero, campaign_dir, ckpt.path, tmp)
        else:
            _copy_model_files(ckpt.path, tmp)
            if adapter:
                record["base"] = trained_base(hero, campaign_dir)
                _point_at_base(tmp, record["base"])
        write_json_atomic(tmp / RECORD, record)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir():
            out.rmdir()  # empty (checked): replaced by the finished folder
        rename_noreplace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def _check_out(out: Path, campaign_dir: Path) -> None:
    if out.is_symlink():
        raise UsageError(f"--out {out}: a symbolic link (realm does not write through one); "
                         "name a new folder.")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; name a new folder.")
    campaigns = campaign_dir.parent.parent.resolve()
    if campaigns in (out.parent.resolve() / out.name).parents:
        raise UsageError(f"--out {out}: inside the realm's campaigns folder {campaigns}, whose "
                         "contents realm manages (a folder among the checkpoints is removed as "
                         "unfinished, a checkpoint's by retention); name a folder outside it.")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out}: the folder is not empty; name a new or empty folder "
                         "(nothing was written).")


def _copy_model_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.is_symlink() and path.name not in REALM_FILES:
            shutil.copy2(path, dst / path.name)


def _point_at_base(folder: Path, base: str) -> None:
    path = folder / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def _write_merged(hero, campaign_dir: Path, ckpt: Path, dst: Path) -> str:
    from peft import PeftModel
    from transformers import AutoTokenizer, GenerationConfig

    from trainer.model import from_pretrained

    base_path = trained_base(hero, campaign_dir)
    base, _ = from_pretrained(base_path, hero, dtype=torch.float32)
    model = causal_lm(PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload())
    stored = _stored_dtype(Path(base_path))
    if stored is not None and stored != torch.float32:
        model = model.to(stored)
    model.generation_config = GenerationConfig.from_pretrained(ckpt)
    model.save_pretrained(dst, safe_serialization=True)
    AutoTokenizer.from_pretrained(ckpt).save_pretrained(dst)
    return base_path


def _stored_dtype(folder: Path) -> torch.dtype | None:
    """The dtype a model folder's weights are saved in (its config.json), None when unknown."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None
