"""FSDP2 for a job on several ranks (``training.parallelism: fsdp``).

Each decoder layer and then the root module are wrapped with ``fully_shard``: every rank keeps
1/world of each parameter, of its gradient and of its AdamW moments, as DTensors, and gathers a
layer's full weights only while that layer runs. On CUDA a bf16 mixed-precision policy gathers
and computes in bf16 and reduces gradients in fp32; on CPU (gloo) everything stays fp32.

A checkpoint keeps the weights whole: the ranks gather them to rank 0 on the CPU, which writes
the usual Hugging Face folder. The AdamW state, twice the weights, stays sharded: every rank
writes its part with ``torch.distributed.checkpoint`` into ``optimizer_shards/``, which a later
sharded job reads on any world size (DCP reshards), and a job on one process or under ddp reads
whole (``optimizer_from_shards``). The governor's snapshots hold each rank's own shard
(``local``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

try:  # torch >= 2.6: public FSDP2 and DTensor
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch: parallelism fsdp is refused
    fully_shard = MixedPrecisionPolicy = DTensor = None


def available() -> bool:
    return fully_shard is not None


def shard(root: torch.nn.Module, lm: torch.nn.Module, *, bf16: bool, device_type: str = "cpu"
          ) -> None:
    """``fully_shard`` per decoder layer of ``lm``, then ``root`` (the module a step calls: the
    model with its loss), which holds the embeddings, the final norm and the head (a tied head
    stays one parameter with the embedding). The loss runs the decoder and the head apart, so
    the root must be the module around both, or their weights would stay sharded."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    # the mesh names the job's device type: left to itself FSDP2 picks CUDA whenever a GPU is
    # visible, even for a gloo job on the CPU
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16 else MixedPrecisionPolicy()
    for layer in lm.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)


def local(t: Any) -> Any:
    """This rank's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


@torch.no_grad()
def assign(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter: into a DTensor, this rank's part of it (every rank
    holds ``whole``, so nothing is sent), else all of it."""
    if DTensor is not None and isinstance(param, DTensor):
        from torch.distributed.tensor import distribute_tensor

        part = distribute_tensor(whole.to(param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)
        param.copy_(part)
    else:
        param.copy_(whole)


def full(t: Any) -> Any:
    """The whole tensor of a DTensor (a collective: every rank calls it)."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


@contextlib.contextmanager
def gathered(root: torch.nn.Module):
    """The root's own parameters (embeddings, final norm, head) whole on every rank while the
    LM is called outside the root's forward (``generate()``, logits for a check); the decoder
    layers gather themselves as they run. Every rank must make the same calls in the same order
    (greedy decoding of the same weights does)."""
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


@contextlib.contextmanager
def no_gradient_sync(lm: torch.nn.Module):
    """Accumulate this micro-batch's gradients without the reduce-scatter (the last one of a
    step reduces them all): FSDP2's counterpart of DDP's ``no_sync``."""
    lm.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        lm.set_requires_gradient_sync(True)


def _names(model: torch.nn.Module, optimizer) -> list[str]:
    """The optimizer's parameters in index order, by name."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _regroup(optimizer, saved_groups: list[dict], keys: list) -> list[dict]:
    """The saved parameter groups' settings, each holding this optimizer's parameters of that
    group as ``keys`` (names or indices, in the optimizer's order)."""
    groups, start = [], 0
    for group, saved in zip(optimizer.param_groups, saved_groups):
        size = len(group["params"])
        groups.append({**{k: v for k, v in saved.items() if k != "params"},
                       "params": keys[start:start + size]})
        start += size
    return groups


def full_weights(model: torch.nn.Module, prefix: str = "model.") -> dict | None:
    """The sharded root ``model``'s weights gathered whole to rank 0 on the CPU (None
    elsewhere), named as the Hugging Face model names them (``prefix``, the root's name for
    the causal LM, removed). Every rank must call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not weights:
        return None
    # a tied head is one parameter, listed once by named_parameters but twice in the state
    # dict: keep it once, as an unsharded model's save_pretrained does
    unique = {name for name, _ in model.named_parameters()}
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {k.removeprefix(prefix): v for k, v in weights.items()
            if k in unique or k not in every}


def trainable_weights(model: torch.nn.Module, main: bool) -> dict | None:
    """The trainable parameters of a sharded ``model`` (an adapter's), each gathered whole, on
    the CPU at rank 0 (None elsewhere), named as ``model`` names them. Every rank must call
    this (one all-gather per parameter); only rank 0 keeps what it gathered (a full model's
    weights, for a disk roll-back's start, held whole on every rank at once would not fit)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = full(p.detach())
            if main:
                out[name] = whole.cpu()
            del whole
    return out if main else None


def load_full_optimizer_state(model: torch.nn.Module, optimizer, saved: dict) -> None:
    """An index-keyed optimizer state (any checkpoint's) into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)

    names = _names(model, optimizer)
    by_name = {"state": {names[i]: v for i, v in saved["state"].items()},
               "param_groups": _regroup(optimizer, saved["param_groups"], names)}
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))


SHARDS = "optimizer_shards"
"""A sharded job's checkpoint keeps its AdamW state here, one file per rank
(``torch.distributed.checkpoint``), instead of whole in ``trainer_state.pt``."""


def save_optimizer_shards(root: torch.nn.Module, optimizer, folder) -> None:
    """Every rank writes its own part of the optimizer state (a collective); the coordinator
    writes the ``.metadata`` that names them."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    save({"optimizer": get_optimizer_state_dict(root, optimizer)}, checkpoint_id=str(folder))


def load_optimizer_shards(root: torch.nn.Module, optimizer, folder) -> None:
    """The optimizer state of ``folder`` into this job's shards, whatever world size wrote it
    (``torch.distributed.checkpoint`` reshards)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    state = {"optimizer": get_optimizer_state_dict(root, optimizer)}
    load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(root, optimizer, state["optimizer"])


def optimizer_from_shards(folder, root: torch.nn.Module, optimizer) -> dict:
    """The optimizer state of ``folder``, whole and keyed by parameter index, for a job that is
    not sharded (one process, or ddp) continuing a sharded campaign."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(folder), f"{tmp}/optimizer.pt")
        saved = torch.load(f"{tmp}/optimizer.pt", weights_only=True)["optimizer"]
    names = _names(root, optimizer)
    index = {name: i for i, name in enumerate(names)}
    state = {index[name]: v for name, v in saved["state"].items() if name in index}
    return {"state": state,
            "param_groups": _regroup(optimizer, saved["param_groups"], list(range(len(names))))}
