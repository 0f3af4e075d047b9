"""Gather the six layers for one realm, hero, campaign and job, and resolve them.

Which hero and campaign: the job's own ``hero_id`` / ``campaign_id`` first, then the ones named
on the command line, then the active campaign, then the embedded default hero ``tiny-qwen3``
(no campaign layer).
"""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import ConfigError, RealmError, UsageError
from core.job import Job, name_problem
from core.paths import RealmPaths
from guild.campaigns import Campaign, active_ref, find_campaign
from guild.heroes import DEFAULT_HERO, HeroProfile, load_hero
from trainer.config.loader import Layer, Resolved, check_layer, resolve
from trainer.config.sources import load_json_object


def _rel(paths: RealmPaths, path: Path | None) -> str:
    return paths.relative(Path(path)) if path else "<unsaved>"


def hero_layer(paths: RealmPaths, hero: HeroProfile) -> Layer:
    lines = {k.removeprefix("training_defaults."): v for k, v in hero.lines.items()
             if k.startswith("training_defaults.")}
    return Layer("hero", _rel(paths, hero.source), hero.training_defaults, lines=lines)


def campaign_layer(paths: RealmPaths, campaign: Campaign) -> Layer:
    source = _rel(paths, campaign.path) if campaign.path else \
        f"campaigns/{campaign.hero_id}/{campaign.name}/campaign.json"
    return Layer("campaign", source, {**campaign.overrides, **campaign.stray})


def realm_layer(paths: RealmPaths) -> Layer | None:
    path = paths.base / "config.json"
    if not os.path.lexists(path):
        return None
    values = load_json_object(path, "realm config.json", '{"training": {"epochs": 2}}')
    return Layer("realm", _rel(paths, path), values)


def job_layer(paths: RealmPaths, job: Job) -> Layer:
    sidecar = paths.base / (job.dataset_path + ".job.json")
    return Layer("job", _rel(paths, sidecar), job.overrides)


def _check_job_names(job: Job) -> None:
    """A sidecar's hero_id / campaign_id must be safe names before they become paths: a
    300-character one is refused naming the sidecar, never an ENAMETOOLONG from the OS."""
    for field_name in ("hero_id", "campaign_id"):
        if (problem := name_problem(field_name, getattr(job, field_name))):
            raise ConfigError(f"{job.dataset_path}.job.json: {problem} Fix {field_name} in the "
                              "sidecar (or remove it to use the active campaign).")


def _choose(paths: RealmPaths, hero_id: str | None, campaign: Campaign | str | None,
            job: Job | None) -> tuple[HeroProfile, Campaign | None]:
    if job is not None:
        _check_job_names(job)
    if job is not None and job.campaign_id:
        ref = job.campaign_id if "/" in job.campaign_id or not job.hero_id else \
            f"{job.hero_id}/{job.campaign_id}"
        campaign = ref
    if job is not None and job.hero_id:
        hero_id = job.hero_id
    if isinstance(campaign, str):
        campaign = find_campaign(paths, campaign)
    if campaign is None and hero_id is None and active_ref(paths):
        campaign = find_campaign(paths)
    if campaign is not None:
        if hero_id and hero_id != campaign.hero_id:
            raise UsageError(f"hero '{hero_id}' does not match campaign '{campaign.ref}' (hero "
                             f"'{campaign.hero_id}'); name one or the other.")
        hero_id = campaign.hero_id
    return load_hero(paths, hero_id or DEFAULT_HERO), campaign


class CampaignOf:
    """The campaign a job will train (``hero/name``): its own ``campaign_id``, else the active
    one; None when it has none or its names do not resolve (training will say why). Memoised by
    (campaign_id, hero_id): a queue of thousands of jobs names a handful of campaigns."""

    def __init__(self, paths: RealmPaths):
        self.paths = paths
        self._memo: dict[tuple[str, str], str | None] = {}

    def __call__(self, job: Job) -> str | None:
        key = (repr(job.campaign_id)[:200], repr(job.hero_id)[:200])
        if key not in self._memo:
            try:
                chosen = _choose(self.paths, None, None, job)[1]
            except (RealmError, OSError, ValueError, TypeError, RecursionError):
                chosen = None  # one job's bad sidecar never stops the caller: its child says why
            self._memo[key] = chosen.ref if chosen else None
        return self._memo[key]


def resolve_for(paths: RealmPaths, *, hero_id: str | None = None,
                campaign: Campaign | str | None = None, job: Job | None = None,
                cli: Layer | None = None) -> Resolved:
    """Resolve the six layers for a job (or, without one, for the command line alone)."""
    hero, chosen = _choose(paths, hero_id, campaign, job)
    layers = [hero_layer(paths, hero)]
    if chosen is not None:
        layers.append(campaign_layer(paths, chosen))
    if (realm := realm_layer(paths)) is not None:
        layers.append(realm)
    if job is not None:
        layers.append(job_layer(paths, job))
    if cli is not None:
        layers.append(cli)
    return resolve(layers, hero, campaign=chosen.ref if chosen else None)


def check_training_defaults_raw(values: dict, source: Path, lines: dict[str, int]) -> list[str]:
    """Problems in a hero's training_defaults (unknown keys, types), naming file and line."""
    key_lines = {k.removeprefix("training_defaults."): v for k, v in lines.items()}
    return check_layer(Layer("hero", str(source), values, lines=key_lines))[1]
