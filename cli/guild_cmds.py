"""``realm hero ...``, ``realm campaign ...`` and ``realm config show``.

Heavy modules (yaml, the resolver) are imported inside the handlers; none of them imports torch.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from cli.common import print_json, realm_paths, refuse_unrunnable
from config.flags import add_common_flags, cli_layer_from, parse_sets_checked
from config.reader import MAX_YAML_BYTES
from config.locked import LOCKED_DOCS
from config.resolver import SPECS
from core.errors import UsageError
from core.job import Job
from core.paths import SIDECAR_SUFFIX, sidecar_of
from core.queue_scan import read_sidecar_json, unadopted_job
from core.training_queue import TrainingQueue
from core.validate import read_regular
from guild.campaigns import (activate, active_ref, create_campaign, find_campaign,
                             survey_with_active)
from guild.heroes import list_heroes, load_hero
from guild.heroes.from_folder import add_hero_from_folder
from guild.selection import resolve_for

CONFIG_SCHEMA = 1


# --- heroes ---------------------------------------------------------------------------------

def cmd_hero_list(args) -> int:
    """Good heroes, then each hero file that cannot be loaded with its reason (exit 0: one bad
    file must not hide the others; `hero show NAME` fails with the same reason)."""
    heroes, problems = list_heroes(realm_paths(args, must_exist=False))
    rows = [h.summary() for h in heroes]
    if args.json:
        print_json({"schema": CONFIG_SCHEMA, "heroes": rows,
                    "problems": [p.summary() for p in problems]})
        return 0
    for r in rows:
        print(f"{r['id']:<16} {r['architecture']:<20} vocab {r['vocab_size']:<7} "
              f"context {r['context_length']:<6} {r['weights']}")
    for p in problems:
        print(f"problem: hero {p.id} ({p.source}) cannot be loaded: {p.reason}")
    return 0


def cmd_hero_show(args) -> int:
    hero = load_hero(realm_paths(args, must_exist=False), args.hero)
    if args.json:
        print_json({"schema": CONFIG_SCHEMA, **hero.summary(), "description": hero.description,
                    "model_config": hero.model.config, "tokenizer": hero.tokenizer,
                    "chat": hero.chat, "training_defaults": hero.training_defaults})
        return 0
    print(f"# {hero.source}")
    print(read_regular(hero.source, MAX_YAML_BYTES, "hero profile").decode("utf-8"), end="")
    return 0


def cmd_hero_add(args) -> int:
    """Write configs/heroes/NAME.yaml from a model folder's config.json."""
    paths = realm_paths(args)
    target = add_hero_from_folder(paths, args.name, Path(args.source), force=args.force)
    hero = load_hero(paths, args.name)
    m = hero.model
    print(f"hero {hero.id} written to {target}: {m.architecture}, vocab {m.vocab_size}, "
          f"context {m.context_length}, weights and tokenizer from {m.path}")
    print(f"next: realm campaign create NAME --hero {hero.id}")
    return 0


# --- campaigns ------------------------------------------------------------------------------

def cmd_campaign_create(args) -> int:
    campaign = create_campaign(realm_paths(args), args.name, args.hero,
                               overrides=parse_sets_checked(args.set),
                               description=args.description or "",
                               activate_it=not args.no_activate, check=refuse_unrunnable)
    state = "active" if not args.no_activate else "not activated"
    print(f"created campaign {campaign.ref} ({state}); config {campaign.config_hash[:19]}, "
          f"code {campaign.code_version or 'outside git'}")
    return 0


def cmd_campaign_list(args) -> int:
    paths = realm_paths(args)
    campaigns, active, problems = survey_with_active(paths)
    rows = [{**c.to_dict(), "active": c.ref == active} for c in campaigns]
    if args.json:
        print_json({"schema": CONFIG_SCHEMA, "active": active, "campaigns": rows,
                    "problems": problems})
        return 0
    if not rows and not problems:
        print("no campaigns yet: realm campaign create NAME --hero HERO")
    for r in rows:
        mark = "*" if r["active"] else " "
        print(f"{mark} {r['hero_id']}/{r['name']:<24} created {r['created_at'][:19]}  "
              f"{r['description']}")
    for p in problems:
        print(f"problem: {p['problem']}")
    return 0


def cmd_campaign_activate(args) -> int:
    campaign = activate(realm_paths(args), args.ref)
    print(f"active campaign: {campaign.ref}")
    return 0


def cmd_campaign_show(args) -> int:
    paths = realm_paths(args)
    campaign = find_campaign(paths, args.ref)
    data = {**campaign.to_dict(), "active": campaign.ref == active_ref(paths),
            "path": str(campaign.path)}
    if args.json:
        print_json(data)
    else:
        print(yaml.safe_dump(data, sort_keys=False).rstrip())
    return 0


# --- config ---------------------------------------------------------------------------------

def _job_for(paths, ref: str):
    """A job from a dataset or sidecar path, or from a job id / name in the queue."""
    path = Path(ref)
    dataset = path.with_name(path.name.removesuffix(SIDECAR_SUFFIX))
    if sidecar_of(dataset).is_file():
        data = read_sidecar_json(sidecar_of(dataset))
        if isinstance(data, dict) and "id" in data:  # adopted: the record itself
            return Job.from_dict(data, source=str(sidecar_of(dataset)))
        return unadopted_job(paths, dataset.parent.resolve() / dataset.name, measure=False)
    if path.is_file():
        return None  # a dataset without a sidecar has no job layer
    return TrainingQueue(paths.base).find(ref)


def cmd_config_show(args) -> int:
    """The resolved config. With ``--job``: what the job recorded when it trained (values,
    layers, sources and hash as its child resolved them), or, for a job not trained yet,
    today's resolution of its layers (said in the output)."""
    paths = realm_paths(args, must_exist=False)
    job = _job_for(paths, args.job) if args.job else None
    cli = cli_layer_from(args)
    if job is not None and job.resolved_config:
        _refuse_changes_to_record(args, cli, job)
        data = {**job.resolved_config, "schema": CONFIG_SCHEMA, "job": job.id, "recorded": True}
        title = (f"# job {job.id} as it trained (recorded by its last attempt): hero "
                 f"{data['hero']}, campaign {data['campaign'] or '(none)'}, {data['config_hash']}")
    else:
        resolved = resolve_for(paths, hero_id=args.hero, campaign=args.campaign, job=job, cli=cli)
        data = {**resolved.record(), "schema": CONFIG_SCHEMA}
        title = (f"# hero {data['hero']}, campaign {data['campaign'] or '(none)'}, "
                 f"{data['config_hash']}")
        if job is not None:
            data.update(job=job.id, recorded=False)
            state = getattr(job.status, "value", "queued")
            why = {"queued": "has not trained yet",
                   "processing": "is training: it records its config when this attempt ends"
                   }.get(state, f"is {state} and recorded no config (it ended before training)")
            title = f"# job {job.id} {why}: today's resolution of its layers\n{title}"
    args.explain = args.explain or args.doc
    if not args.explain:
        data.pop("explain", None)
    elif args.doc:
        for row in data["explain"]:
            spec = SPECS.get(row["key"])
            doc = spec.doc if spec else LOCKED_DOCS.get(row["key"].removeprefix("locked."), "")
            row["doc"] = " ".join(doc.split())
    if args.json:
        print_json(data)
    elif args.explain:
        print(_explain_table(data, title))
    else:
        print(title)
        print(yaml.safe_dump({**data["config"], "locked": data["locked"]}, sort_keys=False),
              end="")
    return 0


def _refuse_changes_to_record(args, cli, job: Job) -> None:
    given = [name for name, value in (("--hero", args.hero), ("--campaign", args.campaign))
             if value] + sorted(set(cli.key_sources.values()))
    if given:
        raise UsageError(f"config show --job {args.job}: job {job.id} has trained, and prints the "
                         f"config it recorded then; {', '.join(given)} cannot change that. Drop "
                         f"{'them' if len(given) > 1 else 'it'}, or drop --job to resolve "
                         "today's layers.")


def _explain_table(data: dict, title: str) -> str:
    rows = [(r["key"], _show(r["value"]), r["layer"], r["source"]) for r in data["explain"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [title,
             f"{'key':<{widths[0]}}  {'value':<{widths[1]}}  {'layer':<{widths[2]}}  source"]
    for (k, v, l, s), row in zip(rows, data["explain"]):
        lines.append(f"{k:<{widths[0]}}  {v:<{widths[1]}}  {l:<{widths[2]}}  {s}")
        if row.get("doc"):
            lines += textwrap.wrap(row["doc"], 96, initial_indent="    ",
                                   subsequent_indent="    ")
    return "\n".join(lines)


def _show(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# --- parser ---------------------------------------------------------------------------------

def add_parsers(sub) -> None:
    hero = sub.add_parser("hero", help="model profiles").add_subparsers(
        dest="hero_command", required=True, metavar="COMMAND")
    p = hero.add_parser("list", help="every hero this realm knows")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    p.set_defaults(handler=cmd_hero_list)
    p = hero.add_parser("show", help="one hero profile")
    p.add_argument("hero", help="the hero's name (realm hero list shows them)")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    p.set_defaults(handler=cmd_hero_show)
    p = hero.add_parser("add", help="a hero from a model folder (reads its config.json)")
    p.add_argument("name", metavar="NAME", help="the new hero's id (configs/heroes/NAME.yaml)")
    p.add_argument("--from", dest="source", required=True, metavar="PATH",
                   help="model folder with config.json, weights and tokenizer files")
    p.add_argument("--force", action="store_true", help="replace an existing NAME.yaml")
    p.set_defaults(handler=cmd_hero_add)

    camp = sub.add_parser("campaign", help="training lineages").add_subparsers(
        dest="campaign_command", required=True, metavar="COMMAND")
    p = camp.add_parser("create", help="create (and activate) a campaign")
    p.add_argument("name", help="the campaign's name (letters, digits, '.', '_', '-')")
    p.add_argument("--hero", required=True, help="the hero this campaign trains (fixed for life)")
    p.add_argument("--description", help="a line of text kept in campaign.json")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="campaign override")
    p.add_argument("--no-activate", action="store_true",
                   help="create it without making it the active campaign")
    p.set_defaults(handler=cmd_campaign_create)
    p = camp.add_parser("list", help="every campaign; * marks the active one")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    p.set_defaults(handler=cmd_campaign_list)
    p = camp.add_parser("activate", help="make HERO/NAME the active campaign")
    p.add_argument("ref", metavar="HERO/NAME", help="the campaign (NAME alone when one hero "
                                                     "has it)")
    p.set_defaults(handler=cmd_campaign_activate)
    p = camp.add_parser("show", help="one campaign (default: the active one)")
    p.add_argument("ref", nargs="?", metavar="HERO/NAME",
                   help="the campaign (NAME alone when one hero has it); default: the active one")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    p.set_defaults(handler=cmd_campaign_show)

    config = sub.add_parser("config", help="the resolved configuration").add_subparsers(
        dest="config_command", required=True, metavar="COMMAND")
    p = config.add_parser("show", help="resolved config; --explain adds layer and source")
    p.add_argument("--hero", help="resolve for this hero (default: the campaign's)")
    p.add_argument("--campaign", metavar="HERO/NAME",
                   help="resolve for this campaign (default: the active one)")
    p.add_argument("--job", metavar="FILE|JOB",
                   help="a dataset, sidecar or job id: a job that trained prints the config it "
                        "recorded (values, layers, sources, hash); one not trained yet, today's "
                        "resolution of its layers")
    p.add_argument("--explain", action="store_true",
                   help="one row per key with its value, layer and source")
    p.add_argument("--doc", action="store_true",
                   help="with each key, its documentation from the schema (implies --explain)")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    add_common_flags(p)
    p.set_defaults(handler=cmd_config_show)
