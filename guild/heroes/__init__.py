"""Hero profiles: which model a campaign trains and its training defaults.

A hero is ``configs/heroes/<id>.yaml`` in the realm, or one of the profiles shipped inside this
package (``guild/heroes/profiles/``, installed into a realm by ``realm init``). A realm's own file
wins over the shipped one of the same id. Files are read with ``yaml.safe_load`` and validated;
every error names the file, the line and the key path. Files are read through the validation kit
(bounded size, no symlink, no FIFO; anchors, depth and numbers checked: see
``config.reader``); ``list_heroes`` keeps one bad file from hiding the good ones.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from config.reader import load_yaml, number_problems, where
from config.resolver import check_hero_defaults
from core.errors import ConfigError, RealmError, UsageError
from core.paths import RealmPaths, check_name
from core.validate import closest, did_you_mean
from guild.heroes.model_folder import read_model_config

DEFAULT_HERO = "tiny-qwen3"

_TOP = {"id": str, "name": str, "description": str, "model": dict, "tokenizer": dict,
        "chat": dict, "training_defaults": dict}
_MODEL = {"architecture": str, "vocab_size": int, "context_length": int, "hf_name": str,
          "path": str, "init": str, "config": dict}
_TOKENIZER = {"kind": str, "path": str}
_CHAT = {"template": str}
_REQUIRED = ("id", "model", "model.architecture", "model.vocab_size", "model.context_length")
_CHOICES = {"model.init": ("pretrained", "random"), "tokenizer.kind": ("pretrained", "byte")}


CHAT_TEMPLATES = ("tokenizer", "builtin")
"""chat.template: the tokenizer's own, realm's ChatML (``builtin``), or a path to a .jinja file."""
MAX_TEMPLATE_BYTES = 1 << 20


def chat_template_path(source: Path, value: str) -> Path:
    """A ``chat.template`` file path, relative paths taken from the hero file's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(source).parent / path


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    context_length: int
    hf_name: Optional[str] = None
    path: Optional[str] = None
    init: str = "pretrained"
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HeroProfile:
    id: str
    name: str
    description: str
    model: ModelSpec
    tokenizer: dict
    chat: dict
    training_defaults: dict
    source: Path
    """The YAML file this profile was read from."""
    lines: dict = field(default_factory=dict, compare=False, repr=False)
    """Line of each key path in ``source`` (for error messages)."""

    def summary(self) -> dict[str, Any]:
        m = self.model
        weights = m.path or m.hf_name or ("random init" if m.init == "random" else None)
        return {"id": self.id, "name": self.name, "architecture": m.architecture,
                "vocab_size": m.vocab_size, "context_length": m.context_length,
                "weights": weights, "source": str(self.source)}


def shipped_dir() -> Path:
    return Path(str(resources.files("guild.heroes") / "profiles"))


def _check_keys(data: dict, schema: dict, prefix: str, path: Path, lines: dict,
                problems: list[str]) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            hint = did_you_mean(dotted, [prefix + k for k in schema])
            problems.append(f"{where(path, lines, dotted)}: unknown key '{dotted}'{hint}.")
        elif value is not None and not _is(value, schema[key]):
            problems.append(f"{where(path, lines, dotted)}: '{dotted}' must be "
                            f"{_NAMES[schema[key]]}, got {value!r}.")
        elif dotted in _CHOICES and value is not None and value not in _CHOICES[dotted]:
            problems.append(f"{where(path, lines, dotted)}: '{dotted}' must be one of "
                            f"{', '.join(_CHOICES[dotted])}, got {value!r}.")


_NAMES = {str: "a string", int: "an integer", dict: "a mapping"}


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _get(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _validate(data: Any, path: Path, lines: dict) -> list[str]:
    if not isinstance(data, dict):
        return [f"{path}: a hero profile must be a YAML mapping (id, model, ...), "
                f"got {type(data).__name__}."]
    problems: list[str] = []
    _check_keys(data, _TOP, "", path, lines, problems)
    for section, schema in (("model", _MODEL), ("tokenizer", _TOKENIZER), ("chat", _CHAT)):
        if isinstance(data.get(section), dict):
            _check_keys(data[section], schema, f"{section}.", path, lines, problems)
    problems += [f"{path}: missing required key '{k}'." for k in _REQUIRED if _get(data, k) is None]
    problems += number_problems(data, path, lines)
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    for key in ("vocab_size", "context_length"):
        value = model.get(key)
        if _is(value, int) and value < 1:
            problems.append(f"{where(path, lines, 'model.' + key)}: 'model.{key}' must be at "
                            f"least 1, got {value}.")
    if model and model.get("init") == "random" and not model.get("config"):
        problems.append(f"{where(path, lines, 'model.init')}: 'model.init: random' needs "
                        "'model.config' (the architecture's config keys).")
    if model and model.get("init", "pretrained") == "pretrained" and not (
            model.get("path") or model.get("hf_name")):
        problems.append(f"{path}: 'model' needs 'path' (a local model folder), 'hf_name', or "
                        "'init: random' with a 'config'.")
    chat = data.get("chat") if isinstance(data.get("chat"), dict) else {}
    template = chat.get("template")
    if isinstance(template, str) and template not in CHAT_TEMPLATES:
        file = chat_template_path(path, template)
        if not template.endswith(".jinja"):
            problems.append(f"{where(path, lines, 'chat.template')}: 'chat.template' is "
                            f"{template!r}; use tokenizer (the tokenizer's own), builtin (realm's "
                            "ChatML) or the path of a .jinja file.")
        elif not file.is_file():
            problems.append(f"{where(path, lines, 'chat.template')}: 'chat.template' file "
                            f"{file} does not exist; write the template there or fix the path (relative "
                            "paths start at the hero file's folder).")
    if isinstance(data.get("id"), str) and data["id"] != path.stem:
        problems.append(f"{where(path, lines, 'id')}: id '{data['id']}' must match the file name "
                        f"'{path.stem}'.")
    return problems


FROM_FOLDER = ("architecture", "vocab_size", "context_length")
"""Model keys a hero with ``model.path`` may leave out: they are read from the folder."""


def _filled_from_folder(data: Any, path: Path) -> Any:
    """A profile whose ``model.path`` is given and some of ``FROM_FOLDER`` are not gets them
    from the folder's config.json (values the file gives win; the trainer checks them against
    the model)."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("path"), str) or \
            all(model.get(k) is not None for k in FROM_FOLDER):
        return data
    try:
        facts = read_model_config(Path(model["path"]).expanduser(), what=f"{path}: model.path")
    except UsageError as exc:
        raise ConfigError([f"{exc} (the model keys {', '.join(FROM_FOLDER)} left out of the "
                           "profile are read from the folder's config.json)"]) from None
    filled = {k: v for k, v in facts.items() if model.get(k) is None}
    return {**data, "model": {**model, **filled}}


def load_hero_file(path: Path) -> HeroProfile:
    path = Path(path)
    data, lines = load_yaml(path)
    data = _filled_from_folder(data, path)
    problems = _validate(data, path, lines)
    if not problems and data.get("training_defaults"):
        problems = check_hero_defaults(data["training_defaults"], path, lines)
    if problems:
        raise ConfigError(problems)
    model = ModelSpec(**{k: v for k, v in data["model"].items() if v is not None})
    return HeroProfile(
        id=data["id"], name=data.get("name") or data["id"],
        description=(data.get("description") or "").strip(), model=model,
        tokenizer=data.get("tokenizer") or {}, chat=data.get("chat") or {},
        training_defaults=data.get("training_defaults") or {}, source=path, lines=lines)


def hero_files(paths: RealmPaths | None) -> dict[str, Path]:
    """Every known hero id -> its file; the realm's own profiles override shipped ones."""
    found = {p.stem: p for p in sorted(shipped_dir().glob("*.yaml"))}
    if paths is not None and paths.heroes.is_dir():
        found.update({p.stem: p for p in sorted(paths.heroes.glob("*.yaml"))})
    return found


def load_hero(paths: RealmPaths | None, hero_id: str) -> HeroProfile:
    check_name(hero_id, "hero")
    files = hero_files(paths)
    if hero_id not in files:
        close = closest(hero_id, list(files))
        hint = f" Did you mean '{close}'?" if close else ""
        raise UsageError(f"unknown hero '{hero_id}'; known heroes: {', '.join(sorted(files))}."
                         f"{hint} Add configs/heroes/{hero_id}.yaml to define it.")
    return load_hero_file(files[hero_id])


@dataclass(frozen=True)
class HeroProblem:
    """A hero file that cannot be loaded, listed beside the good heroes."""

    id: str
    source: Path
    reason: str

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "source": str(self.source), "problem": self.reason}


def list_heroes(paths: RealmPaths | None) -> tuple[list[HeroProfile], list[HeroProblem]]:
    """Every known hero, and every hero file that cannot be loaded with the reason why."""
    heroes, problems = [], []
    for hero_id, path in hero_files(paths).items():
        shown = hero_id.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        try:
            check_name(hero_id, "hero file name")
            heroes.append(load_hero_file(path))
        except RealmError as exc:
            reason = str(exc).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            problems.append(HeroProblem(shown, Path(str(path).encode(
                "utf-8", "surrogateescape").decode("utf-8", "replace")), reason))
    return heroes, problems


def install_shipped(paths: RealmPaths) -> list[Path]:
    """Copy shipped profiles missing from the realm's configs/heroes/ (never overwrites)."""
    paths.heroes.mkdir(parents=True, exist_ok=True)
    installed = []
    for src in sorted(shipped_dir().glob("*.yaml")):
        dst = paths.heroes / src.name
        if not dst.exists() and not dst.is_symlink():
            shutil.copyfile(src, dst)
            installed.append(dst)
    return installed
