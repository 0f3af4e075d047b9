"""Tokenization speed and peak memory on large JSONL files, per line format.

    python scripts/bench_memory.py [--mebibytes 256] [--formats text,prompt_completion,messages]
                                   [--tokenizer byte,bpe]

For each format, generates a JSONL file of the given size in a temp dir and builds the token
cache (``trainer.data.cache.load_or_build``: batched encoding, chat masks, truncation) with
realm's byte tokenizer (tiny-qwen3) and with a byte-level BPE tokenizer of 4,000 tokens trained
here in code (the shape of GPT-2/Qwen/Llama 3 tokenizers, with a ChatML template). Prints MiB/s,
tokens/s and the peak memory growth over the memory before the build: the proportional set size
(PSS) of this process plus its forked encoder workers, sampled every 100 ms (forked workers share
their parent's pages; PSS splits shared pages between the processes, RSS would count them in each).
Targets, printed and not asserted: at least 20 MiB/s, and a memory growth that does not grow with
the file (under 500 MiB at 1 GiB).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from config.schema import DataConfig  # noqa: E402
from trainer.data.cache import hash_file, load_or_build  # noqa: E402
from trainer.model import BYTE_CHAT_TEMPLATE, BYTE_SPECIALS, build_byte_tokenizer  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her which or had "
         "capital France Paris river mountain answer question because number seven "
         "température ünïcode naïve 世界").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def line(fmt: str, rng: random.Random) -> str:
    if fmt == "text":
        obj = {"text": " ".join(sentence(rng, rng.randint(8, 20)) for _ in range(12))}
    elif fmt == "prompt_completion":
        obj = {"prompt": "Question: " + sentence(rng, 40) + " Answer: ",
               "completion": sentence(rng, 60)}
    else:
        obj = {"messages": [{"role": "system", "content": "You answer questions."}]}
        for _ in range(3):
            obj["messages"] += [{"role": "user", "content": sentence(rng, 25)},
                                {"role": "assistant", "content": sentence(rng, 40)}]
    return json.dumps(obj, ensure_ascii=False) + "\n"


def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator([sentence(rng, 50) for _ in range(2000)], trainers.BpeTrainer(
        vocab_size=4000, special_tokens=BYTE_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>",
                                  additional_special_tokens=BYTE_SPECIALS[1:])
    tok.chat_template = BYTE_CHAT_TEMPLATE.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    return tok


def measure(path: Path, tokenizer, cache: Path) -> tuple[float, float, dict]:
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def pss(pid: int) -> int:
        """Proportional set size from /proc/<pid>/smaps_rollup (one cheap summary line)."""
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for row in fh:
                    if row.startswith("Pss:"):
                        return int(row.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def rss() -> int:
        """PSS of this process and its forked encoder workers: shared pages are split between
        the processes sharing them, so the sum is the memory really used."""
        return pss(proc.pid) + sum(pss(child.pid) for child in proc.children(recursive=True))

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.1)

    base = rss()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sha = hash_file(path)
    start = time.perf_counter()
    store, _ = load_or_build(path, sha, tokenizer, DataConfig(max_length=2048), cache)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    return seconds, (peak[0] - base) / 2**20, store.meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mebibytes", type=float, default=256)
    parser.add_argument("--formats", default="text,prompt_completion,messages")
    parser.add_argument("--tokenizer", default="byte,bpe")
    args = parser.parse_args()
    tokenizers = {"byte": build_byte_tokenizer, "bpe": bpe_tokenizer}
    with tempfile.TemporaryDirectory(prefix="realm-mem-") as name:
        for fmt in args.formats.split(","):
            rng = random.Random(0)
            sample = "".join(line(fmt, rng) for _ in range(200))
            path = Path(name) / f"{fmt}.jsonl"
            with open(path, "w") as fh:
                fh.write(sample * max(1, int(args.mebibytes * 2**20 // len(sample.encode()))))
            size = path.stat().st_size / 2**20
            for kind in args.tokenizer.split(","):
                seconds, growth, meta = measure(path, tokenizers[kind](), Path(name) / kind)
                print(f"{fmt:18s} {kind:5s} {size:7.0f} MiB in {seconds:6.1f} s: "
                      f"{size / seconds:6.1f} MiB/s, {meta['num_tokens'] / seconds / 1e6:5.2f} M "
                      f"tokens/s, peak memory growth {growth:5.0f} MiB "
                      f"({meta['num_examples']:,} examples, "
                      f"{meta['trained_tokens'] / max(1, meta['num_tokens']):.0%} trained)")
            path.unlink()
    print("targets: >= 20 MiB/s per format; memory growth flat in the file size (< 500 MiB at "
          "1 GiB)")


if __name__ == "__main__":
    main()
