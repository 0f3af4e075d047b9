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
def exact_match(checkpoint: Path, examples: list[dict], max_new_tokens: int = 8) -> float:
    model = load_trained(checkpoint)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    right = 0
    for ex in examples:
        ids = torch.tensor([tok(ex["prompt"], add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        right += answer == ex["completion"]
    return right / max(1, len(examples))


def main(argv: list[str] | None = None) -> int:
    checkpoint, data = (argv or sys.argv[1:])[:2]
    examples = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
    print(json.dumps({"accuracy": exact_match(Path(checkpoint), examples), "n": len(examples)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
