"""The resolver on in-memory layers: precedence, provenance, types, locked fields, rules."""

from __future__ import annotations


import pytest

from core.errors import ConfigError
from guild.heroes import load_hero_file, shipped_dir
from config.flags import cli_layer
from config.resolver import Layer, coerce, resolve, SPECS
from config.locked import build_locked_config, verify_locked

HERO = load_hero_file(shipped_dir() / "tiny-qwen3.yaml")


def test_schema_defaults_then_hero_then_later_layers_win():
    r = resolve([Layer("campaign", "c.json", {"training": {"learning_rate": 5e-4}}),
                 Layer("cli", "--set", {"training.learning_rate": "1e-4"})], HERO)
    assert r.get("training.learning_rate") == 1e-4
    assert r.provenance["training.learning_rate"] == ("cli", "--set")
    assert r.get("training.micro_batch_size") == 8
    assert r.provenance["training.micro_batch_size"][0] == "schema"  # no hero layer given
    assert r.get("data.max_length") == 512


def test_layers_apply_in_precedence_order_whatever_the_list_order():
    r = resolve([Layer("job", "j", {"training.epochs": 3}),
                 Layer("realm", "config.json", {"training.epochs": 2})], HERO)
    assert (r.get("training.epochs"), r.provenance["training.epochs"][0]) == (3, "job")


def test_flags_not_given_override_nothing():
    none_given = cli_layer({"learning_rate": None, "batch_size": None}, {}, [])
    assert none_given.values == {}
    hero = Layer("hero", "h.yaml", {"training": {"learning_rate": 1e-3}})
    r = resolve([hero, none_given], HERO)
    assert r.provenance["training.learning_rate"] == ("hero", "h.yaml")


def test_set_wins_over_flag_and_sources_are_per_key():
    layer = cli_layer({"learning_rate": "3e-4", "seed": "7"}, {"training": {"learning_rate": 1e-5}},
                      ["training.learning_rate=1e-5"])
    r = resolve([layer], HERO)
    assert r.get("training.learning_rate") == 1e-5 and r.get("training.seed") == 7
    assert r.provenance["training.seed"] == ("cli", "--seed")
    assert r.provenance["training.learning_rate"] == ("cli", "--set")


@pytest.mark.parametrize("key,raw,expected", [
    ("training.learning_rate", "1e-4", 1e-4),
    ("training.learning_rate", 1, 1.0),
    ("training.micro_batch_size", "16", 16),
    ("data.packing", "false", False),
    ("training.max_steps", "null", None),
    ("training.schedule", "constant", "constant"),
])
def test_coercion_accepts(key, raw, expected):
    assert coerce(SPECS[key], raw) == (True, expected)


@pytest.mark.parametrize("key,raw", [
    ("training.micro_batch_size", "abc"), ("training.micro_batch_size", 2.5),
    ("training.micro_batch_size", True), ("data.packing", "yes"),
    ("training.schedule", "linear"), ("training.seed", None), ("training.learning_rate", "fast"),
])
def test_coercion_refuses(key, raw):
    assert coerce(SPECS[key], raw)[0] is False


def test_every_problem_is_reported_at_once_with_key_and_source():
    with pytest.raises(ConfigError) as info:
        resolve([Layer("realm", "config.json", {"training": {"micro_batch_size": "abc",
                                                              "learnig_rate": 1}}),
                 Layer("cli", "--set", {"data.on_bad_line": "ignore", "checkpoint.keep_last": 0})],
                HERO)
    problems = info.value.problems
    assert len(problems) == 4
    text = "\n".join(problems)
    assert "training.micro_batch_size: expected an integer, got 'abc' (from the realm layer, " \
           "config.json)" in text
    assert "unknown key 'training.learnig_rate' (did you mean 'training.learning_rate'?)" in text
    assert "data.on_bad_line: expected one of fail, skip, got 'ignore'" in text
    assert "checkpoint.keep_last: must be at least 1, got 0 (set by the cli layer (--set))" in text


def test_unknown_section_lists_the_sections():
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.lr' \(sections: training, data"):
        resolve([Layer("cli", "--set", {"optimizer": {"lr": 1}})], HERO)


@pytest.mark.parametrize("values", [
    {"locked": {"vocab_size": 10}}, {"locked.model_architecture": "LlamaForCausalLM"},
    {"model_architecture": "LlamaForCausalLM"}, {"training": {"vocab_size": 10}},
])
def test_no_layer_may_set_a_locked_field(values):
    with pytest.raises(ConfigError, match=r"set by the campaign layer \(campaigns/x/y/campaign.json\)"
                                          r", but the locked architecture comes only from the hero"):
        resolve([Layer("campaign", "campaigns/x/y/campaign.json", values)], HERO)


def test_max_length_above_context_names_both_numbers():
    with pytest.raises(ConfigError) as info:
        resolve([Layer("job", "a.jsonl.job.json", {"data": {"max_length": 4096}})], HERO)
    msg = str(info.value)
    assert "data.max_length: 4096 is above the hero's context length 1024" in msg
    assert "set by the job layer (a.jsonl.job.json)" in msg


def test_cross_field_governor_window():
    with pytest.raises(ConfigError, match="governor.min_history: 30 is larger than governor.window 20"):
        resolve([Layer("cli", "--set", {"governor.min_history": 30})], HERO)


def test_locked_block_comes_from_the_hero_only():
    r = resolve([], HERO, campaign="tiny-qwen3/c1")
    assert r.locked == {"base_model": "random-init:tiny-qwen3",
                        "model_architecture": "Qwen3ForCausalLM", "max_context_length": 1024,
                        "vocab_size": 512, "model_version": "tiny-qwen3/c1",
                        "adapter": {"method": "none"}}
    assert r.locked == build_locked_config(HERO, None, 256, "tiny-qwen3/c1")


def test_locked_without_hero_uses_model_path_and_length():
    locked = build_locked_config(None, "/models/x", 2048)
    assert locked["base_model"] == "/models/x" and locked["max_context_length"] == 2048
    with pytest.raises(ValueError):
        build_locked_config(None, None, 2048)


def test_verify_locked_diff():
    a = build_locked_config(HERO, None, 256, "tiny-qwen3/c1")
    assert verify_locked(a, dict(a)) is None
    diff = verify_locked(a | {"vocab_size": 1024}, a)
    assert "vocab_size: checkpoint has 1024, campaign has 512" in diff


def test_the_locked_adapter_shape_is_the_modules_not_how_they_are_written():
    def locked(**adapter):
        return resolve([Layer("campaign", "c.json", {"adapter": {"method": "lora", **adapter}})],
                       HERO).locked

    first = locked(target_modules="q_proj,v_proj", modules_to_save="norm")
    assert verify_locked(first, locked(target_modules=" v_proj, q_proj",
                                       modules_to_save=" norm ")) is None
    diff = verify_locked(first, locked(target_modules="q_proj, k_proj", modules_to_save="norm"))
    assert "adapter.target_modules: checkpoint has 'q_proj,v_proj', campaign has " \
           "'k_proj,q_proj'" in diff


def test_hash_follows_values_not_provenance():
    base = resolve([], HERO)
    same_value_other_layer = resolve([Layer("cli", "--set", {"training.seed": 42})], HERO)
    changed = resolve([Layer("cli", "--set", {"training.seed": 43})], HERO)
    assert base.config_hash == same_value_other_layer.config_hash
    assert base.config_hash != changed.config_hash
    assert base.config_hash.startswith("sha256:") and len(base.config_hash) == 71


def test_every_schema_field_has_a_docstring():
    assert all(spec.doc for spec in SPECS.values()), [k for k, s in SPECS.items() if not s.doc]


def test_training_changes_judge_a_record_key_by_key_and_refuse_a_damaged_one():
    """A record's JSON values compare with live ones (1 and 1.0, null and None alike);
    operational sections and keys the record lacks at their defaults are no change; a record
    that is not a mapping of sections is an error (the caller falls back to the hash), never
    "every key at its default"."""
    import json

    from config.resolver import training_changes

    live = resolve([Layer("job", "j", {"training": {"max_grad_norm": 1}})], HERO)
    record = json.loads(json.dumps(live.record()))["config"]
    del record["training"]["parallelism"]  # a key the schema gained since
    record["daemon"]["nodes"] = 4
    assert training_changes(record, live.config) == []
    record["data"]["max_length"] = 96
    assert training_changes(record, live.config) == ["data.max_length: 96 -> 512"]
    for damaged in (None, [], {"training": "x"}, {"data": None}):
        with pytest.raises(TypeError):
            training_changes(damaged, live.config)
