"""Engine throughput, side by side in one run: useful (loss-bearing) tokens per second.

    python scripts/bench_engine.py [--steps 30] [--examples 1200] [--batch-size 8] [--rounds 3]

(a) the realm engine (Trainer, packing on, governor on; also run with the governor off to
print its overhead), (b) HF Trainer with a padding collator on the same
examples, (c) a bare PyTorch loop over the same packed rows as (a). Same tiny-qwen3 model, same
generated chat/prompt data of 16 to 512 tokens, same optimizer settings. Prints tokens/s and the
ratios a/b and a/c (targets, printed not asserted: a/b >= 2.0, a/c >= 0.95 on the 2-core CPU).
Each figure is steady state: the first 3 optimizer steps are left out of all three, and each
step is timed from the end of the previous one (data preparation included). On CUDA all three
use bf16 autocast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from guild.heroes import load_hero_file, shipped_dir  # noqa: E402
from config.resolver import resolve, Layer  # noqa: E402
from trainer.data.cache import hash_file, load_or_build  # noqa: E402
from trainer.data.packing import IGNORE, collate, pack_rows  # noqa: E402
from trainer.engine import JobSpec, Trainer, pick_device, token_loss_sum  # noqa: E402
from trainer.guard import FiniteGuard  # noqa: E402
from trainer.governor import GovernorGuard  # noqa: E402
from trainer.attention import use_packed_attention  # noqa: E402
from trainer.model import build_byte_tokenizer, load_model  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()


def make_dataset(path: Path, n: int, seed: int = 0) -> Path:
    """Examples of 16 to 512 bytes (= tokens for the byte tokenizer), half chat, half prompt."""
    rng = random.Random(seed)

    def words(nbytes: int) -> str:
        out = ""
        while len(out) < nbytes:
            out += rng.choice(WORDS) + " "
        return out[:nbytes]

    with open(path, "w") as fh:
        for i in range(n):
            total = rng.randint(16, 500)
            prompt_len = rng.randint(4, max(5, total // 2))
            prompt, answer = words(prompt_len), words(max(4, total - prompt_len - 12))
            if i % 2:
                line = {"messages": [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": answer}]}
            else:
                line = {"prompt": prompt, "completion": answer}
            fh.write(json.dumps(line) + "\n")
    return path


def resolved_config(args):
    hero = load_hero_file(shipped_dir() / "tiny-qwen3.yaml")
    if args.hidden or args.layers:  # a wider/deeper random Qwen3 for GPU measurements
        config = dict(hero.model.config)
        if args.hidden:
            config.update(hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                          num_attention_heads=args.hidden // 64, num_key_value_heads=max(
                              1, args.hidden // 128), head_dim=64)
        if args.layers:
            config["num_hidden_layers"] = args.layers
        hero = dataclasses.replace(hero, model=dataclasses.replace(hero.model, config=config))
    layer = Layer("cli", "bench", {"training": {"micro_batch_size": args.batch_size,
                                                "max_steps": args.steps, "warmup_steps": 2,
                                                "learning_rate": 1e-3},
                                   "data": {"max_length": 512},
                                   "checkpoint": {"save_steps": 10_000}})
    return hero, resolve([layer], hero, campaign="tiny-qwen3/bench")


WARMUP = 3  # steps excluded from every measurement (allocator warm-up, first-touch)


class StepRecorder:
    """Wraps the engine's real guard (the governor, or the plain finite check when it is off)
    and records (useful tokens, seconds) per optimizer step, the guard's judgement included."""

    def __init__(self, inner):
        self.inner = inner
        self.steps: list[tuple[int, float]] = []
        self.trainer = None

    def start(self, trainer) -> None:
        self.trainer = trainer
        self.inner.start(trainer)

    def propose(self, state) -> None:
        start = time.perf_counter()
        self.inner.propose(state)  # a snapshot copy: its cost belongs to the step
        self._add(time.perf_counter() - start)

    def before_optimizer_step(self) -> None:
        self.inner.before_optimizer_step()

    def judge(self, loss, grad_norm=0.0, *, final=False, step=0):
        start = time.perf_counter()
        decision = self.inner.judge(loss, grad_norm, final=final, step=step)
        if not final:
            m = self.trainer.stats.last
            self.steps.append((m.tokens, m.step_latency_ms / 1000 + time.perf_counter() - start))
        return decision

    def _add(self, seconds: float) -> None:
        if self.steps:
            tokens, took = self.steps[-1]
            self.steps[-1] = (tokens, took + seconds)

    def rollback(self, decision, state):
        return self.inner.rollback(decision, state)

    def counts(self) -> dict:
        return self.inner.counts()


def rate(steps: list[tuple[int, float]]) -> float:
    kept = steps[WARMUP:]
    return sum(t for t, _ in kept) / sum(s for _, s in kept)


def bench_realm(args, tmp: Path, dataset: Path, hero, resolved, governor: bool = True) -> float:
    spec = JobSpec("bench", dataset, hash_file(dataset), resolved.config, resolved.locked, hero,
                   tmp / "ckpt", tmp / "cache")
    cfg = resolved.config.governor
    inner = GovernorGuard(cfg, resolved.locked["vocab_size"]) if governor else FiniteGuard()
    recorder = StepRecorder(inner)
    Trainer(spec, guard=recorder).train()
    return rate(recorder.steps)


def bench_bare(args, store, hero, resolved) -> float:
    """The same packed rows and span attention as (a), in the plainest possible loop."""
    device, dtype = pick_device("auto")
    model, tok = load_model(hero, resolved.locked, seed=0)
    if device.type == "cpu":  # the engine's choice: span attention on CPU, 4D mask on CUDA
        use_packed_attention(model)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    rows = pack_rows(store.lengths(), 512)
    random.Random(0).shuffle(rows)
    B, steps = args.batch_size, []
    for step in range(args.steps):
        start = time.perf_counter()
        batch = collate(rows[step * B % len(rows):][:B], store, tok.pad_token_id)
        n = batch.target_tokens
        batch = batch.to(device)
        loss = token_loss_sum(model, batch, dtype) / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the engine reads the loss every step too
        steps.append((n, time.perf_counter() - start))
    return rate(steps)


def bench_hf(args, store, hero, resolved, tmp: Path) -> float:
    from transformers import Trainer as HFTrainer, TrainerCallback, TrainingArguments

    device, dtype = pick_device("auto")
    model, tok = load_model(hero, resolved.locked, seed=0)
    examples = []
    for i in range(len(store)):
        ids, trained = store.example(i)
        ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.where(torch.as_tensor(trained, dtype=torch.bool), ids, IGNORE)
        examples.append({"input_ids": ids, "labels": labels})
    pending: list[int] = []

    def pad_collator(batch):
        L = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), L), tok.pad_token_id)
        labels = torch.full((len(batch), L), IGNORE)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = e["input_ids"], e["labels"], 1
        pending.append(int((labels[:, 1:] != IGNORE).sum()))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    steps: list[tuple[int, float]] = []

    class Timer(TrainerCallback):
        """Step-end to step-end: the data fetch, forward, backward and optimizer step."""

        last = None

        def on_step_end(self, args_, state, control, **kw):
            now = time.perf_counter()
            if self.last is not None:
                steps.append((pending.pop(0), now - self.last))
            else:
                pending.pop(0)
            self.last = now

    targs = TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=args.batch_size,
                              max_steps=args.steps + 1, learning_rate=1e-3, warmup_steps=2,
                              logging_strategy="no", save_strategy="no", report_to=[],
                              dataloader_num_workers=0, use_cpu=device.type == "cpu",
                              bf16=dtype is torch.bfloat16, max_grad_norm=1.0, seed=0,
                              disable_tqdm=True)
    trainer = HFTrainer(model=model, args=targs, train_dataset=examples,
                        data_collator=pad_collator, callbacks=[Timer()])
    trainer.train()
    return rate(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--examples", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians")
    parser.add_argument("--hidden", type=int, default=0, help="override the model width")
    parser.add_argument("--layers", type=int, default=0, help="override the model depth")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="realm-bench-") as name:
        tmp = Path(name)
        dataset = make_dataset(tmp / "bench.jsonl", args.examples)
        hero, resolved = resolved_config(args)
        store, _ = load_or_build(dataset, hash_file(dataset), build_byte_tokenizer(), resolved.config.data,
                                 tmp / "cache")
        runs: dict[str, list[float]] = {"a": [], "a0": [], "b": [], "c": []}
        for round_ in range(args.rounds):  # interleaved, so machine noise hits all alike
            for key, fn in (("a", lambda: bench_realm(args, tmp, dataset, hero, resolved)),
                            ("a0", lambda: bench_realm(args, tmp, dataset, hero, resolved,
                                                       governor=False)),
                            ("b", lambda: bench_hf(args, store, hero, resolved, tmp)),
                            ("c", lambda: bench_bare(args, store, hero, resolved))):
                shutil.rmtree(tmp / "ckpt", ignore_errors=True)
                runs[key].append(fn())
        a, a0, b, c = (statistics.median(runs[k]) for k in ("a", "a0", "b", "c"))
    device, dtype = pick_device("auto")
    width = f" (hidden {args.hidden or 128}, layers {args.layers or 4})"
    print(f"engine benchmark: tiny-qwen3{width}, {args.examples} examples of 16-512 tokens, batch "
          f"{args.batch_size}, {args.steps} steps, device {device.type}"
          f"{' bf16' if dtype else ' fp32'}, torch threads {torch.get_num_threads()}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"  (a) realm engine, packed         {a:10,.0f} useful tokens/s (governor on)")
    print(f"      same, governor off           {a0:10,.0f} useful tokens/s "
          f"-> governor overhead {100 * (a0 / a - 1):+.1f}% of step time (target < 2%)")
    print(f"  (b) HF Trainer, padding collator {b:10,.0f} useful tokens/s")
    print(f"  (c) bare PyTorch, packed rows    {c:10,.0f} useful tokens/s")
    print(f"  a/b = {a / b:.2f}  (target >= 2.0)")
    print(f"  a/c = {a / c:.2f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
