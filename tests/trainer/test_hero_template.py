"""chat.template in a hero profile: the tokenizer's own, realm's builtin, or a .jinja file that
replaces the tokenizer's template (and reaches the masks and the saved checkpoints)."""

from __future__ import annotations

import pytest

from core.errors import ConfigError, InputError
from guild.heroes import load_hero_file, shipped_dir
from trainer.data.reader import Example
from trainer.data.tokenize import tokenize
from trainer.model import load_model

LOCKED = {"model_architecture": "Qwen3ForCausalLM", "vocab_size": 512}
# Phi-3-style turns on the byte tokenizer's specials: a template the tokenizer did not ship
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}: {{ m.content }}<|im_end|>"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")


def hero_with(tmp_path, template: str):
    text = (shipped_dir() / "tiny-qwen3.yaml").read_text().replace(
        "template: builtin", f"template: {template}")
    path = tmp_path / "heroes" / "tiny-qwen3.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_jinja_file_replaces_the_tokenizer_template(tmp_path):
    (tmp_path / "heroes" / "templates").mkdir(parents=True)
    (tmp_path / "heroes" / "templates" / "turns.jinja").write_text(TEMPLATE)
    hero = load_hero_file(hero_with(tmp_path, "templates/turns.jinja"))
    model, tokenizer = load_model(hero, LOCKED)
    assert tokenizer.chat_template == TEMPLATE
    tok = tokenize(tokenizer, Example(1, "messages", {"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}),
        max_length=128)
    assert tokenizer.decode(tok.ids[tok.trained].tolist()) == "4<|im_end|>"
    assert tokenizer.decode(tok.ids.tolist()) == \
        "<|im_start|>user: 2+2?<|im_end|><|im_start|>assistant: 4<|im_end|>"
    assert 258 in model.generation_config.eos_token_id  # <|im_end|> ends a turn


def test_builtin_and_tokenizer_choices(tmp_path):
    builtin = load_hero_file(shipped_dir() / "tiny-qwen3.yaml")
    _, tokenizer = load_model(builtin, LOCKED)
    assert "{% generation %}" in tokenizer.chat_template


@pytest.mark.parametrize("value,message", [
    ("missing.jinja", "does not exist"),
    ("chatml", "use tokenizer"),
])
def test_bad_template_values_name_the_key(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_hero_file(hero_with(tmp_path, value))
    assert "chat.template" in str(err.value) and "tiny-qwen3.yaml:" in str(err.value)


def test_a_template_that_does_not_compile_is_an_input_error(tmp_path):
    (tmp_path / "heroes").mkdir()
    (tmp_path / "heroes" / "bad.jinja").write_text("{% for m in messages %}{{ m.content }")
    hero = load_hero_file(hero_with(tmp_path, "bad.jinja"))
    with pytest.raises(InputError, match="does not compile"):
        load_model(hero, LOCKED)
