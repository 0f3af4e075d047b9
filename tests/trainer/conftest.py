"""Fixtures for trainer tests: the tiny hero, its tokenizer and model, data config objects."""

from __future__ import annotations

import pytest

from guild.heroes import load_hero_file, shipped_dir
from config.schema import DataConfig


@pytest.fixture(scope="session")
def hero():
    return load_hero_file(shipped_dir() / "tiny-qwen3.yaml")


@pytest.fixture(scope="session")
def tokenizer():
    from trainer.model import build_byte_tokenizer

    return build_byte_tokenizer()


@pytest.fixture
def tiny_model(hero):
    from trainer.model import load_model

    model, _ = load_model(hero, {"model_architecture": "Qwen3ForCausalLM", "vocab_size": 512},
                          seed=0)
    return model.eval()


def data_cfg(**kw) -> DataConfig:
    return DataConfig(**kw)
