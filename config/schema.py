"""The config schema: typed dataclasses, one per section, a docstring under every field.

Layer 1 of the resolver (schema defaults). Closed choices are ``Literal``; bounds that a type
cannot express live in ``BOUNDS``. The ``locked`` block is not here: only
``config.locked.build_locked_config`` produces it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import shlex
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

ROLES = ("system", "user", "assistant", "tool")
"""The roles a chat message may have (``data.train_on`` names them; the reader checks them)."""


@dataclass
class TrainingConfig:
    micro_batch_size: int = 8
    """Rows (packed sequences) per forward pass; CLI --batch-size."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; CLI --grad-accum."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate; CLI --learning-rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay."""
    adam_beta2: float = 0.95
    """AdamW second-moment decay."""
    warmup_steps: int = 10
    """Linear warmup length in optimizer steps."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate shape after warmup."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of the peak learning rate."""
    epochs: int = 1
    """Passes over the dataset; CLI --epochs."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps in the job (None: run the epochs); CLI --max-steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (0 disables clipping)."""
    seed: int = 42
    """Seed for data order, dropout and initialisation; CLI --seed."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA when supported, fp32 on CPU."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    no_decay: Optional[str] = "bias,norm,embedding"
    """Parameter kinds trained without weight decay: a comma-separated subset of bias, norm,
    embedding (none/null: weight decay applies to every parameter)."""
    schedule_scope: Literal["job", "campaign"] = "campaign"
    """job: warmup and decay inside every job; campaign: one warmup for the whole campaign, then
    constant, or a decay over training.campaign_tokens (warmup-stable-decay)."""
    campaign_tokens: Optional[int] = None
    """Campaign scope: the campaign's trained-token budget; the learning rate decays over its
    last training.decay_fraction (None: constant after the campaign's warmup)."""
    decay_fraction: float = 0.2
    """Campaign scope with a token budget: the fraction of the budget the final decay spans."""
    carry_optimizer: bool = True
    """Continue a campaign's AdamW moments from the checkpoint the job starts from (false: every
    job starts with fresh moments)."""
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    """Weights in memory: fp32, or bf16 (half the memory; AdamW moments then follow the weights'
    dtype; pretrained weights are loaded in it). With an adapter only the frozen base is bf16:
    the adapter trains in fp32."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them:
    less memory for longer rows, about a third more compute per step."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """A job on several devices (daemon.devices): ddp keeps the whole model and optimizer on
    every rank; fsdp (FSDP2) shards weights, gradients and AdamW moments across the ranks, per
    decoder layer. Checkpoints are the same full folders either way."""


@dataclass
class AdapterConfig:
    method: Literal["none", "lora", "qlora"] = "none"
    """none: train every weight (full fine-tuning); lora: freeze the base and train low-rank
    adapters (peft); qlora: lora on a 4-bit base (bitsandbytes, CUDA only: pip install
    'realm-trainer[qlora]'). Part of the campaign's locked block: fixed once it trained."""
    r: int = 16
    """LoRA rank: the inner size of each adapter pair (locked per campaign)."""
    alpha: float = 32.0
    """LoRA scale numerator: the update is scaled by alpha / r (locked per campaign)."""
    dropout: float = 0.05
    """Dropout on the adapter's input while training (may change between jobs)."""
    target_modules: str = "all-linear"
    """Modules that get an adapter: all-linear (every linear layer of the decoder, not the
    output head) or comma-separated module names such as q_proj,k_proj,v_proj,o_proj (locked
    per campaign)."""
    modules_to_save: Optional[str] = None
    """Comma-separated modules trained in full and saved beside the adapter, for example
    embed_tokens,lm_head after adding tokens (locked per campaign)."""


@dataclass
class DataConfig:
    format: Literal["auto", "text", "prompt_completion", "messages"] = "auto"
    """Line format; auto detects it per line from the keys present."""
    max_length: int = 512
    """Tokens per training row; must not exceed the hero's context length; CLI --max-length."""
    packing: bool = True
    """Pack several examples per row with attention isolated per example."""
    train_on_inputs: bool = False
    """Compute loss on every token (prompts, system and user turns, template text)."""
    train_on: str = "all_assistant"
    """messages: which turns carry loss: all_assistant, last_assistant, or a comma-separated
    list of roles (for example assistant,tool)."""
    truncation: Literal["auto", "drop", "keep_start", "keep_end"] = "auto"
    """An example longer than max_length: drop it, keep its first or its last max_length tokens;
    auto: messages drop their oldest turns (never the system prompt or the last trained reply),
    prompt/completion keep the end (the completion), text keeps the start."""
    on_bad_line: Literal["fail", "skip"] = "fail"
    """fail: stop at the first bad line naming file:line; skip: count and log bad lines."""
    max_bad_fraction: float = 0.01
    """With on_bad_line=skip, fail the job when more than this fraction of lines is bad."""
    val_fraction: float = 0.0
    """Fraction of examples held out for validation loss (0 disables validation)."""
    shuffle: bool = True
    """Shuffle example order each epoch (seeded)."""


@dataclass
class CheckpointConfig:
    save_steps: int = 100
    """Write a checkpoint every N optimizer steps (and always at the end of a job)."""
    keep_last: int = 3
    """Complete checkpoints to keep per campaign; older ones are removed (logged)."""


@dataclass
class GovernorConfig:
    enabled: bool = True
    """Disabling is allowed, recorded on the job and warned about."""
    window: int = 20
    """Healthy losses kept for the divergence statistics."""
    min_history: int = 10
    """No statistical verdict before this many healthy losses."""
    sigma_k: float = 6.0
    """Divergence needs loss > mean + k * std of the healthy window."""
    multiplier: float = 3.0
    """... and loss > multiplier * mean of the healthy window."""
    divergence_floor: float = 1.0
    """... and loss above this absolute value (tiny losses never count as divergence)."""
    min_panics: int = 3
    """Consecutive anomalous steps before a divergence panic."""
    max_loss_ratio: float = 3.0
    """A loss above this multiple of ln(vocab) (far worse than guessing uniformly) rolls back at
    once, history or not: catches a job that diverges from its first steps."""
    spike_factor: float = 4.0
    """A loss above this multiple of the healthy-loss EWMA (and above divergence_floor) rolls
    back at once: one catastrophic step is not waited out for min_panics steps."""
    lobotomy_tolerance: float = 0.065
    """Collapse to ln(vocab) +/- tolerance * ln(vocab) counts as lobotomy."""
    lobotomy_healthy_ratio: float = 0.6
    """... only when the healthy average was below this fraction of ln(vocab)."""
    snapshot_steps: int = 25
    """Take a last-known-good snapshot every N healthy optimizer steps."""
    max_rollbacks: int = 3
    """Rollbacks allowed in one job before it fails permanently."""
    lr_backoff: float = 0.5
    """Multiply the learning rate by this after a rollback (1.0 keeps it)."""
    snapshot_memory_gb: Optional[float] = None
    """Host memory the governor's snapshots (trainable weights and optimizer state) may hold,
    shared by a job's ranks on one host: two snapshots when they fit, one when one does, else
    none and every rollback restores the last approved checkpoint on disk (None: a quarter of
    the memory available at job start)."""


@dataclass
class DaemonConfig:
    settle_seconds: float = 2.0
    """A new dataset must hold still (size and mtime) this long before it is adopted."""
    poll_interval: float = 5.0
    """Seconds between periodic rescans (the only wake-up with --poll)."""
    max_attempts: int = 3
    """Retryable failures (crash, OOM, timeout) before a job fails for good."""
    heartbeat_seconds: float = 5.0
    """How often a running job renews its lease."""
    lease_seconds: float = 60.0
    """A lease not renewed for this long is reaped by another daemon."""
    job_timeout: float = 600.0
    """Kill a training child whose liveness counter has not moved for this many seconds, once it
    has taken its first optimizer step."""
    setup_timeout: Optional[float] = None
    """Before its first optimizer step (imports, model load, tokenizing: each phase advances the
    counter), the limit instead; None means max(job_timeout, 120 s)."""
    devices: str = "cpu"
    """Device set the daemon serves: cpu, cpu:N (N gloo ranks on CPU), or CUDA ids such as 0 or
    0,1 (one rank per id, NCCL). More than one rank runs each job through torch.distributed.run."""
    stop_grace_seconds: float = 60.0
    """After the first SIGTERM, how long the child may take to checkpoint and stop."""
    min_free_disk_gb: float = 1.0
    """Do not claim a job while the realm's file system has less free space."""
    min_free_memory_gb: float = 0.5
    """Do not claim a job while less memory is available."""
    on_job_end: Optional[str] = None
    """A command run after each job attempt ends, for example ``notify-send realm`` or
    ``/usr/local/bin/realm-notify --channel ops``: split into words with shell quoting rules
    (shlex) but never run by a shell (no pipes, redirections or $VARS). Its environment holds
    REALM_JOB_ID, REALM_JOB_STATE (completed, failed, queued...), REALM_JOB_REASON,
    REALM_JOB_DATASET and REALM_BASE_DIR. A failure is logged; the daemon goes on."""
    on_job_end_timeout: float = 60.0
    """Seconds daemon.on_job_end may run before it is killed (the daemon claims nothing
    meanwhile)."""
    nodes: int = 1
    """Hosts each job this daemon claims spans, itself included. More than one: the job waits
    for member daemons (``realm daemon --join``) on other hosts sharing the realm, with as many
    processes per host as this daemon (daemon.devices), and runs as one torch.distributed group
    through torchrun's c10d rendezvous (``daemon.nodes``)."""
    join: bool = False
    """A member daemon (``realm daemon --join``): it claims no job of its own; it lends its
    devices to the jobs other daemons claim with daemon.nodes above 1 (its own daemon.nodes is
    not used, so one config.json can serve both kinds)."""
    address: Optional[str] = None
    """The address other hosts reach this one at (the rendezvous endpoint, and each node's
    address in the group); None: this host's fully qualified name."""
    rendezvous_timeout: float = 600.0
    """Seconds a job spanning hosts waits for every node to join before it fails (a retryable
    failure)."""


@dataclass
class EvalConfig:
    every_steps: Optional[int] = None
    """Evaluate on the validation split (data.val_fraction) every N optimizer steps (None: only
    at the end of the job)."""
    sample_prompts: Optional[str] = None
    """A file of prompts, one per line (plain text, or JSON strings): at every evaluation the
    model's greedy continuation of each is written to the job log."""
    sample_max_new_tokens: int = 32
    """Tokens generated per sample prompt."""


@dataclass
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Minimum level written to logs/daemon.jsonl and the console."""
    log_every_steps: int = 10
    """One compact progress line every N optimizer steps."""
    status_every_seconds: float = 2.0
    """Minimum interval between rewrites of status/jobs/<job>.progress.json."""
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    """Where step metrics go besides the job log: tensorboard writes event files per campaign
    under logs/tensorboard/<hero>/<campaign>/ (`tensorboard --logdir logs/tensorboard`); none
    writes none."""


@dataclass
class RealmConfig:
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    governor: GovernorConfig = field(default_factory=GovernorConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


MAX_SEED = 2**32 - 1
"""Seeds are in [0, 2**32 - 1]: the range every RNG realm seeds (Python, NumPy, torch) accepts."""
MAX_SECONDS = 7 * 24 * 3600.0
"""Longest duration any ``*_seconds``/timeout/interval key accepts (a week): longer values are
typos, and sleeps and timers refuse unbounded ones."""

# (minimum, maximum) inclusive; None means unbounded. Every int and float key is listed (a test
# checks it); NaN and Infinity are refused before bounds, integers past core.validate.MAX_INT too.
BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "training.micro_batch_size": (1, None), "training.grad_accum": (1, None),
    "training.learning_rate": (0, None), "training.weight_decay": (0, None),
    "training.adam_beta1": (0, 1), "training.adam_beta2": (0, 1),
    "training.warmup_steps": (0, None), "training.min_lr_ratio": (0, 1),
    "training.epochs": (1, None), "training.max_steps": (1, None),
    "training.max_grad_norm": (0, None), "training.seed": (0, MAX_SEED),
    "training.campaign_tokens": (1, None), "training.decay_fraction": (0, 1),
    "adapter.r": (1, 4096), "adapter.alpha": (1e-6, None), "adapter.dropout": (0, 0.9),
    "eval.every_steps": (1, None), "eval.sample_max_new_tokens": (1, 4096),
    "data.max_length": (8, None), "data.max_bad_fraction": (0, 1), "data.val_fraction": (0, 0.5),
    "checkpoint.save_steps": (1, None), "checkpoint.keep_last": (1, None),
    "governor.window": (2, None), "governor.min_history": (2, None), "governor.sigma_k": (0, None),
    "governor.multiplier": (1, None), "governor.divergence_floor": (0, None),
    "governor.min_panics": (1, None),
    "governor.max_loss_ratio": (1, None), "governor.spike_factor": (1, None),
    "governor.lobotomy_tolerance": (0, 1), "governor.lobotomy_healthy_ratio": (0, 1),
    "governor.snapshot_steps": (1, None), "governor.max_rollbacks": (0, None),
    "governor.lr_backoff": (0, 1), "governor.snapshot_memory_gb": (0, None),
    "daemon.settle_seconds": (0, MAX_SECONDS), "daemon.poll_interval": (0.05, MAX_SECONDS),
    "daemon.max_attempts": (1, None), "daemon.heartbeat_seconds": (0.05, MAX_SECONDS),
    "daemon.lease_seconds": (0.1, MAX_SECONDS), "daemon.job_timeout": (1, MAX_SECONDS),
    "daemon.setup_timeout": (1, MAX_SECONDS),
    "daemon.stop_grace_seconds": (0, MAX_SECONDS), "daemon.min_free_disk_gb": (0, None),
    "daemon.min_free_memory_gb": (0, None), "daemon.on_job_end_timeout": (0.1, MAX_SECONDS),
    "daemon.nodes": (1, 1024), "daemon.rendezvous_timeout": (1, MAX_SECONDS),
    "logging.log_every_steps": (1, None), "logging.status_every_seconds": (0, MAX_SECONDS),
}


NO_DECAY_KINDS = ("bias", "norm", "embedding")
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


def _is_address(text: str) -> bool:
    """A host name or an IPv4 address (letters, digits, dots, dashes), or an IPv6 address;
    never ``host:port``."""
    if _HOST_NAME.fullmatch(text):
        return True
    import ipaddress

    try:
        ipaddress.IPv6Address(text)
        return True
    except ValueError:
        return False
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def string_problem(key: str, value: Any) -> str | None:
    """Why a free-form string key's value is not accepted (None: it is)."""
    if key == "data.train_on":
        if value in ("all_assistant", "last_assistant"):
            return None
        roles = [r.strip() for r in str(value).split(",")]
        bad = [r for r in roles if r not in ROLES]
        if bad or not roles:
            return (f"data.train_on: {value!r} is not all_assistant, last_assistant or a "
                    f"comma-separated list of roles ({', '.join(ROLES)})")
    if key == "daemon.on_job_end" and value is not None:
        try:
            words = shlex.split(value)
        except ValueError as exc:
            return (f"daemon.on_job_end: {value!r} cannot be split into words ({exc}); close "
                    "the quote, or give the command without one")
        if not words:
            return "daemon.on_job_end: empty command; give a program and its arguments, or null"
    if key == "daemon.address" and value is not None and not _is_address(str(value)):
        return (f"daemon.address: {value!r} is not a host name or an IP address (no port: the "
                "rendezvous picks its own); give the address other hosts reach this one at")
    if key in ("adapter.target_modules", "adapter.modules_to_save") and value is not None:
        names = [n.strip() for n in str(value).split(",")]
        if key == "adapter.target_modules" and value.strip() == "all-linear":
            return None
        if not all(_MODULE_NAME.fullmatch(n) for n in names):
            return (f"{key}: {value!r} is not a comma-separated list of module names such as "
                    "q_proj,v_proj" + (" (or all-linear)" if key.endswith("modules") else ""))
    if key == "training.no_decay" and value is not None:
        bad = [k for k in str(value).split(",") if k.strip() not in NO_DECAY_KINDS]
        if bad:
            return (f"training.no_decay: {value!r} is not none or a comma-separated subset of "
                    f"{', '.join(NO_DECAY_KINDS)}")
    return None


@dataclass(frozen=True)
class FieldSpec:
    key: str
    """Dotted key as the user writes it: ``training.learning_rate``."""
    type: Any
    """int, float, bool, str, or a tuple of allowed strings for a Literal."""
    optional: bool
    default: Any
    doc: str


def _field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (read from the source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and \
                isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def _spec(section: str, f: dataclasses.Field, hint: Any, doc: str) -> FieldSpec:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    if typing.get_origin(base) is Literal:
        base = tuple(typing.get_args(base))
    return FieldSpec(f"{section}.{f.name}", base, optional, f.default, doc)


def field_specs() -> dict[str, FieldSpec]:
    """Every settable key of the schema, by dotted name."""
    specs = {}
    for section in dataclasses.fields(RealmConfig):
        cls = section.default_factory  # type: ignore[misc]
        hints, docs = typing.get_type_hints(cls), _field_docs(cls)
        for f in dataclasses.fields(cls):
            spec = _spec(section.name, f, hints[f.name], docs.get(f.name, ""))
            specs[spec.key] = spec
    return specs


SECTIONS = tuple(f.name for f in dataclasses.fields(RealmConfig))


def to_nested(config: RealmConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(config)


def from_flat(values: dict[str, Any]) -> RealmConfig:
    """Build a RealmConfig from validated dotted keys (missing keys keep their defaults)."""
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in values.items():
        section, name = key.split(".", 1)
        sections[section][name] = value
    kinds = {f.name: f.default_factory for f in dataclasses.fields(RealmConfig)}  # type: ignore
    return RealmConfig(**{s: kinds[s](**v) for s, v in sections.items()})
