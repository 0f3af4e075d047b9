"""Held-out exact match by greedy generation from a checkpoint, full or adapter (used by
``realm demo``).

    python -m trainer.evaluate CHECKPOINT HELDOUT.jsonl     prints {"accuracy", "n"} as JSON

Each line of HELDOUT is ``{"prompt", "completion"}``; an answer counts when the greedy
continuation (up to the end-of-sequence token) equals the completion exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_trained(checkpoint: Path):
    """A checkpoint's model for inference: the full model, or an adapter on the base its
    ``adapter_config.json`` names (``trainer.adapters``)."""
    from trainer.adapters import ADAPTER_CONFIG, is_adapter_folder

    if not is_adapter_folder(checkpoint):
        return AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    from peft import PeftModel

    base = json.loads((checkpoint / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                     str(checkpoint)).eval()


@torch.no_grad()
def exact_match(checkpoint: Path, examples: list[dict], max_new_tokens: int = 8,
                batch: int = 64) -> float:
    """Prompts of the same token length are decoded together (no padding, so each row is
    computed as it would be alone); a finished row is padded after its end token, which the
    decoding skips."""
    model = load_trained(checkpoint)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    by_length: dict[int, list[tuple[list[int], str]]] = {}
    for ex in examples:
        ids = tok(ex["prompt"], add_special_tokens=False)["input_ids"]
        by_length.setdefault(len(ids), []).append((ids, ex["completion"]))
    right = 0
    for length, rows in by_length.items():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            ids = torch.tensor([r[0] for r in chunk])
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            answers = tok.batch_decode(out[:, length:], skip_special_tokens=True)
            right += sum(a == want for a, (_, want) in zip(answers, chunk))
    return right / max(1, len(examples))


def main(argv: list[str] | None = None) -> int:
    checkpoint, data = (argv or sys.argv[1:])[:2]
    examples = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
    print(json.dumps({"accuracy": exact_match(Path(checkpoint), examples), "n": len(examples)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
