"""Which hero and campaign a job trains, and the one entry point that resolves its config.

Which: the job's own ``hero_id`` / ``campaign_id`` first, then the ones named on the command
line, then the active campaign, then the embedded default hero ``tiny-qwen3`` (no campaign
layer). ``resolve_for`` is what every process calls, once: the daemon for its own settings, the
training child for its job, the command line for ``--plan`` and ``config show``.
"""

from __future__ import annotations

from config.layers import resolve_layers
from config.resolver import Layer, Resolved
from core.errors import ConfigError, RealmError, UsageError
from core.job import Job, name_problem
from core.paths import RealmPaths
from guild.campaigns import Campaign, active_ref, find_campaign
from guild.heroes import DEFAULT_HERO, HeroProfile, load_hero


def _check_job_names(job: Job) -> None:
    """A sidecar's hero_id / campaign_id must be safe names before they become paths: a
    300-character one is refused naming the sidecar, never an ENAMETOOLONG from the OS."""
    for field_name in ("hero_id", "campaign_id"):
        if (problem := name_problem(field_name, getattr(job, field_name))):
            raise ConfigError(f"{job.dataset_path}.job.json: {problem} Fix {field_name} in the "
                              "sidecar (or remove it to use the active campaign).")


def choose(paths: RealmPaths, hero_id: str | None, campaign: Campaign | str | None,
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
                chosen = choose(self.paths, None, None, job)[1]
            except (RealmError, OSError, ValueError, TypeError, RecursionError):
                chosen = None  # one job's bad sidecar never stops the caller: its child says why
            self._memo[key] = chosen.ref if chosen else None
        return self._memo[key]


def resolve_for(paths: RealmPaths, *, hero_id: str | None = None,
                campaign: Campaign | str | None = None, job: Job | None = None,
                cli: Layer | None = None) -> Resolved:
    """Resolve the six layers for a job (or, without one, for the command line alone)."""
    hero, chosen = choose(paths, hero_id, campaign, job)
    return resolve_layers(paths, hero, chosen, job, cli)
