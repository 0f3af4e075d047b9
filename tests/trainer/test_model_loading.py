"""Loading heroes through the real paths: a local pretrained folder, a missing one, a mismatch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.errors import ConfigError, InputError
from trainer.model import load_model

LOCKED = {"model_architecture": "Qwen3ForCausalLM", "vocab_size": 512}


def pretrained_hero(hero, path):
    model = dataclasses.replace(hero.model, init="pretrained", path=str(path), config={})
    return dataclasses.replace(hero, model=model, tokenizer={"kind": "pretrained"})


def test_local_pretrained_folder_loads_through_from_pretrained(tmp_path, hero, tiny_model,
                                                               tokenizer):
    tiny_model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    model, tok = load_model(pretrained_hero(hero, tmp_path / "m"), LOCKED)
    ids = torch.tensor([tok("loaded from disk")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model(ids).logits)
    assert tok.decode(ids[0]) == "loaded from disk"


def test_missing_local_model_says_how_to_provide_it(tmp_path, hero):
    with pytest.raises(InputError, match="does not exist; download the model folder there"):
        load_model(pretrained_hero(hero, tmp_path / "nowhere"), LOCKED)


def test_hub_name_without_a_local_copy_is_a_clear_error(hero):
    model = dataclasses.replace(hero.model, init="pretrained", hf_name="Qwen/Qwen3-0.6B",
                                path=None)
    with pytest.raises(InputError, match="cannot reach a model hub: put the model folder on disk"):
        load_model(dataclasses.replace(hero, model=model), LOCKED)


def test_loaded_config_must_match_the_locked_block(tmp_path, hero, tiny_model, tokenizer):
    tiny_model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="vocab_size 512 != locked 1024"):
        load_model(pretrained_hero(hero, tmp_path / "m"),
                   {**LOCKED, "vocab_size": 1024})


def test_a_model_folder_that_needs_custom_code_is_refused_clearly(tmp_path, hero, tiny_model,
                                                                  tokenizer):
    import json

    folder = tmp_path / "m"
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(InputError, match=r"needs custom code \(config.json has auto_map.*never "
                                         r"runs code from a model folder"):
        load_model(pretrained_hero(hero, folder), LOCKED)


def test_pretrained_weights_load_in_the_param_dtype(tmp_path, hero, tiny_model, tokenizer):
    tiny_model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    model, _ = load_model(pretrained_hero(hero, tmp_path / "m"), LOCKED, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    first = next(iter(tiny_model.state_dict()))
    assert torch.equal(model.state_dict()[first], tiny_model.state_dict()[first].bfloat16())
