"""Hostile and broken config in every layer: NaN, Infinity, huge integers, files that are not
objects, not UTF-8, too deep, too big, special files, YAML anchor bombs, names too long for the
file system. Each is refused with a message naming what, where and how to fix it."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from cli.common import positive_seconds
from config.flags import cli_layer, parse_sets_checked
from core.errors import ConfigError, UsageError
from core.job import Job
from core.paths import RealmPaths
from guild.campaigns import active_ref, create_campaign, find_campaign, read_campaign
from guild.heroes import install_shipped, list_heroes, load_hero, load_hero_file, shipped_dir
from config.resolver import SPECS, Layer, check_values, resolve
from guild.selection import CampaignOf, resolve_for
from config.schema import BOUNDS

HERO = load_hero_file(shipped_dir() / "tiny-qwen3.yaml")
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
FLOAT_KEYS = ["training.learning_rate", "data.max_bad_fraction", "daemon.poll_interval",
              "daemon.settle_seconds", "governor.sigma_k", "daemon.job_timeout"]
SHOWN = {"nan": "nan", "inf": "inf", "-inf": "-inf"}


@pytest.fixture
def hrealm(realm: RealmPaths) -> RealmPaths:
    install_shipped(realm)
    return realm


def _finite_message(key: str, value: float, layer: str) -> str:
    return rf"{key} is {SHOWN[repr(value)]}; write a finite number \(from the {layer} layer"


# --- NaN and Infinity, every layer --------------------------------------------------------------

@pytest.mark.parametrize("layer", ["hero", "campaign", "realm", "job", "cli"])
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_refused_in_every_layer(layer, value, key):
    with pytest.raises(ConfigError, match=_finite_message(key, value, layer)):
        resolve([Layer(layer, f"{layer}-source", {key: value})], HERO)


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-Infinity", "Infinity", "1e999", "-1e999"])
def test_set_and_flag_strings_that_parse_to_non_finite_are_refused(text):
    sets = parse_sets_checked([f"data.max_bad_fraction={text}"])
    with pytest.raises(ConfigError, match=r"data.max_bad_fraction is -?(nan|inf); write a finite"):
        resolve([cli_layer({}, sets, [])], HERO)
    with pytest.raises(ConfigError, match=r"learning_rate is -?(nan|inf).*--learning-rate"):
        resolve([cli_layer({"learning_rate": text}, {}, [])], HERO)


@pytest.mark.parametrize("key", ["training.seed", "training.epochs", "checkpoint.save_steps"])
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_in_integer_keys_says_finite_not_just_type(key, value):
    with pytest.raises(ConfigError, match=_finite_message(key, value, "job")):
        resolve([Layer("job", "a.jsonl.job.json", {key: value})], HERO)


# --- huge integers and bounds ---------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("training.seed", 10**29), ("training.epochs", 10**30), ("checkpoint.save_steps", -10**20),
    ("training.learning_rate", 10**30), ("daemon.poll_interval", 2**60),
])
def test_integers_past_max_int_refused(key, value):
    with pytest.raises(ConfigError, match=rf"{key} is -?\d+, larger than 9,007,199,254,740,992; "
                                          r"write a smaller number \(from the realm layer"):
        resolve([Layer("realm", "config.json", {key: value})], HERO)


def test_integer_of_thousands_of_digits_is_described_not_printed():
    with pytest.raises(ConfigError) as info:
        resolve([Layer("realm", "config.json", {"training.seed": 10**4000})], HERO)
    assert "training.seed is an integer of about 4001 digits" in str(info.value)
    assert len(str(info.value)) < 300
    with pytest.raises(ConfigError, match="training.seed: expected an integer of at most 16 "):
        resolve([cli_layer({"seed": "9" * 5000}, {}, [])], HERO)


@pytest.mark.parametrize("seed,ok", [(0, True), (2**32 - 1, True), (2**32, False), (-1, False),
                                     (2**40, False)])
def test_seed_range(seed, ok):
    layer = Layer("cli", "--set", {"training.seed": seed})
    if ok:
        assert resolve([layer], HERO).get("training.seed") == seed
    else:
        with pytest.raises(ConfigError, match=r"training.seed: must be between 0 and 4294967295"):
            resolve([layer], HERO)


def test_every_numeric_key_has_bounds():
    numeric = {k for k, s in SPECS.items() if s.type in (int, float)}
    assert numeric == set(BOUNDS), numeric ^ set(BOUNDS)


@pytest.mark.parametrize("key,value", [
    ("daemon.poll_interval", 0), ("daemon.poll_interval", -1), ("daemon.poll_interval", 1e9),
    ("daemon.settle_seconds", -0.1), ("daemon.heartbeat_seconds", 0),
    ("daemon.lease_seconds", 0), ("daemon.job_timeout", 0), ("daemon.stop_grace_seconds", -1),
    ("governor.divergence_floor", -1), ("logging.status_every_seconds", 1e12),
])
def test_duration_and_threshold_bounds(key, value):
    with pytest.raises(ConfigError, match=rf"{key}: must be (at least|between) "):
        resolve([Layer("cli", "--set", {key: value})], HERO)


# --- files: config.json, campaign.json, active.json -----------------------------------------------

@pytest.mark.parametrize("text,got", [("[1, 2]", "a list"), ("3", "a number"), ("null", "null"),
                                      ('"x"', "a string"), ("true", "true/false")])
def test_config_json_not_an_object(hrealm, text, got):
    (hrealm.base / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=rf"config.json: realm config.json must be a JSON object "
                                          rf"such as .*, got {got}; rewrite it as an object"):
        resolve_for(hrealm)


# core.validate refuses non-finite literals while parsing; the resolver refuses what gets past it
NOT_FINITE = r"is not a (JSON|finite) number.*write a finite number"


@pytest.mark.parametrize("body,match", [
    ('{"training": {"learning_rate": NaN}}', rf"NaN {NOT_FINITE}"),
    ('{"training": {"learning_rate": Infinity}}', rf"Infinity {NOT_FINITE}"),
    ('{"data": {"max_bad_fraction": -Infinity}}', rf"-Infinity {NOT_FINITE}"),
    ('{"data": {"max_bad_fraction": 1e999}}',
     rf"(1e999 {NOT_FINITE}|data.max_bad_fraction is inf)"),
    ('{"daemon": {"poll_interval": -1e999}}',
     rf"(-1e999 {NOT_FINITE}|daemon.poll_interval is -inf)"),
    ('{"training": {"seed": 100000000000000000000000000000}}', r"training.seed is 1000+, larger"),
    ('{"training": {"seed": 1' + "0" * 5000 + '}}', r"config.json holds a value that cannot be"),
    ("[" * 40 + "]" * 40, r"JSON nested 40 deep; at most 32 levels are accepted"),
    ("[" * 100_000 + "]" * 100_000, r"JSON nested 100000 deep"),
])
def test_config_json_hostile_values(hrealm, body, match):
    (hrealm.base / "config.json").write_text(body)
    with pytest.raises(ConfigError, match=match) as info:
        resolve_for(hrealm)
    assert "config.json" in str(info.value)


def test_config_json_not_utf8_too_big_symlink_fifo_directory(hrealm, tmp_path):
    path = hrealm.base / "config.json"
    path.write_bytes(b'{"training": {"epochs": "\xff\xfe"}}')
    with pytest.raises(ConfigError, match=r"config.json: not UTF-8 text \(byte 25: invalid start "
                                          r"byte\); write it as UTF-8"):
        resolve_for(hrealm)
    path.write_text('{"x": "' + "a" * (1 << 20) + '"}')
    with pytest.raises(ConfigError, match=r"config.json: realm config.json is 1,048,\d+ bytes, "
                                          r"over the limit of 1,048,576"):
        resolve_for(hrealm)
    path.unlink()
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    path.symlink_to(outside)
    with pytest.raises(ConfigError, match=r"config.json: realm config.json is a symlink"):
        resolve_for(hrealm)
    path.unlink()
    os.mkfifo(path)  # must not block
    with pytest.raises(ConfigError, match=r"config.json: realm config.json is a FIFO, not a "
                                          r"regular file"):
        resolve_for(hrealm)
    path.unlink()
    path.mkdir()
    with pytest.raises(ConfigError, match=r"is a directory, not a regular file"):
        resolve_for(hrealm)


def _campaign(hrealm, name="c1", **overrides) -> Path:
    create_campaign(hrealm, name, "tiny-qwen3", overrides=overrides or None)
    return hrealm.campaigns / "tiny-qwen3" / name / "campaign.json"


@pytest.mark.parametrize("literal,match", [
    ("NaN", rf"campaign.json: NaN {NOT_FINITE}"),
    ("Infinity", rf"campaign.json: Infinity {NOT_FINITE}"),
    ("-Infinity", rf"campaign.json: -Infinity {NOT_FINITE}"),
    ("1e999", rf"(campaign.json: 1e999 {NOT_FINITE}|training.learning_rate is inf; write a finite "
              r"number \(from the campaign layer, campaigns/tiny-qwen3/c1/campaign.json\))"),
])
def test_campaign_json_non_finite_override(hrealm, literal, match):
    path = _campaign(hrealm)
    text = path.read_text().replace('"overrides": {}',
                                    f'"overrides": {{"training": {{"learning_rate": {literal}}}}}')
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        resolve_for(hrealm)


@pytest.mark.parametrize("text,got", [("[]", "a list"), ("null", "null"), ("7", "a number")])
def test_campaign_json_not_an_object(hrealm, text, got):
    path = _campaign(hrealm)
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path}: campaign.json must be a JSON object .*got "
                                          rf"{got}"):
        read_campaign(path)
    with pytest.raises(ConfigError, match="campaign.json must be a JSON object"):
        resolve_for(hrealm)


def test_campaign_creation_refuses_non_finite_overrides(hrealm):
    for value in NON_FINITE:
        with pytest.raises(ConfigError, match="training.learning_rate is"):
            create_campaign(hrealm, "c1", "tiny-qwen3",
                            overrides={"training": {"learning_rate": value}})
    assert not list(hrealm.campaigns.rglob("campaign.json"))


# --- the job layer (sidecar overrides) ------------------------------------------------------------

def _job(**fields) -> Job:
    return Job(id="j1", dataset_path="queue/normal/a.jsonl", dataset_name="a.jsonl", **fields)


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_sidecar_override_non_finite(hrealm, value):
    job = _job(overrides={"data": {"max_bad_fraction": value}})
    with pytest.raises(ConfigError, match=r"data.max_bad_fraction is -?(nan|inf); write a finite "
                                          r"number \(from the job layer, "
                                          r"queue/normal/a.jsonl.job.json\)"):
        resolve_for(hrealm, job=job)


def test_sidecar_overrides_not_an_object(hrealm):
    with pytest.raises(ConfigError, match=r"the job layer .* must be an object of config keys"):
        resolve_for(hrealm, job=_job(overrides=[1, 2]))


# --- names too long ------------------------------------------------------------------------------

def test_campaign_name_of_300_characters(hrealm):
    with pytest.raises(UsageError, match=r"is 300 characters long; at most 64 are accepted"):
        create_campaign(hrealm, "c" * 300, "tiny-qwen3")
    with pytest.raises(UsageError, match=r"hero .* is 300 characters long; at most 64"):
        create_campaign(hrealm, "ok", "h" * 300)
    with pytest.raises(UsageError, match=r"at most 64"):
        find_campaign(hrealm, "c" * 300)
    with pytest.raises(UsageError, match=r"at most 64"):
        find_campaign(hrealm, "tiny-qwen3/" + "c" * 300)
    with pytest.raises(UsageError, match=r"at most 64"):
        load_hero(hrealm, "h" * 300)


@pytest.mark.parametrize("fields,name", [
    ({"campaign_id": "c" * 300}, "campaign_id"), ({"campaign_id": "tiny-qwen3/" + "c" * 300},
                                                  "campaign_id"),
    ({"hero_id": "h" * 300}, "hero_id"), ({"campaign_id": "../x"}, "campaign_id"),
])
def test_sidecar_names_refused_naming_sidecar_and_limit(hrealm, fields, name):
    _campaign(hrealm)
    job = _job(**fields)
    with pytest.raises(ConfigError, match=rf"queue/normal/a.jsonl.job.json: {name} .*(at most 64|"
                                          rf"not a safe name).* Fix {name} in the sidecar"):
        resolve_for(hrealm, job=job)
    campaign_of = CampaignOf(hrealm)
    assert campaign_of(job) is None, "a bad sidecar never raises out of the backfill"
    assert campaign_of(_job()) == "tiny-qwen3/c1"
    assert campaign_of(_job(campaign_id="c1")) == "tiny-qwen3/c1"


def test_campaign_of_survives_broken_campaign_files(hrealm):
    path = _campaign(hrealm)
    path.write_text("[" * 50_000)
    assert CampaignOf(hrealm)(_job(campaign_id="tiny-qwen3/c1")) is None
    path.unlink()
    os.mkfifo(path)
    assert CampaignOf(hrealm)(_job(campaign_id="tiny-qwen3/c1")) is None


@pytest.mark.parametrize("body,match", [
    ({"hero_id": "tiny-qwen3", "campaign": "c" * 300}, r"at most 64 are accepted.*Then fix it"),
    ({"hero_id": "tiny-qwen3"}, r"expected \{\"hero_id\": ..., \"campaign\": ...\}"),
    ([1], r"active.json must be a JSON object"),
])
def test_active_file_with_bad_names(hrealm, body, match):
    (hrealm.campaigns / "active.json").write_text(json.dumps(body))
    with pytest.raises(ConfigError, match=match):
        active_ref(hrealm)
    with pytest.raises(ConfigError, match=match):
        resolve_for(hrealm)


def test_campaign_json_with_long_name_inside(hrealm):
    path = _campaign(hrealm)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "hero_id": "h" * 300}))
    with pytest.raises(ConfigError, match=rf"{path}: hero_id hhh.* is 300 characters long; "
                                          r"at most 64"):
        read_campaign(path)


# --- hero YAML ------------------------------------------------------------------------------------

GOOD = """id: {id}
model:
  architecture: Qwen3ForCausalLM
  vocab_size: 512
  context_length: 256
  init: random
  config: {{hidden_size: 64}}
"""


def _hero(realm: RealmPaths, extra: str = "", name: str = "bad", body: str | None = None) -> Path:
    path = realm.heroes / f"{name}.yaml"
    path.write_text(body if body is not None else GOOD.format(id=name) + extra)
    return path


@pytest.mark.parametrize("literal,shown", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"),
                                           (".NaN", "nan"), ("+.Inf", "inf")])
@pytest.mark.parametrize("key", ["learning_rate", "max_grad_norm"])
def test_hero_training_defaults_non_finite(hrealm, literal, shown, key):
    path = _hero(hrealm, f"training_defaults:\n  training:\n    {key}: {literal}\n")
    with pytest.raises(ConfigError, match=rf"{path}:10: training_defaults.training.{key} is "
                                          rf"{shown}; write a finite number"):
        load_hero(hrealm, "bad")


@pytest.mark.parametrize("extra,key,line", [
    ("training_defaults:\n  training:\n    seed: 1000000000000000000000000000000\n",
     "training_defaults.training.seed", 10),
    ("", "model.vocab_size", 4),
    ("", "model.config.hidden_size", 7),
])
def test_hero_huge_integers_name_key_and_line(hrealm, extra, key, line):
    body = GOOD.format(id="bad") + extra
    body = body.replace("vocab_size: 512", "vocab_size: " + "9" * 31) if key == "model.vocab_size" \
        else body.replace("hidden_size: 64", "hidden_size: " + "1" * 40) \
        if key == "model.config.hidden_size" else body
    path = _hero(hrealm, body=body)
    with pytest.raises(ConfigError, match=rf"{path}:{line}: {key} is \d+, larger than "
                                          r"9,007,199,254,740,992"):
        load_hero(hrealm, "bad")


def test_hero_zero_vocab_and_unreadable_integer(hrealm):
    path = _hero(hrealm, body=GOOD.format(id="bad").replace("vocab_size: 512", "vocab_size: 0"))
    with pytest.raises(ConfigError, match=rf"{path}:4: 'model.vocab_size' must be at least 1"):
        load_hero(hrealm, "bad")
    path = _hero(hrealm, body=GOOD.format(id="bad").replace("512", "5" * 5000))
    with pytest.raises(ConfigError, match=rf"{path}: a YAML value cannot be read"):
        load_hero(hrealm, "bad")


BILLION_LAUGHS = "id: bad\na0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10))


@pytest.mark.parametrize("body,match", [
    (BILLION_LAUGHS, r"bad.yaml:\d+: this YAML expands to more than 100,000 values once its "
                     r"aliases \(\*name\) are expanded"),
    ("id: bad\nx: &x\n  - *x\n", r"bad.yaml:\d+: a YAML alias refers to a value that contains it"),
    ("id: bad\nx: " + "[" * 40 + "]" * 40 + "\n", r"bad.yaml:\d+: this YAML nests \d+ levels deep "
                                                  r"\(at most 32\)"),
    ("id: bad\nx: " + "[" * 5000 + "]" * 5000 + "\n", r"bad.yaml: YAML nested too deep to read"),
    ("id: bad\nx: '" + "a" * (1 << 20) + "'\n", r"bad.yaml: hero profile is 1,048,\d+ bytes, over "
                                                r"the limit of 1,048,576"),
])
def test_hero_yaml_bombs_are_refused_quickly(hrealm, body, match):
    _hero(hrealm, body=body)
    with pytest.raises(ConfigError, match=match):
        load_hero(hrealm, "bad")


def test_hero_yaml_not_utf8_fifo_symlink(hrealm, tmp_path):
    path = hrealm.heroes / "bad.yaml"
    path.write_bytes(b"id: bad\nname: \xff\n")
    with pytest.raises(ConfigError, match=rf"{path}: hero profile is not UTF-8 text"):
        load_hero(hrealm, "bad")
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(ConfigError, match=r"hero profile is a FIFO"):
        load_hero(hrealm, "bad")
    path.unlink()
    (tmp_path / "elsewhere.yaml").write_text(GOOD.format(id="bad"))
    path.symlink_to(tmp_path / "elsewhere.yaml")
    with pytest.raises(ConfigError, match=r"hero profile is a symlink"):
        load_hero(hrealm, "bad")


def test_small_anchors_still_work(hrealm):
    _hero(hrealm, body=GOOD.format(id="anch") + "training_defaults:\n  training: &t\n"
          "    epochs: 2\n  governor: {window: 30}\n", name="anch")
    assert load_hero(hrealm, "anch").training_defaults["training"] == {"epochs": 2}


def test_hero_list_lists_bad_files_as_problems(hrealm):
    _hero(hrealm, body=BILLION_LAUGHS)
    _hero(hrealm, "training_defaults:\n  training:\n    learning_rate: .nan\n", name="nanhero")
    _hero(hrealm, name="good")
    heroes, problems = list_heroes(hrealm)
    assert {h.id for h in heroes} == {"tiny-qwen3", "qwen3-0.6b", "good"}
    reasons = {p.id: p.reason for p in problems}
    assert set(reasons) == {"bad", "nanhero"}
    assert "expands to more than 100,000 values" in reasons["bad"]
    assert "training_defaults.training.learning_rate is nan" in reasons["nanhero"]
    assert {p.source for p in problems} == {hrealm.heroes / "bad.yaml",
                                            hrealm.heroes / "nanhero.yaml"}
    with pytest.raises(ConfigError, match="learning_rate is nan"):
        load_hero(hrealm, "nanhero")


# --- command-line helpers -------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "-inf", "abc", "1e9", "", "0.01"])
def test_poll_refused_at_parse_time(text):
    parser = argparse.ArgumentParser(prog="realm daemon", exit_on_error=False)
    parser.add_argument("--poll", type=positive_seconds("--poll"))
    with pytest.raises(argparse.ArgumentError, match=r"--poll"):
        parser.parse_args(["--poll", text])
    assert parser.parse_args(["--poll", "0.5"]).poll == 0.5


def test_set_too_deep_or_too_long_is_a_usage_error():
    with pytest.raises(UsageError, match=r"nested more than 32 levels"):
        parse_sets_checked(["training.x=" + "[" * 1000 + "]" * 1000])
    with pytest.raises(UsageError, match=r"nested more than 32 levels"):
        parse_sets_checked([".".join(["a"] * 2000) + "=1"])
    with pytest.raises(UsageError, match=r"at most 10,000 are accepted"):
        parse_sets_checked(["training.x=" + "1" * 20_000])


@pytest.mark.parametrize("sets,match", [
    (["training.lr=1"], r"unknown key 'training.lr'.*set by the job layer \(--set\)\. Nothing was "
                        r"queued\."),
    (["training.learning_rate=nan"], r"training.learning_rate is nan"),
    (["data.max_bad_fraction=Infinity"], r"data.max_bad_fraction is inf"),
    (["training.seed=100000000000000000000000000000"], r"training.seed is 1000+, larger"),
    (["training.seed=-1"], r"training.seed: must be between 0 and 4294967295"),
    (["training.epochs=two"], r"training.epochs: expected an integer"),
])
def test_queue_add_overrides_checked_against_the_schema(sets, match):
    from cli.queue_cmds import _check_overrides

    with pytest.raises(ConfigError, match=match):
        _check_overrides(parse_sets_checked(sets))
    assert check_values(Layer("job", "--set", parse_sets_checked(["training.epochs=2"]))) == []


# --- the plan reports, never crashes --------------------------------------------------------------

def test_plan_reports_every_config_problem(hrealm):
    from cli.plan import build_plan

    (hrealm.base / "config.json").write_text("[1]")
    (hrealm.state_dir("normal") / "a.jsonl").write_text('{"text": "x"}\n')
    (hrealm.state_dir("normal") / "b.jsonl").write_text('{"text": "y"}\n')
    (hrealm.state_dir("normal") / "b.jsonl.job.json").write_text(
        json.dumps({"campaign_id": "c" * 300}))
    args = argparse.Namespace(set=["training.learning_rate=nan"], devices=None,
                              **{k: None for k in ("batch_size", "grad_accum", "learning_rate",
                                                   "max_steps", "epochs", "max_length", "seed")})
    plan = build_plan(hrealm, cli_args=args)
    assert any("must be a JSON object" in p["problem"] for p in plan["problems"])
    texts = ["\n".join(r["problems"]) for r in plan["jobs"]]
    assert texts and all("config.json must be a JSON object" in t or "at most 64" in t
                         or "is 300 characters" in t for t in texts), texts
    (hrealm.base / "config.json").unlink()
    plan = build_plan(hrealm, cli_args=args)
    assert any("training.learning_rate is nan" in "\n".join(r["problems"]) for r in plan["jobs"])



# --- one broken campaign.json does not hide the others --------------------------------------------

def test_broken_campaign_is_listed_and_does_not_block_lookups(hrealm, capsys):
    from cli.guild_cmds import cmd_campaign_list
    from guild.campaigns import survey_campaigns

    _campaign(hrealm, "good")
    broken = _campaign(hrealm, "broken")
    broken.write_text("null")
    assert find_campaign(hrealm, "good").ref == "tiny-qwen3/good"
    good, bad = survey_campaigns(hrealm)
    assert [c.name for c in good] == ["good"]
    assert [p for p, _ in bad] == [broken] and "got null" in bad[0][1]
    with pytest.raises(ConfigError, match="campaign.json must be a JSON object"):
        find_campaign(hrealm, "broken")
    args = argparse.Namespace(base_dir=str(hrealm.base), json=False)
    assert cmd_campaign_list(args) == 0
    out = capsys.readouterr().out
    assert "tiny-qwen3/good" in out and f"problem: {broken}: campaign.json must be" in out
    (hrealm.campaigns / "active.json").write_text('{"hero_id": "x", "campaign": "' + "c" * 300
                                                  + '"}')
    assert cmd_campaign_list(argparse.Namespace(base_dir=str(hrealm.base), json=True)) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["active"] is None and len(listing["problems"]) == 2
    assert "at most 64" in listing["problems"][1]["problem"]
