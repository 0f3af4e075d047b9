"""The locked architecture block: the one place it is produced, and the check used on resume.

``build_locked_config`` is the ONLY producer of ``locked``. The resolver
refuses any config layer that tries to set one of ``LOCKED_FIELDS``; every checkpoint stores the
block, and continuing from a checkpoint whose block differs is refused with ``verify_locked``'s
diff. What it protects: the shape of the weights (architecture, vocabulary) and the lineage
(which base model, which campaign), which no override can change mid-campaign.
"""

from __future__ import annotations

from typing import Any

LOCKED_FIELDS = ("base_model", "model_architecture", "max_context_length", "vocab_size",
                 "model_version")
LOCKED_DOCS = {
    "base_model": "Where the weights started: the hero's model.path or model.hf_name, or "
                  "random-init:HERO; fixed for the campaign.",
    "model_architecture": "The transformers class the weights belong to (the hero's "
                          "model.architecture); fixed for the campaign.",
    "max_context_length": "The longest sequence the model takes (the hero's "
                          "model.context_length); data.max_length may not exceed it.",
    "vocab_size": "Rows of the embedding matrix (the hero's model.vocab_size); fixed for the "
                  "campaign.",
    "model_version": "realm's version of the locked block itself.",
    "adapter": "The adapter's shape (adapter.method, r, alpha, target_modules, "
               "modules_to_save) as the campaign's first job trained it: a checkpoint's "
               "adapter only fits that shape.",
}
"""What each locked field means (``config show --doc``); no config layer may set one."""


ADAPTER_SHAPE = ("method", "r", "alpha", "target_modules", "modules_to_save")
"""The adapter keys a campaign's checkpoints depend on (dropout may change between jobs)."""
NO_ADAPTER = {"method": "none"}


def adapter_shape(values: dict[str, Any]) -> dict[str, Any]:
    """The locked ``adapter`` entry from resolved dotted values: ``{"method": "none"}`` for full
    fine-tuning, else the shape keys."""
    if values.get("adapter.method", "none") == "none":
        return dict(NO_ADAPTER)
    shape = {k: values[f"adapter.{k}"] for k in ADAPTER_SHAPE}
    for key in ("target_modules", "modules_to_save"):  # the same modules however written
        if isinstance(shape[key], str):
            shape[key] = ",".join(sorted({n.strip() for n in shape[key].split(",")} - {""}))
    return shape


def build_locked_config(hero, model_path: str | None,
                        max_length: int, model_version: str = "v1",
                        adapter: dict[str, Any] | None = None) -> dict[str, Any]:
    """The locked block for a hero (a ``guild.heroes.HeroProfile``, preferred) or, without one,
    for a bare model path.

    With a hero, ``max_context_length`` is the hero's context length (``max_length`` is the
    training row length and is checked against it by the resolver). Without a hero the caller's
    ``max_length`` is the only context length known.
    """
    if hero is not None:
        model = hero.model
        return {
            "base_model": model.path or model.hf_name or f"random-init:{hero.id}",
            "model_architecture": model.architecture,
            "max_context_length": model.context_length,
            "vocab_size": model.vocab_size,
            "model_version": model_version,
            "adapter": adapter or dict(NO_ADAPTER),
        }
    if not model_path:
        raise ValueError("build_locked_config needs a hero profile or a model path")
    return {
        "base_model": model_path,
        "model_architecture": "AutoModelForCausalLM",
        "max_context_length": max_length,
        "vocab_size": None,  # unknown until the model config is read; verified on load
        "model_version": model_version,
        "adapter": adapter or dict(NO_ADAPTER),
    }


def verify_locked(stored: dict[str, Any], current: dict[str, Any], *,
                  stored_name: str = "checkpoint", current_name: str = "campaign") -> str | None:
    """None when the blocks agree, else a readable diff naming every differing field."""
    lines = []
    for key in LOCKED_FIELDS:
        a, b = stored.get(key), current.get(key)
        if a != b:
            lines.append(f"  {key}: {stored_name} has {a!r}, {current_name} has {b!r}")
    # blocks written before adapters existed are full fine-tuning
    a, b = (block.get("adapter") or NO_ADAPTER for block in (stored, current))
    for key in sorted(set(a) | set(b), key=lambda k: (k not in ADAPTER_SHAPE, k)):
        if a.get(key) != b.get(key):
            lines.append(f"  adapter.{key}: {stored_name} has {a.get(key)!r}, {current_name} has "
                         f"{b.get(key)!r}")
    extra = sorted((set(stored) ^ set(current)) - set(LOCKED_FIELDS) - {"adapter"})
    lines += [f"  {key}: present in only one block" for key in extra]
    if not lines:
        return None
    return f"locked architecture differs ({stored_name} vs {current_name}):\n" + "\n".join(lines)
