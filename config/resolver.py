"""The config resolver: six layers, later wins, every value remembering where it came from.

    1 schema    dataclass defaults (config/schema.py)
    2 hero      configs/heroes/<hero>.yaml  training_defaults
    3 campaign  campaigns/<hero>/<campaign>/campaign.json  overrides
    4 realm     <realm>/config.json
    5 job       <dataset>.job.json  overrides
    6 cli       command-line flags, then --set a.b=c (a flag not given overrides nothing)

Unknown keys get a did-you-mean, types are checked (strings from --set or YAML are parsed),
NaN, Infinity and integers past ``core.validate.MAX_INT`` are refused in every layer, bounds and
cross-field rules are checked, and every problem of one resolution is reported in one
ConfigError. No layer may set a locked field: ``build_locked_config`` alone produces ``locked``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from config.locked import LOCKED_FIELDS, adapter_shape, build_locked_config
from config.reader import number_problem
from config.schema import (BOUNDS, SECTIONS, FieldSpec, RealmConfig, field_specs, from_flat,
                           string_problem, to_nested)
from core.errors import ConfigError
from core.validate import MAX_DEPTH, closest

LAYERS = ("schema", "hero", "campaign", "realm", "job", "cli")
SPECS = field_specs()
RECORD_SCHEMA = 1
"""Version of ``Resolved.record()`` (the recorded config of a job and of a checkpoint)."""

@dataclass
class Layer:
    """Values one layer sets, as written (nested or dotted keys), and where they came from."""

    name: str
    source: str
    values: dict
    key_sources: dict[str, str] = field(default_factory=dict)
    """Per-key source where it differs from ``source`` (e.g. ``--learning-rate``)."""
    lines: dict[str, int] = field(default_factory=dict)

    def where(self, key: str) -> str:
        src = self.key_sources.get(key, self.source)
        line = self.lines.get(key)
        return f"{src}:{line}" if line else src


@dataclass
class Resolved:
    """A resolved config with provenance and the locked block."""

    config: RealmConfig
    locked: dict[str, Any]
    provenance: dict[str, tuple[str, str]]
    """dotted key -> (layer, source)."""
    hero_id: str
    campaign: str | None = None

    def get(self, key: str) -> Any:
        section, name = key.split(".", 1)
        return getattr(getattr(self.config, section), name)

    def canonical(self) -> dict[str, Any]:
        return {"config": to_nested(self.config), "locked": self.locked}

    @property
    def config_hash(self) -> str:
        """sha256 of the canonical resolved values: the config and the architecture.

        Provenance and ``locked.model_version`` (the lineage name) are left out, so two campaigns
        resolved to the same settings on the same model have the same hash.
        """
        arch = {k: v for k, v in self.locked.items() if k != "model_version"}
        canonical = {"config": to_nested(self.config), "locked": arch}
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        """What a job keeps of the config it trained with (``Job.resolved_config``, a
        checkpoint's ``realm_config.json``): values, the locked block and each key's layer and
        source, with the hash. ``realm config show --job`` prints it back as is."""
        return {"schema": RECORD_SCHEMA, "hero": self.hero_id, "campaign": self.campaign,
                "config_hash": self.config_hash, **self.canonical(), "explain": self.explain()}

    def explain(self) -> list[dict[str, Any]]:
        rows = [{"key": k, "value": self.get(k), "layer": layer, "source": src}
                for k, (layer, src) in self.provenance.items()]
        return rows + [{"key": f"locked.{k}", "value": v, "layer": "locked",
                        "source": "build_locked_config(hero)"} for k, v in self.locked.items()]


# --- one layer ---------------------------------------------------------------------------------

OPERATIONAL_SECTIONS = ("daemon", "logging")
"""Sections that change how a job is run and reported, never what a step computes: a resume
point written under other values of them is still exact."""


def training_changes(recorded: dict[str, Any], config: RealmConfig) -> list[str]:
    """``key: old -> new`` for every key outside the operational sections whose value in
    ``config`` differs from a recorded config's (``Resolved.record()["config"]``, nested). A key
    the record lacks (added to the schema since) differs only when ``config`` moved it off its
    default: a new key's default keeps the old behaviour. A record that is not a mapping of
    sections (a damaged file) raises TypeError: read as "every key at its default", it would
    let a resume through unjudged."""
    if not isinstance(recorded, dict) or any(
            not isinstance(recorded[s], dict) for s in SECTIONS if s in recorded):
        raise TypeError("the recorded config is not a mapping of sections")
    old = dict(flatten(recorded))
    out = []
    for key, spec in SPECS.items():
        if key.split(".", 1)[0] in OPERATIONAL_SECTIONS:
            continue
        section, name = key.split(".", 1)
        value = getattr(getattr(config, section), name)
        was = old.get(key, spec.default)
        if was != value:
            out.append(f"{key}: {was!r} -> {value!r}")
    return out


def flatten(values: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested and dotted keys alike -> [(dotted key, leaf value)]."""
    if not isinstance(values, dict) or prefix.count(".") >= MAX_DEPTH:
        return [(prefix, values)]
    out = []
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and (dotted in SECTIONS or dotted == "locked"
                                        or dotted not in SPECS):
            out += flatten(value, dotted) if value else [(dotted, value)]
        else:
            out.append((dotted, value))
    return out


def _unknown(key: str) -> str:
    section = key.split(".")[0]
    best = closest(key, list(SPECS))
    spelt = section in SECTIONS or difflib.get_close_matches(key, list(SPECS), n=1, cutoff=0.6)
    if best and spelt:  # a key of a known section, or the section misspelt
        return f"unknown key '{key}' (did you mean '{best}'?)"
    if section in SECTIONS:
        names = ", ".join(k.split(".", 1)[1] for k in SPECS if k.startswith(section + "."))
        return f"unknown key '{key}' (section '{section}' has: {names})"
    hint = f" Did you mean '{best}'?" if best else ""
    return f"unknown key '{key}' (sections: {', '.join(SECTIONS)}).{hint}"


_INT = re.compile(r"[+-]?\d+")


def coerce(spec: FieldSpec, value: Any) -> tuple[bool, Any]:
    """(True, typed value) or (False, what was expected)."""
    if isinstance(spec.type, tuple) and value in spec.type:  # "none" can be a choice
        return True, value
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        return (True, None) if spec.optional else (False, "a value (null is not allowed here)")
    kind = spec.type
    if isinstance(kind, tuple):
        return (True, value) if value in kind else (False, f"one of {', '.join(kind)}")
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return True, value.lower() == "true"
        return (True, value) if isinstance(value, bool) else (False, "true or false")
    if isinstance(value, bool):
        return False, _EXPECTED[kind]
    if kind is int:
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            try:
                return True, int(value)
            except ValueError:  # more digits than Python converts: far past MAX_INT anyway
                return False, "an integer of at most 16 digits"
        return (True, value) if isinstance(value, int) else (False, "an integer")
    if kind is float:
        try:
            return (True, float(value)) if isinstance(value, (int, float, str)) else (False, "")
        except (ValueError, OverflowError):
            return False, "a finite number"
    return (True, value) if isinstance(value, kind) else (False, _EXPECTED.get(kind, str(kind)))


_EXPECTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def check_layer(layer: Layer) -> tuple[dict[str, Any], list[str]]:
    """Typed dotted values of one layer, and its problems (each naming key and source)."""
    typed, problems = {}, []
    if not isinstance(layer.values, dict):
        return {}, [f"the {layer.name} layer ({layer.source}) must be an object of config keys "
                    f"such as {{\"training\": {{\"epochs\": 2}}}}, got "
                    f"{type(layer.values).__name__} {_short(layer.values)}; rewrite it."]
    for key, value in flatten(layer.values):
        parts = key.split(".")
        if parts[0] == "locked" or parts[-1] in LOCKED_FIELDS:
            problems.append(
                f"{key}: set by the {layer.name} layer ({layer.where(key)}), but the locked "
                "architecture comes only from the hero profile (build_locked_config); remove it "
                "(to train another architecture, create a campaign on another hero).")
        elif key not in SPECS:
            problems.append(f"{_unknown(key)}, set by the {layer.name} layer ({layer.where(key)}).")
        else:
            ok, result = coerce(SPECS[key], value)
            bad_number = number_problem(value, key) or (ok and number_problem(result, key))
            if bad_number:
                problems.append(f"{bad_number} (from the {layer.name} layer, "
                                f"{layer.where(key)}).")
            elif ok and string_problem(key, result):
                problems.append(f"{string_problem(key, result)} (from the {layer.name} layer, "
                                f"{layer.where(key)}).")
            elif ok:
                typed[key] = result
            else:
                problems.append(f"{key}: expected {result or _EXPECTED[SPECS[key].type]}, got "
                                f"{_short(value)} (from the {layer.name} layer, "
                                f"{layer.where(key)}).")
    return typed, problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_values(layer: Layer) -> list[str]:
    """Problems of one layer on its own: unknown keys, types, non-finite numbers and the bounds
    of the keys it sets (cross-field rules need every layer and the hero: the resolver's)."""
    typed, problems = check_layer(layer)
    provenance = {k: (layer.name, layer.where(k)) for k in typed}
    return problems + _check_bounds(typed, provenance)


# --- all layers --------------------------------------------------------------------------------

def resolve(layers: list[Layer], hero, *, campaign: str | None = None) -> Resolved:
    """Apply ``layers`` (in LAYERS order) over the schema defaults; raise one ConfigError."""
    values = {k: s.default for k, s in SPECS.items()}
    provenance = {k: ("schema", "config/schema.py") for k in SPECS}
    problems: list[str] = []
    for layer in sorted(layers, key=lambda l: LAYERS.index(l.name)):
        typed, layer_problems = check_layer(layer)
        problems += layer_problems
        for key, value in typed.items():
            values[key] = value
            provenance[key] = (layer.name, layer.where(key))
    locked = build_locked_config(hero, None, values["data.max_length"],
                                 model_version=campaign or hero.id, adapter=adapter_shape(values))
    problems += _check_bounds(values, provenance) + _cross_field(values, provenance, locked, hero)
    if problems:
        raise ConfigError(problems)
    return Resolved(from_flat(values), locked, provenance, hero.id, campaign)


def _origin(key: str, provenance: dict) -> str:
    layer, source = provenance[key]
    return f"set by the {layer} layer ({source})"


def _check_bounds(values: dict, provenance: dict) -> list[str]:
    problems = []
    for key, (low, high) in BOUNDS.items():
        value = values.get(key)
        if value is None:
            continue
        # written as "not within" so that a NaN, were one ever to get here, fails the check
        if not ((low is None or value >= low) and (high is None or value <= high)):
            rng = f"at least {low}" if high is None else f"between {low} and {high}"
            problems.append(f"{key}: must be {rng}, got {value} ({_origin(key, provenance)}).")
    return problems


def _cross_field(values: dict, provenance: dict, locked: dict, hero) -> list[str]:
    problems = []
    if values["data.max_length"] > locked["max_context_length"]:
        problems.append(
            f"data.max_length: {values['data.max_length']} is above the hero's context length "
            f"{locked['max_context_length']} ({hero.id}, {hero.source}); "
            f"{_origin('data.max_length', provenance)}. Use at most "
            f"{locked['max_context_length']}.")
    if values["governor.min_history"] > values["governor.window"]:
        problems.append(
            f"governor.min_history: {values['governor.min_history']} is larger than "
            f"governor.window {values['governor.window']}: the window could never hold enough "
            f"history ({_origin('governor.min_history', provenance)}).")
    if values["daemon.lease_seconds"] <= values["daemon.heartbeat_seconds"]:
        problems.append(
            f"daemon.lease_seconds ({values['daemon.lease_seconds']}) must be longer than "
            f"daemon.heartbeat_seconds ({values['daemon.heartbeat_seconds']}), or every lease "
            f"would expire between two heartbeats ({_origin('daemon.lease_seconds', provenance)}).")
    return problems


def check_hero_defaults(values: dict, source, lines: dict[str, int]) -> list[str]:
    """Problems in a hero's ``training_defaults`` (unknown keys, types), naming file and line."""
    key_lines = {k.removeprefix("training_defaults."): v for k, v in lines.items()}
    return check_layer(Layer("hero", str(source), values, lines=key_lines))[1]
