"""The six layers of one resolution, read from where they live in a realm, and their assembly.

    hero      configs/heroes/<hero>.yaml  training_defaults (with line numbers)
    campaign  campaigns/<hero>/<campaign>/campaign.json  overrides
    realm     <realm>/config.json (or config.yaml / config.yml: one of them)
    job       <dataset>.job.json  overrides
    cli       flags and --set (``config.flags``)

Hero and campaign arrive as objects (``guild`` reads them); this module only turns them into
layers, so config never imports the packages that use it. Which hero and campaign a job trains is
``guild.selection``'s question; ``guild.selection.resolve_for`` is the one entry point that
callers use.
"""

from __future__ import annotations

import os
from pathlib import Path

from config.reader import load_json_object, load_yaml
from config.resolver import Layer, Resolved, resolve
from core.errors import ConfigError
from core.job import Job
from core.paths import RealmPaths, sidecar_of


def _rel(paths: RealmPaths, path: Path | None) -> str:
    return paths.relative(Path(path)) if path else "<unsaved>"


def hero_layer(paths: RealmPaths, hero) -> Layer:
    """A ``guild.heroes.HeroProfile``'s ``training_defaults``, with their line numbers."""
    lines = {k.removeprefix("training_defaults."): v for k, v in hero.lines.items()
             if k.startswith("training_defaults.")}
    return Layer("hero", _rel(paths, hero.source), hero.training_defaults, lines=lines)


def campaign_layer(paths: RealmPaths, campaign) -> Layer:
    """A ``guild.campaigns.Campaign``'s overrides (and stray keys, which the resolver refuses)."""
    source = _rel(paths, campaign.path) if campaign.path else \
        f"campaigns/{campaign.hero_id}/{campaign.name}/campaign.json"
    return Layer("campaign", source, {**campaign.overrides, **campaign.stray})


REALM_CONFIG_NAMES = ("config.json", "config.yaml", "config.yml")
"""The realm layer's file: JSON or YAML (read with line numbers), one of them."""


def realm_layer(paths: RealmPaths) -> Layer | None:
    found = [paths.base / n for n in REALM_CONFIG_NAMES if os.path.lexists(paths.base / n)]
    if not found:
        return None
    if len(found) > 1:
        raise ConfigError(f"{paths.base}: {' and '.join(p.name for p in found)} both exist; the "
                          "realm layer is read from one file. Merge them into one and remove the "
                          "other.")
    path = found[0]
    if path.suffix == ".json":
        values = load_json_object(path, "realm config.json", '{"training": {"epochs": 2}}')
        return Layer("realm", _rel(paths, path), values)
    values, lines = load_yaml(path, f"realm {path.name}")
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: realm {path.name} must be a mapping of sections (for example "
                          f"'training: {{epochs: 2}}'), got {type(values).__name__}.")
    return Layer("realm", _rel(paths, path), values, lines=lines)


def job_layer(paths: RealmPaths, job: Job) -> Layer:
    sidecar = sidecar_of(paths.base / job.dataset_path)
    return Layer("job", _rel(paths, sidecar), job.overrides)


def resolve_layers(paths: RealmPaths, hero, campaign=None, job: Job | None = None,
                   cli: Layer | None = None) -> Resolved:
    """Resolve hero, campaign (a HeroProfile and a Campaign from ``guild``), realm, job and cli
    layers (those given) over the schema."""
    layers = [hero_layer(paths, hero)]
    if campaign is not None:
        layers.append(campaign_layer(paths, campaign))
    if (realm := realm_layer(paths)) is not None:
        layers.append(realm)
    if job is not None:
        layers.append(job_layer(paths, job))
    if cli is not None:
        layers.append(cli)
    return resolve(layers, hero, campaign=campaign.ref if campaign else None)
