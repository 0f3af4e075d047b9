"""Check the CUDA path of the engine on a GPU machine (prints; exits 1 on a failed check).

    python scripts/check_cuda.py

Trains a tiny-qwen3 job on CUDA and checks: bf16 autocast is on, AdamW is fused, batches are
pinned and copied non-blocking, the loss is finite and falls, the checkpoint loads with
from_pretrained on the CPU and gives the same logits (within bf16-free fp32 tolerance), and
compares step time of span-wise attention with the 4D-mask path.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from guild.heroes import load_hero_file, shipped_dir  # noqa: E402
from config.resolver import Layer, resolve  # noqa: E402
from trainer.data.packing import Batch  # noqa: E402
from trainer.data.synthetic import write_dataset  # noqa: E402
from trainer.data.cache import hash_file  # noqa: E402
from trainer.engine import EpochRunner, JobSpec, Trainer  # noqa: E402

failures = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        failures.append(what)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    hero = load_hero_file(shipped_dir() / "tiny-qwen3.yaml")
    resolved = resolve([Layer("cli", "check", {"training": {"max_steps": 40, "warmup_steps": 2},
                                               "checkpoint": {"save_steps": 1000}})], hero,
                       campaign="tiny-qwen3/cuda")
    seen = {"pinned": [], "copy_ms": []}
    original = EpochRunner._to_device

    def spy(self, batch: Batch):
        seen["pinned"].append(batch.input_ids.is_pinned())
        moved, ms = original(self, batch)
        seen["copy_ms"].append(ms)
        return moved, ms

    EpochRunner._to_device = spy
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        data = write_dataset(tmp / "d.jsonl", 1500)
        spec = JobSpec("cuda-check", data, hash_file(data), resolved.config, resolved.locked, hero,
                       tmp / "ckpt", tmp / "cache")
        trainer = Trainer(spec)
        losses = []

        from trainer.guard import FiniteGuard

        class Record(FiniteGuard):
            """Judges as the NaN-only guard does, keeping every step's loss."""

            def judge(self, loss, grad_norm=0.0, *, final=False, step=0):
                if not final:
                    losses.append(loss)
                return super().judge(loss, grad_norm, final=final, step=step)

        trainer.guard = Record()
        result = trainer.train()
        check(trainer.device.type == "cuda", f"trains on {trainer.device}")
        check(trainer.autocast_dtype is torch.bfloat16, f"autocast dtype {trainer.autocast_dtype}")
        fused = trainer.optimizer.param_groups[0].get("fused")
        check(bool(fused), f"AdamW fused={fused}")
        check(all(seen["pinned"]), f"{len(seen['pinned'])} microbatches pinned before the copy")
        check(all(map(lambda x: x == x and abs(x) != float("inf"), losses)), "every loss finite")
        check(losses[-1] < losses[0] - 0.5, f"loss falls: {losses[0]:.3f} -> {losses[-1]:.3f}")
        print(f"  steady tokens/s {trainer.stats.tokens_per_sec_avg:,.0f}, "
              f"median h2d {sorted(seen['copy_ms'])[len(seen['copy_ms']) // 2]:.3f} ms")
        model_gpu = trainer.model.float().eval()
        loaded = AutoModelForCausalLM.from_pretrained(result.checkpoint.path).eval()
        ids = torch.randint(0, 259, (1, 64))
        with torch.no_grad():
            diff = (loaded(ids).logits - model_gpu(ids.cuda()).logits.cpu()).abs().max().item()
        check(diff < 1e-3, f"checkpoint from_pretrained on CPU matches the GPU model ({diff:.2e})")
        check_governor_snapshot(trainer)
        compare_attention(trainer)
    print("all CUDA checks passed" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


def check_governor_snapshot(trainer: Trainer) -> None:
    from trainer.governor import Governor

    g = Governor(trainer.cfg.governor, trainer.model.config.vocab_size)
    start = time.perf_counter()
    snap = g.snapshot(trainer.global_step, trainer.model, trainer.optimizer, trainer.scheduler)
    launch_ms = (time.perf_counter() - start) * 1000
    snap.ready.synchronize()
    ms = (time.perf_counter() - start) * 1000
    tensors = list(snap.model.values())
    check(all(t.device.type == "cpu" and t.is_pinned() for t in tensors),
          f"governor snapshot in pinned CPU memory ({snap.nbytes / 2**20:.1f} MiB: launched in "
          f"{launch_ms:.1f} ms, copied in {ms:.1f} ms)")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    g.rollback(g.check(float("nan")), trainer.global_step + 1, trainer.model, trainer.optimizer,
               trainer.scheduler)
    same = all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    check(same, "rollback restores the CUDA weights exactly")


def compare_attention(trainer: Trainer) -> None:
    from trainer.data.packing import collate
    from trainer.engine import token_loss_sum

    model = trainer.model.train()
    rows = trainer.rows[:trainer.cfg.training.micro_batch_size]
    batch = collate(rows, trainer.store, trainer.tokenizer.pad_token_id).to("cuda")
    for impl in ("realm_packed", "sdpa"):
        model.set_attn_implementation(impl)
        for i in range(13):
            if i == 3:
                torch.cuda.synchronize()
                start = time.perf_counter()
            token_loss_sum(model, batch, torch.bfloat16).backward()
        torch.cuda.synchronize()
        print(f"  {impl:>12}: {(time.perf_counter() - start) / 10 * 1000:.2f} ms per fwd+bwd "
              f"({len(rows)} rows x {batch.input_ids.shape[1]})")


if __name__ == "__main__":
    sys.exit(main())
