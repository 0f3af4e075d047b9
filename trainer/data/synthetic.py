"""A generated dataset that a tiny model can learn: arithmetic and word facts in all three
formats, with lengths spread from a few to a few hundred tokens. Pure Python, seeded."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("amber basil cedar delta ember fjord grove harbor indigo juniper kelp lumen meadow "
         "nectar onyx prism quartz river sage tundra umber velvet willow xenon yarrow zephyr").split()


def _sum_question(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."


def _filler(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def example(rng: random.Random, kind: str) -> dict:
    if kind == "text":
        words = _filler(rng, 2, 60)
        return {"text": f"The words of the day: {words}. Counted: {len(words.split())}."}
    if kind == "prompt_completion":
        q, a = _sum_question(rng)
        return {"prompt": f"{_filler(rng, 0, 20)}\nQuestion: {q}\nAnswer: ", "completion": a}
    turns = []
    for _ in range(rng.randint(1, 3)):
        q, a = _sum_question(rng)
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": [{"role": "system", "content": "You add numbers."}, *turns]}


def write_dataset(path: Path, n: int, seed: int = 0,
                  kinds: tuple[str, ...] = ("text", "prompt_completion", "messages")) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps(example(rng, kinds[i % len(kinds)])) + "\n")
    return path


def addition_split(seed: int = 0, limit: int = 50, held_out: int = 200
                   ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All pairs a, b < limit, shuffled: (training pairs, held-out pairs never trained on)."""
    pairs = [(a, b) for a in range(limit) for b in range(limit)]
    random.Random(seed).shuffle(pairs)
    return pairs[held_out:], pairs[:held_out]


def write_addition(path: Path, pairs: list[tuple[int, int]]) -> Path:
    """The demo skill: ``{"prompt": "23+19=", "completion": "42"}`` per line."""
    with open(path, "w", encoding="utf-8") as fh:
        for a, b in pairs:
            fh.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    return path
