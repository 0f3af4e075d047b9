"""Per-rank training memory under ddp and fsdp, side by side in one run.

    python scripts/bench_fsdp_memory.py [--ranks 2] [--layers 28] [--steps 2] [--json PATH]

A Qwen3-0.6B-shaped model (hidden 1024, 16 heads, 8 KV heads, head_dim 128, MLP 3072, vocabulary
151,936, tied embeddings; ``--layers`` decoder layers, 28 as released) with random fp32 weights
trains ``--steps`` AdamW steps on ``--ranks`` gloo ranks on the CPU, once wrapped as realm wraps
a ddp job (``DistributedDataParallel`` around the model and its loss) and once as an fsdp job
(``trainer.sharding.shard``: FSDP2 per decoder layer, the model and its loss as root). Each rank
then counts what it holds of parameters, gradients and AdamW state (a DTensor counts its local
shard) and its peak resident memory; the table prints them per rank with the ratio fsdp / ddp.

Target, printed and not asserted: fsdp's parameter + optimizer memory per rank about half of
ddp's with two ranks (1 / ranks in general). Peak RSS also holds the Python/torch runtime, the
activations and, for ddp, its gradient buckets; it is printed beside the counted bytes.

Two ddp ranks of the full 28-layer model need about 20 GB of host memory: use ``--layers 8``
on a 24 GB machine (the embedding, a quarter of the model, stays whole).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 2**30


def rank_main(mode: str, layers: int, steps: int, out_dir: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trainer import sharding
    from trainer.engine import TokenLoss
    from trainer.data.packing import Batch

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                         num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    lm = Qwen3ForCausalLM(config)
    n_params = sum(p.numel() for p in lm.parameters())
    root = TokenLoss(lm, None)
    if mode == "fsdp":
        sharding.shard(root, lm, bf16=False)
        step_module = root
    else:
        step_module = torch.nn.parallel.DistributedDataParallel(root)
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-4)
    ids = torch.randint(0, 151936, (1, 128), generator=torch.Generator().manual_seed(rank))
    batch = Batch(input_ids=ids, labels=ids.clone(), position_ids=torch.arange(128)[None],
                  segments=[[(0, 128)]], example_ids=torch.zeros_like(ids))
    for _ in range(steps):
        loss = step_module(batch) / 128
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients: they are part of a step

    def nbytes(t) -> int:
        t = sharding.local(t)
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in root.parameters())
    grads = sum(nbytes(p.grad) for p in root.parameters() if p.grad is not None)
    state = sum(nbytes(v) for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out_dir, f"{mode}-{rank}.json").write_text(json.dumps({
        "mode": mode, "rank": rank, "params": n_params, "param_bytes": params,
        "grad_bytes": grads, "optimizer_bytes": state, "peak_rss": peak}))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--rank-main", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args.rank_main[0], args.layers, args.steps, args.rank_main[1])
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for mode in ("ddp", "fsdp"):
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}",
                   "--master-port=29631", __file__, "--layers", str(args.layers),
                   "--steps", str(args.steps), "--rank-main", mode, out]
            done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "2",
                                            "CUDA_VISIBLE_DEVICES": ""},  # gloo ranks, on CPU
                                  capture_output=True, text=True)
            if done.returncode != 0:
                errors = [line for line in done.stderr.splitlines() if "Error" in line]
                print(f"{mode}: failed\n" + "\n".join(errors[-10:]) + done.stderr[-2000:])
                return 1
            rows += [json.loads(p.read_text()) for p in sorted(Path(out).glob(f"{mode}-*.json"))]
    n = rows[0]["params"]
    print(f"Qwen3-0.6B-shaped, {args.layers} layers, {n / 1e6:.0f} M parameters, fp32, "
          f"{args.ranks} gloo ranks on CPU, {args.steps} AdamW steps")
    print(f"{'mode':<5} {'rank':>4} {'params GB':>10} {'grads GB':>9} {'AdamW GB':>9} "
          f"{'p+opt B/param':>14} {'peak RSS GB':>12}")
    for r in rows:
        held = r["param_bytes"] + r["optimizer_bytes"]
        print(f"{r['mode']:<5} {r['rank']:>4} {r['param_bytes'] / GB:>10.2f} "
              f"{r['grad_bytes'] / GB:>9.2f} {r['optimizer_bytes'] / GB:>9.2f} "
              f"{held / n:>14.2f} {r['peak_rss'] / GB:>12.2f}")

    def held(mode):
        return max(r["param_bytes"] + r["optimizer_bytes"] for r in rows if r["mode"] == mode)

    def peak(mode):
        return max(r["peak_rss"] for r in rows if r["mode"] == mode)

    ratio = held("fsdp") / held("ddp")
    print(f"fsdp / ddp, parameters + optimizer per rank: {ratio:.3f} (target about "
          f"{1 / args.ranks:.2f}: {'met' if ratio <= 1 / args.ranks * 1.1 else 'missed'}); "
          f"peak RSS per rank: {peak('fsdp') / peak('ddp'):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ranks": args.ranks, "layers": args.layers,
                                               "rows": rows, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
