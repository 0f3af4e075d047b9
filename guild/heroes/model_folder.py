"""What a model folder says about itself: the facts a hero needs, read from its ``config.json``
(transformers' format), for ``realm hero add --from`` and for a hero that gives only
``model.path``. Reads JSON only; nothing in the folder is run.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import UsageError
from core.validate import read_regular

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2",
                 "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
"""Architectures realm trains (``architectures[0]`` of config.json) and their model_type."""
MAX_CONFIG_BYTES = 1 << 20
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length")


def read_model_config(folder: Path, what: str = "--from") -> dict:
    """The model facts a hero needs, read from ``folder/config.json``; UsageError naming the
    file and the fix when they are not there."""
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise UsageError(f"{what} {folder}: no such folder; give the model folder "
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


def chat_template_of(folder: Path) -> str:
    """``tokenizer`` when the folder's tokenizer brings a chat template, else realm's ChatML."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return "tokenizer"
    try:
        config = json.loads(read_regular(folder / "tokenizer_config.json", MAX_CONFIG_BYTES,
                                         "tokenizer config"))
    except (OSError, ValueError):
        return "builtin"
    return "tokenizer" if isinstance(config, dict) and config.get("chat_template") else "builtin"
