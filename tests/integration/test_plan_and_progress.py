"""`realm daemon --plan` (grouped problems, max_steps, the hero tokenizer's token estimate,
torch-free) and the daemon's terminal progress."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.test_daemon_once import realm_cmd
from tests.trainer.test_training import make_realm


def test_plan_groups_problems_counts_tokens_with_the_hero_tokenizer_and_shows_all_epochs(
        tmp_path):
    paths = make_realm(tmp_path / "r", overrides={"training": {"micro_batch_size": 4}})
    texts = [f"line {i}: the quick brown fox — ünïcode {i * 7}" for i in range(30)]
    (paths.state_dir("high") / "good.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    (paths.state_dir("normal") / "bad.jsonl").write_text('{"txt": 1}\n' * 20 + '[1]\n')
    plan = json.loads(realm_cmd(paths.base, "daemon", "--plan", "--json").stdout)
    good, bad = plan["jobs"]
    # the tiny hero's byte tokenizer: a token per UTF-8 byte of the text, plus the EOS
    assert good["estimated_tokens"] == sum(len(t.encode()) + 1 for t in texts)
    assert good["token_estimate"].startswith("tiny-qwen3 tokenizer on 30 lines")
    assert bad["problems"] == [
        f"{paths.state_dir('normal') / 'bad.jsonl'}:1: none of 'text', 'prompt'+'completion', "
        "'messages' (keys: txt) (x 20 of the first 50 lines: 1, 2, 3, 4, 5, ...)",
        f"{paths.state_dir('normal') / 'bad.jsonl'}:21: a line must be a JSON object, got list"]
    text = realm_cmd(paths.base, "daemon", "--plan").stdout
    assert "training.max_steps = none (all epochs) (" in text and "None" not in text
    assert text.count("none of 'text'") == 1 and "tokens estimated by tiny-qwen3 tokenizer" in text


def test_plan_never_imports_torch(tmp_path):
    paths = make_realm(tmp_path / "r")
    (paths.state_dir("high") / "a.jsonl").write_text('{"text": "hello"}\n')
    code = ("import sys, cli.main; rc = cli.main.main(['--base-dir', sys.argv[1], 'daemon', "
            "'--plan']); print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(paths.base)], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip().endswith("False False"), out.stdout + out.stderr
    assert "a.jsonl" in out.stdout and "tokens estimated by tiny-qwen3" in out.stdout
