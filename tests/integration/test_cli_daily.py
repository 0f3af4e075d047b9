"""The command line behaves the same everywhere (issue 15): `realm init DIR`, HERO/NAME wherever a
campaign is named, jobs found by dataset stem, `--version`, help on every option, completion.
Real subprocesses, real realms in tmp_path."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from cli.main import build_parser
from core.training_queue import TrainingQueue
from tests.conftest import write_dataset
from tests.integration.test_cli import realm_cmd


def bare(*args, cwd=None):
    """``realm ARGS`` without the --base-dir that realm_cmd adds."""
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_init_takes_the_directory_as_a_positional(tmp_path):
    out = bare("init", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "queue" / "high").is_dir()
    assert f"realm ready at {tmp_path / 'r'}" in out.stdout
    same = bare("init", str(tmp_path / "r"), "--base-dir", str(tmp_path / "r"))
    assert same.returncode == 0 and "nothing to do" in same.stdout
    clash = bare("init", str(tmp_path / "a"), "--base-dir", str(tmp_path / "b"))
    assert clash.returncode == 2
    assert "two different realms named" in clash.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_version_names_realm_torch_and_transformers_without_importing_torch():
    out = bare("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("realm 0.") and ", torch 2." in out.stdout
    assert "transformers " in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, contextlib, io\nfrom cli.main import main\n"
         "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
         "    main(['--version'])\nprint('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False", probe.stderr


def _campaign(realm, name="c1"):
    out = realm_cmd(realm.base, "campaign", "create", name, "--hero", "tiny-qwen3",
                    "--no-activate")
    assert out.returncode == 0, out.stderr


def test_hero_slash_name_is_accepted_wherever_a_campaign_is_named(realm, tmp_path):
    _campaign(realm)
    src = write_dataset(tmp_path / "d.jsonl")
    for ref in ("tiny-qwen3/c1", "c1"):
        out = realm_cmd(realm.base, "queue", "add", str(src), "--campaign", ref)
        assert out.returncode == 0, out.stderr
    ids = [j.campaign_id for j in TrainingQueue(realm.base).queued()]
    assert ids == ["tiny-qwen3/c1", "tiny-qwen3/c1"], "stored in one canonical form"
    for cmd in (("campaign", "activate", "tiny-qwen3/c1"), ("campaign", "show", "tiny-qwen3/c1"),
                ("config", "show", "--campaign", "tiny-qwen3/c1")):
        out = realm_cmd(realm.base, *cmd)
        assert out.returncode == 0, (cmd, out.stderr)
    # the same refusals, from the same parser, for every command
    for cmd in (("queue", "add", str(src), "--campaign"), ("campaign", "activate"),
                ("config", "show", "--campaign")):
        bad = realm_cmd(realm.base, *cmd, "a/b/c")
        assert bad.returncode == 2 and "name a campaign as HERO/NAME" in bad.stderr, cmd
        missing = realm_cmd(realm.base, *cmd, "tiny-qwen3/nope")
        assert missing.returncode == 2 and "no campaign 'tiny-qwen3/nope'" in missing.stderr
    clash = realm_cmd(realm.base, "queue", "add", str(src), "--campaign", "tiny-qwen3/c1",
                      "--hero", "qwen3-0.6b")
    assert clash.returncode == 2 and "belongs to hero 'tiny-qwen3', not 'qwen3-0.6b'" \
        in clash.stderr
    assert len(TrainingQueue(realm.base).queued()) == 2, "a refused add queues nothing"


def test_jobs_are_found_by_dataset_stem_and_an_ambiguous_stem_lists_them(realm, tmp_path):
    queue = TrainingQueue(realm.base)
    job = queue.add(write_dataset(tmp_path / "addition-a.jsonl"))
    out = realm_cmd(realm.base, "queue", "show", "addition-a", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["id"] == job.id
    queue.cancel(job)
    again = queue.add(write_dataset(tmp_path / "addition-a.jsonl"))
    both = realm_cmd(realm.base, "queue", "show", "addition-a")
    assert both.returncode != 0
    assert "'addition-a' matches 2 jobs" in both.stderr
    assert job.id in both.stderr and again.id in both.stderr and "cancelled" in both.stderr
    exact = realm_cmd(realm.base, "queue", "show", "queue/normal/addition-a.jsonl", "--json")
    assert json.loads(exact.stdout)["id"] == again.id, "a path is exact: no ambiguity"
    none = realm_cmd(realm.base, "queue", "show", "addition-z")
    assert "no job matches 'addition-z'" in none.stderr and "stem" in none.stderr


def _missing_help(parser: argparse.ArgumentParser, path: list[str]) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in action._choices_actions}
            for name, child in action.choices.items():
                if not helps.get(name):
                    missing.append(" ".join(path + [name]) + " (the subcommand)")
                missing += _missing_help(child, path + [name])
        elif isinstance(action, argparse._HelpAction):
            continue
        elif len(path) > 1 and action.dest in ("base_dir", "debug"):
            continue  # the global options again, hidden on purpose (shown once, at the top)
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(" ".join(path) + " " + (action.option_strings or [action.dest])[0])
    return missing


def test_every_option_of_every_subcommand_has_help():
    assert _missing_help(build_parser(), ["realm"]) == []


def test_the_help_walker_notices_an_option_without_help():
    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers()
    child = sub.add_parser("go", help="go somewhere")
    child.add_argument("--fast", action="store_true")
    child.add_argument("--hidden", help=argparse.SUPPRESS)
    assert _missing_help(parser, ["x"]) == ["x go --fast", "x go --hidden"]


def test_completion_scripts_name_the_subcommands():
    bash = bare("completion", "bash")
    assert bash.returncode == 0, bash.stderr
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = set(sub.choices)
    assert {"init", "queue", "daemon", "campaign", "config", "completion"} <= commands
    for word in sorted(commands) + ["hold", "release", "pause", "resume", "--all-failed",
                                    "--base-dir"]:
        assert word in bash.stdout, word
    assert "complete" in bash.stdout and "_shtab_realm" in bash.stdout
    zsh = bare("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef realm")
    fish = bare("completion", "fish")
    assert fish.returncode == 2 and "invalid choice: 'fish'" in fish.stderr
