"""Campaigns: one training lineage of one hero, ``campaigns/<hero>/<name>/campaign.json``.

Exactly one campaign is active, named by ``campaigns/active.json``. Both files are written
atomically. A campaign is created whole or not at all: its folder is assembled under a hidden
temporary name and renamed into place without replacing anything, so a duplicate name fails and
leaves the first campaign untouched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from config.layers import resolve_layers
from config.locked import LOCKED_FIELDS
from config.reader import load_json_object
from core.errors import CampaignNotFound, ConfigError, UsageError
from core.fsutil import rename_noreplace, write_json_atomic
from core.job import utc_now
from core.paths import RealmPaths, check_name
from core.validate import did_you_mean
from guild.heroes import load_hero

CAMPAIGN_SCHEMA = 1
_FIELDS = {"schema", "name", "hero_id", "description", "created_at", "status", "overrides",
           "code_version", "config_hash"}


@dataclass
class Campaign:
    name: str
    hero_id: str
    description: str = ""
    created_at: str = field(default_factory=utc_now)
    status: str = "open"
    overrides: dict = field(default_factory=dict)
    code_version: Optional[str] = None
    config_hash: Optional[str] = None
    path: Optional[Path] = None
    """The campaign.json this was read from (not stored)."""
    stray: dict = field(default_factory=dict)
    """Top-level keys campaign.json holds besides its fields (reported by the resolver)."""

    @property
    def ref(self) -> str:
        return f"{self.hero_id}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"schema": CAMPAIGN_SCHEMA, "name": self.name, "hero_id": self.hero_id,
                "description": self.description, "created_at": self.created_at,
                "status": self.status, "overrides": self.overrides,
                "code_version": self.code_version, "config_hash": self.config_hash}


def campaign_dir(paths: RealmPaths, hero_id: str, name: str) -> Path:
    return paths.campaigns / check_name(hero_id, "hero") / check_name(name, "campaign")


def code_version() -> str | None:
    """Short git hash of the realm code, or None outside a git checkout."""
    src = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def read_campaign(path: Path) -> Campaign:
    """A campaign.json, read through the validation kit (bounded, never a symlink or FIFO)."""
    data = load_json_object(path, "campaign.json", '{"name": ..., "hero_id": ..., "overrides": {}}')
    problems = []
    stray = {k: v for k, v in data.items() if k not in _FIELDS}
    for key in stray:
        if key not in LOCKED_FIELDS and key != "locked":
            hint = did_you_mean(key, sorted(_FIELDS))
            problems.append(f"{path}: unknown key '{key}'{hint}.")
    if not isinstance(data.get("overrides", {}), dict):
        problems.append(f"{path}: 'overrides' must be an object.")
    for key, what in (("name", "campaign"), ("hero_id", "hero")):
        if not isinstance(data.get(key), str):
            problems.append(f"{path}: missing or invalid '{key}' (a string naming the {what}).")
            continue
        try:
            check_name(data[key], key)
        except UsageError as exc:
            problems.append(f"{path}: {exc}")
    if problems:
        raise ConfigError(problems)
    known = {k: v for k, v in data.items() if k in _FIELDS and k != "schema"}
    return Campaign(**known, path=path,
                    stray={k: v for k, v in stray.items() if k in LOCKED_FIELDS or k == "locked"})


def list_campaigns(paths: RealmPaths) -> list[Campaign]:
    out = []
    for path in sorted(paths.campaigns.glob("*/*/campaign.json")):
        if not path.parent.name.startswith("."):
            out.append(read_campaign(path))
    return out


def survey_campaigns(paths: RealmPaths) -> tuple[list[Campaign], list[tuple[Path, str]]]:
    """Every readable campaign, and (file, reason) for each campaign.json that is not: one
    broken file does not hide the others from `realm campaign list`."""
    good, bad = [], []
    for path in sorted(paths.campaigns.glob("*/*/campaign.json")):
        if not path.parent.name.startswith("."):
            try:
                good.append(read_campaign(path))
            except ConfigError as exc:
                bad.append((path, str(exc)))
    return good, bad


def survey_with_active(paths: RealmPaths) -> tuple[list[Campaign], str | None, list[dict]]:
    """(readable campaigns, the active one's ref, problems as ``{"path", "problem"}``): what
    `realm campaign list` and the dashboard show; a broken campaign.json or active.json is a
    problem listed, never a failure."""
    campaigns, broken = survey_campaigns(paths)
    problems = [{"path": str(path), "problem": reason} for path, reason in broken]
    try:
        active = active_ref(paths)
    except ConfigError as exc:
        active = None
        problems.append({"path": str(paths.campaigns / "active.json"), "problem": str(exc)})
    return campaigns, active, problems


def active_ref(paths: RealmPaths) -> str | None:
    pointer = paths.campaigns / "active.json"
    if not os.path.lexists(pointer):
        return None
    fix = "fix it or run `realm campaign activate HERO/NAME`"
    data = load_json_object(pointer, "active.json", '{"hero_id": ..., "campaign": ...}')
    try:
        return f"{check_name(data['hero_id'], 'hero')}/{check_name(data['campaign'], 'campaign')}"
    except (KeyError, TypeError):
        raise ConfigError(f"{pointer}: expected {{\"hero_id\": ..., \"campaign\": ...}}; "
                          f"{fix}.") from None
    except UsageError as exc:
        raise ConfigError(f"{pointer}: {exc} Then {fix}.") from None


def parse_campaign_ref(ref: str, what: str = "campaign") -> tuple[str | None, str]:
    """``HERO/NAME`` -> (hero, name); ``NAME`` -> (None, name). The one reader of a campaign
    reference: ``--campaign`` of every command, ``campaign activate|show`` and a sidecar's
    ``campaign_id`` all go through it. Each part must be a safe name."""
    if not isinstance(ref, str) or not ref or ref.count("/") > 1:
        raise UsageError(f"{what} {ref!r}: name a campaign as HERO/NAME (for example "
                         "tiny-qwen3/demo) or as NAME alone when only one hero has it.")
    hero_id, _, name = ref.rpartition("/")
    return (check_name(hero_id, f"{what} hero") if hero_id else None,
            check_name(name, f"{what} name"))


def find_campaign(paths: RealmPaths, ref: str | None = None, *, hero_id: str | None = None,
                  what: str = "campaign") -> Campaign:
    """A campaign by ``HERO/NAME``, by a name unique across heroes (or under ``hero_id``), or
    the active one."""
    ref = ref or active_ref(paths)
    if ref is None:
        raise UsageError("no campaign is active; create one with `realm campaign create NAME "
                         "--hero HERO` or name one with --campaign HERO/NAME.")
    ref_hero, name = parse_campaign_ref(ref, what)
    if ref_hero and hero_id and ref_hero != hero_id:
        raise UsageError(f"{what} {ref!r} belongs to hero '{ref_hero}', not '{hero_id}'; name "
                         "one or the other.")
    ref_hero = ref_hero or hero_id
    if ref_hero:
        path = campaign_dir(paths, ref_hero, name) / "campaign.json"
        if not path.exists():
            raise CampaignNotFound(f"no campaign '{ref_hero}/{name}' ({path} does not exist); "
                                   "`realm campaign list` shows the campaigns.")
        return read_campaign(path)
    # only the folders of that name are read: another campaign's broken file does not matter
    found = [p for p in sorted(paths.campaigns.glob(f"*/{name}/campaign.json"))
             if not p.parent.name.startswith(".")]
    matches = [read_campaign(found[0])] if len(found) == 1 else found
    if len(matches) != 1:
        which = "no campaign" if not matches else f"{len(matches)} campaigns"
        heroes = f" (heroes: {', '.join(p.parent.parent.name for p in found)})" if found else ""
        error = CampaignNotFound if not matches else UsageError
        raise error(f"{which} named '{name}'{heroes}; give it as HERO/NAME "
                    "(`realm campaign list` shows them).")
    return matches[0]


def activate(paths: RealmPaths, ref: str) -> Campaign:
    campaign = find_campaign(paths, ref)
    write_json_atomic(paths.campaigns / "active.json",
                      {"schema": CAMPAIGN_SCHEMA, "hero_id": campaign.hero_id,
                       "campaign": campaign.name, "activated_at": utc_now()})
    return campaign


def create_campaign(paths: RealmPaths, name: str, hero_id: str, *, overrides: dict | None = None,
                    description: str = "", activate_it: bool = True,
                    check: Callable[[Any], None] | None = None) -> Campaign:
    """Validate overrides through the resolver (and ``check``, given the resolved config: what
    this machine can run), then create the folder atomically."""
    final = campaign_dir(paths, hero_id, name)
    campaign = Campaign(name=name, hero_id=hero_id, description=description,
                        overrides=overrides or {}, code_version=code_version())
    resolved = resolve_layers(paths, load_hero(paths, hero_id), campaign)  # raises on bad overrides
    if check is not None:
        check(resolved.config)
    campaign.config_hash = resolved.config_hash
    if final.exists():
        raise UsageError(f"campaign '{hero_id}/{name}' already exists ({final}); choose another "
                         "name (nothing was changed).")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{name}.{secrets.token_hex(4)}.tmp"
    (tmp / "checkpoints").mkdir(parents=True)
    try:
        write_json_atomic(tmp / "campaign.json", campaign.to_dict())
        rename_noreplace(tmp, final)
    except FileExistsError:
        raise UsageError(f"campaign '{hero_id}/{name}' already exists ({final}); choose another "
                         "name (nothing was changed).") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)  # our own scratch folder, never the campaign
    campaign.path = final / "campaign.json"
    if activate_it:
        activate(paths, campaign.ref)
    return campaign
