"""``realm hero add NAME --from PATH``: a hero profile written from a model folder.

The folder is what ``save_pretrained`` writes (or a downloaded hub snapshot): its
``config.json`` gives the architecture (``architectures[0]``), ``vocab_size`` and the context
length (``max_position_embeddings``); the weights and the tokenizer are loaded from the folder
at training time (``model.path``). Nothing in the folder is run: the trainer refuses folders that
ask for custom code when it loads them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from core.errors import UsageError
from core.fsutil import write_atomic
from core.paths import RealmPaths, check_name
from guild.heroes import load_hero_file
from guild.heroes.model_folder import chat_template_of, read_model_config


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
               "chat": {"template": chat_template_of(folder)}}
    text = yaml.safe_dump(profile, sort_keys=False, allow_unicode=True)
    paths.heroes.mkdir(parents=True, exist_ok=True)
    write_atomic(target, text.encode("utf-8"))
    load_hero_file(target)  # what `hero show` and the trainer will read: checked now
    return target
