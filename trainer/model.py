"""Model and tokenizer from a hero profile, a local folder, or a campaign checkpoint.

Sources, in order: a checkpoint to continue from; the hero's ``model.path``
(``from_pretrained(..., local_files_only=True)``); its ``hf_name`` looked up in the local
Hugging Face cache only (nothing is downloaded); or ``init: random`` with ``model.config`` and,
for ``tokenizer.kind: byte``, the byte-level tokenizer built here in code. The loaded model's
config is checked against the locked block.

Never runs code from a model folder: a folder whose config.json or tokenizer_config.json asks
for custom code (``auto_map``, i.e. ``trust_remote_code``) is refused with a permanent
``InputError``; a checkpoint whose weights a safe load refuses is ``UnsafeCheckpoint``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from core.errors import ConfigError, InputError
from core.validate import read_regular
from guild.heroes import MAX_TEMPLATE_BYTES, chat_template_path
from guild.heroes.model_folder import ARCHITECTURES
from trainer.checkpoint import UnsafeCheckpoint
from trainer.data.tokenize import stop_token_ids

# Weight-loading progress bars are noise in job logs, and tqdm's monitor thread outlives them.
transformers.utils.logging.disable_progress_bar()

# Architecture name -> transformers model_type, for heroes built from a config (a registry, not a
# dotted path from a file: an unknown name lists the known ones).
MODEL_TYPES = ARCHITECTURES

BYTE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Minimal ChatML-style template for the byte tokenizer, rendering tool calls as Qwen does
# (<tool_call> JSON </tool_call>). {% generation %} marks the assistant tokens so
# apply_chat_template can return an exact assistant mask (see shared/FACTS.md).
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>\n' + (call['function'] | tojson) + '\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens plus 3 specials: round-trips any UTF-8 text, needs no files."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>",
                                  additional_special_tokens=BYTE_SPECIALS[1:])
    tok.add_special_tokens({"additional_special_tokens": BYTE_SPECIALS[1:]})
    tok.chat_template = BYTE_CHAT_TEMPLATE
    return tok


def random_model(hero, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    arch = hero.model.architecture
    if arch not in MODEL_TYPES:
        raise ConfigError(f"{hero.source}: model.architecture '{arch}' cannot be built from a "
                          f"config; known: {', '.join(MODEL_TYPES)}.")
    config = AutoConfig.for_model(MODEL_TYPES[arch], vocab_size=hero.model.vocab_size,
                                  architectures=[arch], **hero.model.config)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


def pretrained_source(hero) -> str:
    model = hero.model
    if model.path:
        if not Path(model.path).is_dir():
            raise InputError(f"{hero.source}: model.path '{model.path}' does not exist; download "
                             f"the model folder there (config.json, *.safetensors, tokenizer "
                             f"files) or fix the path.")
        return model.path
    return model.hf_name


def _refuse_custom_code(source: str, hero) -> None:
    folder = Path(source)
    if not folder.is_dir():
        return
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / name).read_bytes()[:1 << 22])
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(data, dict) and (data.get("auto_map") or data.get("trust_remote_code")):
            raise InputError(
                f"model folder {folder} needs custom code ({name} has auto_map: its classes live "
                f"in Python files shipped with the model, loaded only with trust_remote_code). "
                f"realm never runs code from a model folder: use a model whose architecture "
                f"transformers implements (known to realm: {', '.join(MODEL_TYPES)}), and set "
                f"model.path in configs/heroes/{hero.id}.yaml to it.")


def from_pretrained(source: str, hero, checkpoint: bool = False,
                    dtype: torch.dtype = torch.float32, **load: Any) -> tuple[torch.nn.Module, Any]:
    """Model and tokenizer from a local folder (or the local cache), in ``dtype``; ``load``
    goes to ``from_pretrained`` as is (a quantization config, a device map)."""
    _refuse_custom_code(source, hero)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True,
                                                     attn_implementation="sdpa", dtype=dtype,
                                                     **load)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except pickle.UnpicklingError:
        if checkpoint:
            raise UnsafeCheckpoint.of(Path(source), "its weights file") from None
        raise InputError(f"model folder {source}: its weights file holds objects a safe load "
                         "does not allow (it may be malicious); use a safetensors copy of the "
                         "model.") from None
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise InputError(f"model '{source}' for hero {hero.id} needs custom code "
                         "(trust_remote_code); realm never runs code from a model folder: use "
                         "a model whose architecture transformers implements.") from None
    except OSError as exc:
        raise InputError(
            f"cannot load model '{source}' for hero {hero.id} without a download ({exc}). This "
            f"machine cannot reach a model hub: put the model folder on disk and set model.path "
            f"in configs/heroes/{hero.id}.yaml.") from None
    return model, tokenizer


def load_model(hero, locked: dict, *, checkpoint: Path | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a hero, continuing from ``checkpoint`` when given; weights in
    ``dtype`` (``training.param_dtype``)."""
    if checkpoint is not None:
        model, tokenizer = from_pretrained(str(checkpoint), hero, checkpoint=True, dtype=dtype)
    elif hero.model.init == "random":
        model, tokenizer = random_model(hero, seed, dtype), random_init_tokenizer(hero)
    else:
        model, tokenizer = from_pretrained(pretrained_source(hero), hero, dtype=dtype)
    finish_loaded(model, tokenizer, hero, locked, source=str(checkpoint or hero.source))
    return model, tokenizer


def random_init_tokenizer(hero):
    """The tokenizer of a hero with ``init: random``: the byte tokenizer, or its own files."""
    if hero.tokenizer.get("kind") == "byte":
        return build_byte_tokenizer()
    return AutoTokenizer.from_pretrained(hero.tokenizer["path"], local_files_only=True)


def finish_loaded(model, tokenizer, hero, locked: dict, *, source: str) -> None:
    """What every loaded model gets: the locked check, a pad token, the hero's chat template and
    the stop tokens in its generation config."""
    check_against_locked(model.config, locked, source=source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = hero_chat_template(hero)
    if template is not None:
        tokenizer.chat_template = template
    set_generation_tokens(model, tokenizer)


def hero_chat_template(hero) -> str | None:
    """The template the hero's ``chat.template`` names (None: keep the tokenizer's own)."""
    choice = (hero.chat or {}).get("template", "tokenizer")
    if choice == "tokenizer":
        return None
    if choice == "builtin":
        return BYTE_CHAT_TEMPLATE
    path = chat_template_path(hero.source, choice)
    try:
        text = read_regular(path, MAX_TEMPLATE_BYTES, "chat template").decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{hero.source}: chat.template {path} does not exist; write the "
                         "template there or fix the path in the hero profile.") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: the chat template is not UTF-8 (byte {exc.start}).") from None
    from jinja2 import TemplateError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        _compile_jinja_template(text)
    except TemplateError as exc:
        raise InputError(f"{path}:{getattr(exc, 'lineno', '?')}: the chat template does not "
                         f"compile: {exc}; fix the Jinja syntax.") from None
    return text


def set_generation_tokens(model, tokenizer) -> None:
    """EOS, end of turn, BOS and padding into the model's config and generation config, so every
    checkpoint saved from it stops ``generate()`` and ``pipeline("text-generation")`` at the end
    of its turn."""
    stops = stop_token_ids(tokenizer)
    if not stops:
        return
    for config in (model.config, model.generation_config):
        config.eos_token_id = stops if config is model.generation_config else stops[0]
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
    model.generation_config._from_model_config = False  # ours, not derived from config.json


def check_against_locked(config, locked: dict, *, source: str) -> None:
    archs = list(getattr(config, "architectures", None) or [])
    problems = []
    if locked.get("model_architecture") and archs and archs[0] != locked["model_architecture"]:
        problems.append(f"architecture {archs[0]} != locked {locked['model_architecture']}")
    if locked.get("vocab_size") and config.vocab_size != locked["vocab_size"]:
        problems.append(f"vocab_size {config.vocab_size} != locked {locked['vocab_size']}")
    if problems:
        raise ConfigError(f"{source}: loaded model does not match the campaign's locked "
                          f"architecture: {'; '.join(problems)}.")
