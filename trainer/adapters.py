"""LoRA and QLoRA adapters (peft): where the base comes from, building and loading an adapter.

An adapter campaign (``adapter.method: lora | qlora``) freezes its base and trains low-rank
adapters on it. Its checkpoints hold the adapter in PEFT format (``adapter_config.json``,
``adapter_model.safetensors``: ``PeftModel.from_pretrained(base, folder)`` loads them) beside
realm's trainer state; the base weights never change and are never copied into a checkpoint.

The base is the hero's ``model.path`` (or ``hf_name`` from the local cache). A hero with
``init: random`` has no base on disk, so the campaign's first adapter job builds it (seeded by
``training.seed``) and saves it as ``campaigns/<hero>/<campaign>/base/`` (assembled in a
temporary folder, renamed into place without replacing anything, under the campaign's lock):
every later job, resume and export reads the same weights from there.

QLoRA loads the base in 4 bits through bitsandbytes, which runs on CUDA only: without CUDA (or
without the package) ``qlora_problem`` says so and how to fix it, and the job fails as a config
error before anything loads.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from core.errors import ConfigError, InputError
from core.fsutil import fsync_dir, host_name, rename_noreplace
from trainer.checkpoint import ADAPTER_WEIGHTS, fsync_tree, retire_hint
from trainer.model import (finish_loaded, from_pretrained, pretrained_source, random_init_tokenizer,
                           random_model, set_generation_tokens)

# peft asks transformers whether checkpointing is on through a name transformers 5 deprecated
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
# ensure_weight_tying is always asked for (lora_config) and is a no-op without a tied module
warnings.filterwarnings("ignore", message=".*requested `ensure_weight_tying`.*")

BASE_DIR = "base"
"""The campaign's own base model folder (random-init heroes only)."""
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_folder(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def causal_lm(model):
    """The transformers model under a peft wrapper (the model itself when there is none): its
    ``.model``/``.lm_head``/``.config`` are what the loss calls; the adapter layers sit inside."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_quantized(model) -> bool:
    lm = causal_lm(model)
    return bool(getattr(lm, "is_loaded_in_4bit", False) or getattr(lm, "is_loaded_in_8bit", False)
                or getattr(lm, "hf_quantizer", None) is not None)


def qlora_problem() -> str | None:
    """Why QLoRA cannot run here (None: it can)."""
    if not torch.cuda.is_available():
        return ("adapter.method qlora needs a CUDA GPU: its 4-bit base runs only on "
                "bitsandbytes' CUDA kernels, and this machine has none. Use adapter.method lora "
                "(the same adapter on a 16-bit base; add training.param_dtype bf16 to halve the "
                "base's memory), or run the job where a GPU is (daemon.devices 0).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return ("adapter.method qlora needs the bitsandbytes package, which is not installed: "
                "pip install 'realm-trainer[qlora]' (or use adapter.method lora).")
    return None


def base_source(hero, campaign_dir: Path, seed: int) -> str:
    """The base for a campaign's first adapter job: a random-init hero's is built and saved into
    the campaign when it is not there yet."""
    folder = campaign_dir / BASE_DIR
    if hero.model.init == "random" and not (folder / "config.json").is_file():
        _save_random_base(hero, folder, seed)
    return trained_base(hero, campaign_dir)


def trained_base(hero, campaign_dir: Path) -> str:
    """The folder (or cache name) an adapter campaign's base loads from. Never built here: once
    an adapter trained on it, a missing base is an error (a base built again, with another seed
    or another torch, would not be the one the adapter learned on)."""
    if hero.model.init != "random":
        return pretrained_source(hero)
    folder = campaign_dir / BASE_DIR
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} is missing (or has no config.json): the campaign's adapter "
                         "was trained on the base model saved there, and a base built again "
                         "would not be the same model. Restore the folder from a backup, or "
                         "create a new campaign.")
    return str(folder)


def _save_random_base(hero, folder: Path, seed: int) -> None:
    tmp = folder.parent / f".{BASE_DIR}.tmp-{host_name()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model, tokenizer = random_model(hero, seed), random_init_tokenizer(hero)
        set_generation_tokens(model, tokenizer)  # the base stops where its exports stop
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        try:
            rename_noreplace(tmp, folder)
        except FileExistsError:
            if not (folder / "config.json").is_file():
                raise
            return  # another process built it first: that one is the campaign's base
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def lora_config(adapter) -> Any:
    from peft import LoraConfig

    targets = adapter.target_modules.strip()
    return LoraConfig(
        r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
        target_modules=targets if targets == "all-linear" else _names(targets),
        modules_to_save=_names(adapter.modules_to_save) if adapter.modules_to_save else None,
        bias="none", task_type="CAUSAL_LM",
        # a tied output head follows a trained embedding (else it would keep the frozen one)
        ensure_weight_tying=True)


def _names(setting: str) -> list[str]:
    return [n.strip() for n in setting.split(",") if n.strip()]


def _quantization(device: torch.device) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    problem = qlora_problem()
    if problem:
        raise ConfigError(problem)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": config, "device_map": {"": device.index or 0}}


def load_adapter_model(hero, locked: dict, adapter, *, campaign_dir: Path,
                       checkpoint: Path | None, seed: int, dtype: torch.dtype,
                       device: torch.device, gradient_checkpointing: bool = False):
    """(peft model, tokenizer): the base (frozen, in ``dtype`` or 4 bits for qlora) with the
    adapter of ``checkpoint``, or a fresh adapter (seeded) when there is none."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    source = base_source(hero, campaign_dir, seed) if checkpoint is None else \
        trained_base(hero, campaign_dir)
    qlora = adapter.method == "qlora"
    load = _quantization(device) if qlora else {}
    base, tokenizer = from_pretrained(source, hero, dtype=torch.bfloat16 if qlora else dtype,
                                      **load)
    finish_loaded(base, tokenizer, hero, locked, source=source)
    if qlora:
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if checkpoint is not None:
        _check_adapter_files(checkpoint)
        model = PeftModel.from_pretrained(base, str(checkpoint), is_trainable=True)
    else:
        _check_module_names(base, adapter)
        torch.manual_seed(seed)  # the adapter's initial A matrices
        try:
            model = get_peft_model(base, lora_config(adapter))
        except ValueError as exc:  # settings the checks above let through, as peft words it
            raise ConfigError(f"adapter.target_modules {adapter.target_modules!r} with "
                              f"adapter.modules_to_save {adapter.modules_to_save!r}: peft "
                              f"refuses them: {exc}") from None
    return model, tokenizer


def _check_module_names(base, adapter) -> None:
    """Every name in adapter.target_modules / modules_to_save selects modules of this model as
    peft matches them, and every target is a layer an adapter can wrap (peft would raise a bare
    ValueError, or for a modules_to_save name that matches nothing silently train nothing)."""
    modules = {name: m for name, m in base.named_modules() if name}
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items()
                     if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")})
    layers = f"its linear layers are {', '.join(linear)} (or use all-linear)"
    named = sorted({name.rsplit(".", 1)[-1] for name in modules} - {str(i) for i in range(999)})
    problems = []
    targets = adapter.target_modules.strip()
    for name in [] if targets == "all-linear" else _names(targets):
        # peft: the whole module name, or its last dotted parts
        found = [m for key, m in modules.items() if key == name or key.endswith(f".{name}")]
        kinds = sorted({type(m).__name__ for m in found
                        if not isinstance(m, (torch.nn.Linear, torch.nn.Embedding))})
        if not found:
            problems.append(f"adapter.target_modules: {name} not found in the model; {layers}")
        elif kinds:
            problems.append(f"adapter.target_modules: {name} names {', '.join(kinds)} modules, "
                            f"which an adapter cannot wrap (only linear and embedding layers); "
                            f"{layers}")
    for name in _names(adapter.modules_to_save or ""):
        if not any(key.endswith(name) for key in modules):  # peft: any name ending so
            problems.append(f"adapter.modules_to_save: {name} not found in the model (it trains "
                            "in full every module whose name ends with it); its modules are "
                            f"named {', '.join(named)}")
    if problems:
        raise ConfigError(problems)


def _check_adapter_files(folder: Path) -> None:
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{folder}: this campaign trains an adapter, but the checkpoint "
                          f"has no {ADAPTER_CONFIG} (it holds a full model: the campaign was "
                          "trained without an adapter). Keep adapter.method as the campaign "
                          "started, or create a new campaign for the adapter.")
    problem = adapter_files_problem(folder)
    if problem:
        raise InputError(problem)


def adapter_files_problem(folder: Path) -> str | None:
    """Why an adapter checkpoint's PEFT files cannot be loaded (None: they can), with the fix."""
    retire = retire_hint(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        return f"{folder}: the adapter checkpoint has no {ADAPTER_WEIGHTS} (damaged).{retire}"
    try:
        json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        return f"{folder / ADAPTER_CONFIG}: unreadable ({exc}).{retire}"
    try:  # the header, and the file as long as the header says (a truncated copy is not)
        with safe_open(folder / ADAPTER_WEIGHTS, framework="pt"):
            pass
    except (OSError, SafetensorError) as exc:
        return f"{folder / ADAPTER_WEIGHTS}: unreadable ({exc}).{retire}"
    return None


def adapter_summary(model) -> dict[str, Any]:
    """Trainable and total parameters (the job log and record)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total,
            "trainable_fraction": round(trainable / max(1, total), 6)}
