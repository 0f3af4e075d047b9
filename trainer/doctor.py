"""What ``realm doctor`` asks of the training stack: the torch and transformers versions, CUDA and
bf16, and whether a hero's model config and tokenizer load (never its weights). Imported only
inside that command: the rest of the command line stays free of torch.
"""

from __future__ import annotations

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from core.errors import InputError
from trainer.model import (MODEL_TYPES, _refuse_custom_code, build_byte_tokenizer,
                           hero_chat_template, pretrained_source)


class ModelNotCached(InputError):
    """A hero named by ``hf_name`` alone whose files are not in the local Hugging Face cache:
    nothing is wrong with the profile, the model is just not on this machine (yet)."""


def runtime() -> dict:
    """Versions and the accelerator: torch, transformers, CUDA (its version and the visible
    devices' names) and whether CUDA supports bf16 (None without CUDA)."""
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if cuda else [],
            "bf16": bool(torch.cuda.is_bf16_supported()) if cuda else None}


def check_hero(hero) -> str:
    """Load the hero's model config and tokenizer (no weights) and its chat template, as training
    would; the exception training would meet when one does not load. Returns what loaded."""
    if hero.model.init == "random":
        if hero.model.architecture not in MODEL_TYPES:
            raise InputError(f"{hero.source}: model.architecture '{hero.model.architecture}' "
                             f"cannot be built from a config; known: {', '.join(MODEL_TYPES)}.")
        try:
            AutoConfig.for_model(MODEL_TYPES[hero.model.architecture],
                                 vocab_size=hero.model.vocab_size, **hero.model.config)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{hero.source}: model.config does not make a "
                             f"{hero.model.architecture} config ({exc})") from None
        tokenizer, where = _random_init_tokenizer(hero), "random init"
    else:
        source = pretrained_source(hero)
        if not hero.model.path and not _cached(source):
            raise ModelNotCached(f"{hero.source}: hf_name '{source}' is not in the local Hugging "
                                 "Face cache and realm never downloads")
        _refuse_custom_code(source, hero)
        _loading("model config", source, AutoConfig.from_pretrained)
        tokenizer = _loading("tokenizer", source, AutoTokenizer.from_pretrained)
        where = f"from {source}"
    hero_chat_template(hero)
    return (f"{hero.model.architecture} {where}, tokenizer {type(tokenizer).__name__} "
            f"({len(tokenizer)} tokens)")


def _random_init_tokenizer(hero):
    if hero.tokenizer.get("kind") == "byte":
        return build_byte_tokenizer()
    if not hero.tokenizer.get("path"):
        raise InputError(f"{hero.source}: 'model.init: random' without 'tokenizer.kind: byte' "
                         "needs 'tokenizer.path' (a tokenizer folder)")
    return _loading("tokenizer", hero.tokenizer["path"], AutoTokenizer.from_pretrained)


def _loading(what: str, source: str, load):
    """``load(source)`` from local files only; any failure names what did not load and where."""
    try:
        return load(source, local_files_only=True)
    except Exception as exc:  # tokenizers raises a bare Exception for a damaged tokenizer.json
        raise InputError(f"the {what} in {source} does not load ({type(exc).__name__}: "
                         f"{str(exc)[:300]})") from None


def _cached(hf_name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(hf_name, "config.json"), str)
    except ValueError:  # not a repo id at all: let the load say why
        return True

