"""``realm export HERO/CAMPAIGN [--step N] --out DIR [--merged]`` (``trainer.export``)."""

from __future__ import annotations

import os
from pathlib import Path

from cli.common import realm_paths
from guild.campaigns import find_campaign
from guild.heroes import load_hero


def cmd_export(args) -> int:
    from trainer.export import export  # torch: only this command pays for it

    paths = realm_paths(args)
    campaign = find_campaign(paths, args.campaign)
    out = Path(os.path.abspath(Path(args.out).expanduser()))  # a symlink stays one: refused
    record = export(load_hero(paths, campaign.hero_id), campaign.path.parent, out,
                    step=args.step, merged=args.merged)
    what = {"full": "the model", "adapter": "the adapter (PEFT format)",
            "merged": "the base with the adapter merged in"}[record["kind"]]
    print(f"exported {what} of {campaign.ref} step {record['step']} to {out}")
    if record["kind"] == "adapter":
        print(f"load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
              f"'{record['base']}'), '{out}')")
    else:
        print(f"load it with: AutoModelForCausalLM.from_pretrained('{out}')")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="a campaign checkpoint as a model folder other tools load",
                       description="Write a campaign's checkpoint (its latest, or --step N) "
                                   "without realm's files: the full model, or for an adapter "
                                   "campaign the adapter alone (PEFT format) or, with "
                                   "--merged, the base with the adapter merged in.")
    p.add_argument("campaign", metavar="HERO/CAMPAIGN",
                   help="the campaign to export (NAME alone when only one hero has it)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the folder to create (must not exist, or be empty)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="the checkpoint of step N (default: the campaign's latest)")
    p.add_argument("--merged", action="store_true",
                   help="adapter campaigns: merge the adapter into the base and write a full "
                        "model (default: the adapter alone)")
    p.set_defaults(handler=cmd_export)
