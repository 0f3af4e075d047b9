"""``realm hero add NAME --from PATH``: a hero profile written from a model folder.

The folder is what ``save_pretrained`` writes (or a downloaded hub snapshot): its
``config.json`` gives the architecture (``architectures[0]``), ``vocab_size`` and the context
length (``max_position_embeddings``); the weights and the tokenizer are loaded from the folder
at training time (``model.path``). Nothing in the folder is run: the trainer refuses folders that
ask for custom code when it loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from core.errors import UsageError
from core.fsutil import write_atomic
from core.paths import RealmPaths, check_name
from core.validate import read_regular
from guild.heroes import load_hero_file

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2",
                 "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
"""Architectures realm trains (``architectures[0]`` of config.json) and their model_type."""
MAX_CONFIG_BYTES = 1 << 20
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length")


def read_model_config(folder: Path) -> dict:
    """The model facts a hero needs, read from ``folder/config.json``; UsageError naming the
    file and the fix when they are not there."""
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise UsageError(f"--from {folder}: no such folder; give the model folder "
                         "(what save_pretrained writes: config.json, weights, tokenizer files).")
    if not config_path.is_file():
        raise UsageError(f"{config_path}: missing; a model folder holds config.json (transformers' "
                         "format) beside its weights. Download the whole model folder, or "
                         "save it with save_pretrained.")
    try:
        data = json.loads(read_regular(config_path, MAX_CONFIG_BYTES, "model config"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config_path}: not valid JSON ({exc}); download it again.") from None
    if not isinstance(data, dict):
        raise UsageError(f"{config_path}: must be a JSON object, got {type(data).__name__}.")
    archs = data.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in ARCHITECTURES:
        raise UsageError(f"{config_path}: architectures is {archs!r}; realm trains "
                         f"{', '.join(ARCHITECTURES)}. Pick a model of one of these "
                         "architectures.")
    vocab = data.get("vocab_size")
    context = next((data[k] for k in CONTEXT_KEYS if isinstance(data.get(k), int)), None)
    for key, value in (("vocab_size", vocab), ("max_position_embeddings", context)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{config_path}: '{key}' is missing or not a positive integer "
                             f"({value!r}); the file is damaged or not a causal LM config.")
    return {"architecture": arch, "vocab_size": vocab, "context_length": context}


def _chat_template(folder: Path) -> str:
    """``tokenizer`` when the folder's tokenizer brings a chat template, else realm's ChatML."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return "tokenizer"
    try:
        config = json.loads(read_regular(folder / "tokenizer_config.json", MAX_CONFIG_BYTES,
                                         "tokenizer config"))
    except (OSError, ValueError):
        return "builtin"
    return "tokenizer" if isinstance(config, dict) and config.get("chat_template") else "builtin"


def add_hero_from_folder(paths: RealmPaths, name: str, folder: Path, *,
                         force: bool = False) -> Path:
    """Write ``configs/heroes/NAME.yaml`` for the model in ``folder``; returns its path."""
    check_name(name, "hero")
    folder = Path(folder).expanduser().resolve()
    facts = read_model_config(folder)
    target = paths.heroes / f"{name}.yaml"
    if target.exists() and not force:
        raise UsageError(f"{target} already exists; choose another NAME or pass --force to "
                         "replace it.")
    profile = {"id": name, "name": name,
               "description": f"{facts['architecture']} from {folder} (realm hero add)",
               "model": {**facts, "path": str(folder), "init": "pretrained"},
               "tokenizer": {"kind": "pretrained", "path": str(folder)},
               "chat": {"template": _chat_template(folder)}}
    text = yaml.safe_dump(profile, sort_keys=False, allow_unicode=True)
    paths.heroes.mkdir(parents=True, exist_ok=True)
    write_atomic(target, text.encode("utf-8"))
    load_hero_file(target)  # what `hero show` and the trainer will read: checked now
    return target
