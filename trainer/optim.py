"""The optimizer's pieces the engine wires together: AdamW parameter groups, the learning-rate
schedule of a job or of a whole campaign, and carrying AdamW moments from one job to the next.

- Parameter groups (``param_groups``): biases, norm weights and embeddings train without weight
  decay (``training.no_decay``); a tied ``lm_head`` is the embedding's parameter, so it follows
  the embedding. Decaying a norm's gain or an embedding row towards zero only fights the model
  (GPT-2/nanoGPT, Llama and OLMo recipes all exempt them).
- ``Schedule``: ``job`` scope warms up and decays inside every job over its own steps (a new job
  re-warms). ``campaign`` scope warms up once over the campaign's first ``warmup_steps``
  optimizer steps (the campaign step: ``TrainState.global_step``), then holds the peak; with a
  token budget (``training.campaign_tokens``) it is warmup-stable-decay: the peak holds until
  the campaign's trained tokens reach ``(1 - decay_fraction) * budget``, then decays (cosine, or
  none for ``schedule: constant``) to ``min_lr_ratio`` at the budget and stays at that floor.
  The campaign factor is a pure function of the campaign's counters, so a resume, a rollback
  and the next job all land on the same curve.
- ``moments_problem`` / ``load_moments``: a job that continues a campaign may take the AdamW
  moments of the checkpoint it starts from, keeping the current config's hyperparameters;
  state that does not fit the current groups is refused with a reason, never half-loaded.
"""

from __future__ import annotations

import contextlib

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from config.schema import NO_DECAY_KINDS


def no_decay_kinds(setting: str | None) -> set[str]:
    """``"bias,norm"`` -> {"bias", "norm"}; None (none) -> {} (the schema checked the names)."""
    if setting is None or setting.strip().lower() == "none":
        return set()
    kinds = {k.strip() for k in setting.split(",") if k.strip()}
    assert kinds <= set(NO_DECAY_KINDS), kinds
    return kinds


def param_kind(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> bias | norm | embedding, for parameters of those kinds (shared ones,
    such as a tied lm_head, appear once: they are the same object)."""
    kinds: dict[int, str] = {}
    for module in model.modules():
        is_norm = "Norm" in type(module).__name__
        is_embedding = isinstance(module, torch.nn.Embedding)
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                kinds[id(p)] = "bias"
            elif is_norm:
                kinds.setdefault(id(p), "norm")
            elif is_embedding:
                kinds.setdefault(id(p), "embedding")
    return kinds


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: str | None
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """AdamW groups (decayed first, then the weight_decay=0 group when it is not empty), in the
    model's parameter order, and a summary for the log."""
    exempt = no_decay_kinds(no_decay)
    kinds = param_kind(model)
    decay, keep = [], []
    counts = {k: 0 for k in sorted(exempt)}
    for p in model.parameters():  # deduplicated: a tied lm_head is the embedding
        if not p.requires_grad:
            continue
        kind = kinds.get(id(p))
        if kind in exempt:
            keep.append(p)
            counts[kind] += 1
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    summary = {"decay_params": len(decay), "decay_numel": sum(p.numel() for p in decay),
               "no_decay_params": len(keep), "no_decay_numel": sum(p.numel() for p in keep),
               "no_decay_kinds": counts, "weight_decay": weight_decay}
    return groups, summary


@dataclass(frozen=True)
class Schedule:
    """The learning-rate factor (times the peak) before each optimizer step."""

    scope: Literal["job", "campaign"]
    warmup_steps: int
    shape: Literal["cosine", "constant"]
    min_lr_ratio: float
    job_steps: int
    """Job scope: the job's total optimizer steps (the cosine's span)."""
    budget: int | None = None
    """Campaign scope: trained tokens after which the rate stays at its floor."""
    decay_fraction: float = 0.2

    @classmethod
    def of(cls, training, job_steps: int) -> "Schedule":
        return cls(training.schedule_scope, training.warmup_steps, training.schedule,
                   training.min_lr_ratio, job_steps, training.campaign_tokens,
                   training.decay_fraction)

    def warmup(self, step: int) -> float:
        """Linear warmup: step (0-based) ``s`` of the first ``warmup_steps`` gets (s+1)/warmup."""
        return (step + 1) / self.warmup_steps if step < self.warmup_steps else 1.0

    def job_factor(self, job_step: int) -> float:
        """Job scope: ``job_step`` optimizer steps of this job were taken before this one."""
        if job_step < self.warmup_steps:
            return self.warmup(job_step)
        if self.shape == "constant":
            return 1.0
        span = max(1, self.job_steps - self.warmup_steps)
        return self._cosine(min(1.0, (job_step - self.warmup_steps) / span))

    def campaign_factor(self, campaign_step: int, tokens: int) -> float:
        """Campaign scope: ``campaign_step`` optimizer steps and ``tokens`` trained tokens of
        the campaign came before this step."""
        return min(self.warmup(campaign_step), self.stable_decay(tokens))

    def stable_decay(self, tokens: int) -> float:
        if self.budget is None or self.shape == "constant":
            return 1.0
        if tokens >= self.budget:
            return self.min_lr_ratio
        start = (1 - self.decay_fraction) * self.budget
        if tokens < start:
            return 1.0
        return self._cosine(min(1.0, (tokens - start) / max(1.0, self.budget - start)))

    def exhausted(self, tokens: int) -> bool:
        return self.scope == "campaign" and self.budget is not None and tokens >= self.budget

    def _cosine(self, progress: float) -> float:
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi *
                                                                                 progress))

    def describe(self) -> dict[str, Any]:
        decays = self.scope == "job" or self.budget is not None
        out: dict[str, Any] = {"scope": self.scope, "warmup_steps": self.warmup_steps,
                               "shape": self.shape if decays else "constant",
                               "min_lr_ratio": self.min_lr_ratio}
        if self.scope == "campaign":
            out.update(campaign_tokens=self.budget, decay_fraction=self.decay_fraction
                       if self.budget is not None else None)
        return out


# --- carrying moments across jobs --------------------------------------------------------------

def moments_problem(saved: Any, optimizer: torch.optim.Optimizer) -> str | None:
    """Why a saved AdamW state dict cannot seed this optimizer (None: it can)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) or \
            not isinstance(saved.get("state"), dict):
        return "the checkpoint holds no optimizer state"
    saved_sizes = [len(g.get("params", [])) for g in saved["param_groups"]]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != sizes:
        return (f"its parameter groups hold {saved_sizes} parameters, this job's hold {sizes} "
                "(another model, or groups from another training.no_decay or realm version)")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, moments in saved["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            return f"it names parameter {index!r}, which this optimizer does not have"
        for key in ("exp_avg", "exp_avg_sq"):
            t = moments.get(key) if isinstance(moments, dict) else None
            if not isinstance(t, torch.Tensor) or t.shape != params[index].shape:
                return (f"parameter {index}: saved {key} has shape "
                        f"{tuple(t.shape) if isinstance(t, torch.Tensor) else None}, the "
                        f"parameter has {tuple(params[index].shape)}")
    return None


def load_moments(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load the saved moments (and per-parameter step counts); every group keeps its current
    hyperparameters (lr, betas, weight_decay, eps): the config, not the checkpoint, says how
    this job trains. Call only when ``moments_problem`` found none."""
    with keep_hyperparameters(optimizer):
        optimizer.load_state_dict(saved)


@contextlib.contextmanager
def keep_hyperparameters(optimizer: torch.optim.Optimizer):
    """Whatever the block loads into ``optimizer`` (moments of another job, by any route), its
    groups end with the hyperparameters they had before it."""
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    yield
    for group, hyper in zip(optimizer.param_groups, current):
        group.update(hyper)