"""`realm daemon --plan` (grouped problems, max_steps, the hero tokenizer's token estimate,
torch-free) and the daemon's terminal progress."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from core.training_queue import TrainingQueue
from tests.conftest import drop
from tests.integration.test_daemon_once import realm_cmd
from tests.trainer.test_training import make_realm
from trainer.data.synthetic import write_dataset


def test_plan_shows_the_adapter_and_a_job_whose_settings_change_the_locked_shape(tmp_path):
    """A job's or the realm's adapter.* can differ from what the campaign's checkpoints were
    trained with: the job would be refused, and the plan says so beforehand."""
    from cli.plan import build_plan
    from guild.selection import resolve_for

    paths = make_realm(tmp_path / "r", overrides={"adapter": {"method": "lora", "r": 8}})
    step = paths.campaigns / "tiny-qwen3" / "c1" / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    (step / "locked.json").write_text(json.dumps(resolve_for(paths).locked))
    (step / "COMPLETE").write_text("")
    queue = TrainingQueue(paths.base)
    for name, sets in (("same.jsonl", None), ("other.jsonl", {"adapter": {"r": 4}})):
        write_dataset(paths.base / name, 20)
        queue.add(paths.base / name, overrides=sets)
    rows = {r["file"]: r for r in build_plan(paths)["jobs"]}
    same, other = rows["queue/normal/same.jsonl"], rows["queue/normal/other.jsonl"]
    assert same["settings"]["adapter.method"] == {"value": "lora", "layer": "campaign"}
    assert same["problems"] == []
    assert len(other["problems"]) == 1, other["problems"]
    assert f"would be refused continuing from {step}" in other["problems"][0]
    assert "adapter.r: checkpoint has 8, campaign has 4" in other["problems"][0]


def _terminal_env() -> dict:
    """The environment of a program on the pseudo-terminal: its size comes from the terminal
    (TIOCSWINSZ), never from a COLUMNS/LINES that pytest or a worker process left behind."""
    return {k: v for k, v in os.environ.items() if k not in ("REALM_DEBUG", "COLUMNS", "LINES")}


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


def run_in_terminal(argv: list[str], *, interrupt_when: bytes | None = None,
                    timeout: float = 240) -> bytes:
    """Run ``argv`` on a real pseudo-terminal (its controlling terminal, 120 columns) and return
    every byte it wrote there; with ``interrupt_when``, type Ctrl-C (the tty sends SIGINT to the
    foreground group, as in a shell) once those bytes have appeared."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        os.execvpe(argv[0], argv, _terminal_env())
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    out, sent, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the other side closed
                    break
                if not chunk:
                    break
                out += chunk
            if interrupt_when and not sent and interrupt_when in out:
                os.write(fd, b"\x03")
                sent = True
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.waitpid(pid, 0)
        os.close(fd)
    return out


def frames(out: bytes) -> list[str]:
    """What the terminal showed, split where tqdm or a newline returns to the line start."""
    text = out.decode("utf-8", "replace").replace("\x1b[2K", "")  # erase-line: shows nothing
    return [f.strip() for f in re.split(r"[\r\n]+", text) if f.strip()]


def daemon_argv(base, *args) -> list[str]:
    return [sys.executable, "-m", "cli", "--base-dir", str(base), "daemon", *args]


@pytest.mark.slow(seconds=20)
def test_progress_bar_shows_the_childs_step_and_eta_from_the_first_step(tmp_path):
    paths = make_realm(tmp_path / "r")
    write_dataset(paths.state_dir("high") / "five.jsonl", 400)
    (paths.base / "config.json").write_text(json.dumps({"daemon": {"settle_seconds": 0.2}}))
    # steps of a few tenths of a second (the bar reads the child's file every 0.2 s)
    out = run_in_terminal(daemon_argv(paths.base, "--once", "--max-steps", "5",
                                      "--batch-size", "8", "--max-length", "512"))
    shown = frames(out)
    bars = [f for f in shown if f.startswith("five.jsonl:") and "/5 [" in f]
    assert bars, f"no progress bar on the terminal: {shown}"
    # the child's own numbers: its ETA and step time, never tqdm's rate guess
    assert re.search(r"\d/5 \[\d\d:\d\d, eta \d\d:\d\d, \d+\.\d\d s/step, loss \d+\.\d{4}",
                     bars[0]), bars[0]
    assert "step/s" not in out.decode("utf-8", "replace")
    completed = next(i for i, f in enumerate(shown) if f.startswith("completed "))
    assert completed > shown.index(bars[0]), "the bar showed while the job ran"
    assert any(line.startswith("daemon stopped: 1 completed") for line in shown)


@pytest.mark.slow(seconds=15)
def test_ctrl_c_message_is_on_its_own_line_not_on_the_bar(tmp_path):
    paths = make_realm(tmp_path / "r")
    write_dataset(paths.state_dir("high") / "long.jsonl", 400)
    (paths.base / "config.json").write_text(json.dumps({"daemon": {"settle_seconds": 0.2}}))
    out = run_in_terminal(daemon_argv(paths.base, "--max-steps", "5000", "--epochs", "50"),
                          interrupt_when=b" s/step, loss")
    text = out.decode("utf-8", "replace").replace("\x1b[2K", "")  # erase-line: no text
    at = text.index("SIGINT: warm stop: finishing at the next step boundary")
    line_start = max(text.rfind("\r", 0, at), text.rfind("\n", 0, at))
    assert text[line_start + 1:at] == "", f"the message shares a line: {text[:at][-200:]!r}"
    assert text[at:].split("boundary", 1)[1].startswith(("\r\n", "\n"))
    assert "daemon stopped: 0 completed, 0 failed, 1 requeued" in text
    [job] = TrainingQueue(paths.base).jobs_in("high")
    assert job.resume, "the warm stop kept a resume point"


def test_status_watch_says_interval_and_quit_fits_the_width_and_shows_finished_jobs(realm):
    queue = TrainingQueue(realm.base, settle_seconds=0)
    drop(realm, "high", "done.jsonl")
    drop(realm, "normal", "broke.jsonl")
    ckpt = str(realm.base / "campaigns/tiny-qwen3/c1/checkpoints/step-20")
    queue.complete(queue.claim_next(), start_step=0, final_step=20, final_loss=1.23456,
                   metadata={"checkpoint": ckpt})
    queue.fail(queue.claim_next(), "a reason long enough to wrap on a narrow terminal: " * 3)
    argv = [sys.executable, "-m", "cli", "--base-dir", str(realm.base), "queue", "status",
            "--watch", "--interval", "0.3"]
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(argv[0], argv, _terminal_env())
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 110, 0, 0))
    out = b""
    deadline = time.monotonic() + 60
    while out.count(b"Ctrl-C to quit") < 3 and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            out += os.read(fd, 65536)
    os.write(fd, b"\x03")
    try:
        while select.select([fd], [], [], 2)[0]:
            out += os.read(fd, 65536)
    except OSError:
        pass
    _, code = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(code) == 0, "Ctrl-C ends --watch with 0"
    screen = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode("utf-8", "replace"))
    # the terminal echoes Ctrl-C as "^C" wherever the cursor is: not part of realm's line
    lines = [line.removesuffix("^C") for line in re.split(r"\r?\n", screen)]
    lines = [line for line in lines if line]
    assert "refreshing every 0.3 s (--interval) · Ctrl-C to quit" in screen
    assert max(len(line) for line in lines) <= 110, [x for x in lines if len(x) > 110]
    assert any(line.endswith("…") and "failed" in line for line in lines), "cut, not wrapped"
    done = next(line for line in lines if "done.jsonl" in line)
    assert "done.jsonl  steps 0->20  loss 1.2346  tiny-qwen3/c1  finished" in done
    assert "--interval SECONDS" in realm_cmd(realm.base, "queue", "status", "--help").stdout
    bad = realm_cmd(realm.base, "queue", "status", "--watch", "--interval", "0")
    assert bad.returncode == 2 and "--interval 0: must be between 0.05 and" in bad.stderr
