"""Real chat templates on small real tokenizers, and conversations to render with them.

The templates in ``tests/templates/`` are the public ``chat_template`` strings of real models,
stored verbatim (origins in ``tests/templates/README.md``). ``make_tokenizer(family)`` puts one
on a byte-level BPE tokenizer trained here on a small English corpus, with that family's special
tokens, BOS/EOS/pad, and the BOS-adding post-processor when the real tokenizer has one. So a test
sees what a real model's tokenizer does: multi-character tokens (``" Paris"``), special tokens
that never split, a template that may emit ``bos_token`` itself while the tokenizer adds one too.

``CONVERSATIONS`` names message lists; ``supports(family, name)`` renders one with the real
template and says whether the template takes it (no exception) and keeps what it says (every
message's text, the tool call and its result, the last reasoning block). Templates that raise
(Gemma and Mistral v1 on roles they do not know) and templates that silently drop a message
(Phi-3 on a tool turn, all but Qwen3 on ``reasoning_content``) both answer ``False``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

TEMPLATES_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class FamilySpec:
    """What a model family's tokenizer and template look like (see tests/templates/README.md)."""

    model: str
    template_file: str
    bos_token: str | None
    eos_token: str
    pad_token: str
    end_of_turn: str
    """The token that closes an assistant turn in the rendered chat."""
    special_tokens: tuple[str, ...]
    """Added as special tokens (never split, dropped by ``skip_special_tokens``); includes
    bos/eos/pad/end-of-turn and the role markers the template emits."""
    added_tokens: tuple[str, ...] = ()
    """Added as *non-special* tokens, as in the real tokenizer (Qwen's ``<think>``,
    ``<tool_call>``...): never split, but kept by ``skip_special_tokens``."""
    adds_bos: bool = False
    """The real tokenizer's post-processor prepends BOS when ``add_special_tokens=True``."""
    template_emits_bos: bool = False
    """The template renders ``bos_token`` itself: tokenizing the rendered text with
    ``add_special_tokens=True`` gives two BOS when ``adds_bos`` is also set."""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables to pass to ``apply_chat_template`` (none is required)."""
    notes: str = ""

    @property
    def template(self) -> str:
        return _read_template(self.template_file)


@lru_cache(maxsize=None)
def _read_template(name: str) -> str:
    return (TEMPLATES_DIR / name).read_text(encoding="utf-8")


_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

FAMILIES: dict[str, FamilySpec] = {
    "qwen2.5": FamilySpec(
        model="Qwen/Qwen2.5-7B-Instruct",
        template_file="qwen2.5.jinja",
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        end_of_turn="<|im_end|>",
        special_tokens=_QWEN_SPECIAL,
        added_tokens=("<tool_call>", "</tool_call>"),
        notes="Inserts a default system prompt when the conversation has none.",
    ),
    "qwen3": FamilySpec(
        model="Qwen/Qwen3-0.6B",
        template_file="qwen3.jinja",
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        end_of_turn="<|im_end|>",
        special_tokens=_QWEN_SPECIAL,
        added_tokens=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                      "<think>", "</think>"),
        notes="Keeps <think> only for assistant turns after the last user query (earlier "
              "reasoning is dropped), and always wraps the final assistant turn in a <think> "
              "block: not prefix-stable. enable_thinking=False adds an empty <think> block to "
              "the generation prompt.",
    ),
    "llama3": FamilySpec(
        model="meta-llama/Llama-3.3-70B-Instruct (same template as Meta-Llama-3.1-8B-Instruct)",
        template_file="llama3.jinja",
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        end_of_turn="<|eot_id|>",
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                        "<|python_tag|>"),
        adds_bos=True,
        template_emits_bos=True,
        template_kwargs={"date_string": "26 Jul 2024"},
        notes="Always renders a system header with 'Cutting Knowledge Date'/'Today Date' "
              "(date_string, template default 26 Jul 2024). With tools, the first user message "
              "is moved into the tools block. Trims message content. A string tool result is "
              "passed through tojson (strings are iterable), so it is rendered JSON-quoted. "
              "The real config sets no pad token; this fixture uses <|finetune_right_pad_id|>.",
    ),
    "mistral": FamilySpec(
        model="mistralai/Mixtral-8x7B-Instruct-v0.1 (Mistral 'v1' template, as on "
              "Mistral-7B-Instruct-v0.1/v0.2)",
        template_file="mistral.jinja",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        end_of_turn="</s>",
        special_tokens=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        adds_bos=True,
        template_emits_bos=True,
        notes="Raises on any role but one leading system, then alternating user/assistant; "
              "puts the system message in the first user turn; has no generation prompt "
              "(the prompt already ends with ' [/INST]'). The real v1 tokenizer has no [INST] "
              "token (it is text); the fixture adds [INST]/[/INST] as special tokens. The real "
              "config sets no pad token; this fixture uses <unk>.",
    ),
    "gemma": FamilySpec(
        model="google/gemma-2-2b-it",
        template_file="gemma.jinja",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        end_of_turn="<end_of_turn>",
        special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        adds_bos=True,
        template_emits_bos=True,
        notes="Raises on a system message and on non-alternating roles (so on tool turns); "
              "renders the assistant role as 'model'; trims message content. The real "
              "generation config stops on <end_of_turn> as well as <eos>.",
    ),
    "phi3": FamilySpec(
        model="microsoft/Phi-3-mini-4k-instruct",
        template_file="phi3.jinja",
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        end_of_turn="<|end|>",
        special_tokens=("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>",
                        "<|assistant|>", "<|end|>"),
        adds_bos=False,
        notes="Appends eos_token after the last turn when add_generation_prompt is False, so a "
              "rendered prefix is not a prefix of the rendered whole. Silently drops roles it "
              "does not know (tool) and empty system messages. pad == eos, as in the real "
              "config.",
    ),
}


_CORPUS = """\
The capital of France is Paris. Paris is a large city on the river Seine in France.
Many people visit Paris in the spring, when the parks are green and the weather is mild.
The Louvre is a famous museum in Paris, and the Eiffel Tower stands near the river.
What is the capital of France? The capital of France is Paris, and it is a beautiful city.
What is the weather like in Paris today? It is sunny in Paris today, with a light wind.
The temperature is eighteen degrees, and the sky is clear over the city.
You are a helpful assistant. You answer questions clearly and you keep your answers short.
You are a concise travel assistant who helps people plan a trip to a new city.
Can you help me plan a trip? Of course, I can help you plan a trip to Paris or to London.
Where would you like to go? I would like to visit Paris, then Rome, then Madrid.
Start with the museum, then walk along the river to the tower in the evening.
Is seventeen a prime number? Yes, seventeen is a prime number because it has no divisors.
A prime number is only divisible by one and by itself. Twenty one is not a prime number.
Twenty one equals three times seven, so it is not prime. Let me think about the question.
The user asks about the weather, so I should call the weather tool and read the result.
The function returns a result, and the assistant reads the result and answers the user.
Please translate good morning into Japanese and French. Good morning is Bonjour in French.
The model writes an answer, the user reads the answer, and the conversation goes on.
This is a small test corpus for a small tokenizer, written in plain English sentences.
The tokenizer learns common words like the, and, is, in, of, to, what, where, when, city.
Paris, France, Rome, Italy, Madrid, Spain, London, England, Tokyo, Japan, Berlin, Germany.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten, 17, 18, 21, 2024.
"""


def _train_bpe(vocab_size: int = 800):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = _CORPUS.splitlines()
    tok.train_from_iterator(lines * 3, trainer=trainer)
    return tok


@lru_cache(maxsize=None)
def _trained_bpe_json() -> str:
    return _train_bpe().to_str()


@lru_cache(maxsize=None)
def make_tokenizer(family: str):
    """A ``PreTrainedTokenizerFast`` for ``family``: trained byte-level BPE, the family's special
    tokens, bos/eos/pad, BOS post-processor when the real tokenizer has one, the real template.

    Cached per family and shared: do not mutate it in a test (copy it first)."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tok = Tokenizer.from_str(_trained_bpe_json())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in spec.special_tokens])
    if spec.added_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t in spec.added_tokens])
    if spec.adds_bos:
        bos = spec.bos_token
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs = {"eos_token": spec.eos_token, "pad_token": spec.pad_token}
    if spec.bos_token is not None:
        kwargs["bos_token"] = spec.bos_token
    if "<unk>" in spec.special_tokens:
        kwargs["unk_token"] = "<unk>"
    named = set(kwargs.values())
    kwargs["extra_special_tokens"] = [t for t in spec.special_tokens if t not in named]
    out = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    out.chat_template = spec.template
    return out


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TOOLS = [WEATHER_TOOL]

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "single_turn": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Can you help me plan a trip?"},
        {"role": "assistant", "content": "Of course. Where would you like to go?"},
        {"role": "user", "content": "I would like to visit Paris in the spring."},
        {"role": "assistant",
         "content": "Spring is a good time to visit Paris: the parks are green."},
        {"role": "user", "content": "What should I see first?"},
        {"role": "assistant",
         "content": "Start with the Louvre, then walk along the river to the Eiffel Tower."},
    ],
    "system": [
        {"role": "system", "content": "You are a concise travel assistant."},
        {"role": "user", "content": "Name one museum in Paris."},
        {"role": "assistant", "content": "The Louvre."},
        {"role": "user", "content": "And one in Madrid?"},
        {"role": "assistant", "content": "The Prado."},
    ],
    "tool_call": [
        {"role": "user", "content": "What is the weather like in Paris today?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call0001a", "type": "function",
             "function": {"name": "get_weather",
                          "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "tool_call_id": "call0001a", "name": "get_weather",
         "content": '{"temperature": 18, "condition": "sunny"}'},
        {"role": "assistant", "content": "It is sunny in Paris today, at 18 degrees."},
    ],
    "reasoning": [
        {"role": "user", "content": "Is 17 a prime number?"},
        {"role": "assistant", "reasoning_content": "17 is only divisible by 1 and by 17.",
         "content": "Yes, 17 is a prime number."},
        {"role": "user", "content": "And 21?"},
        {"role": "assistant", "reasoning_content": "21 equals 3 times 7, so it has divisors.",
         "content": "No, 21 is not prime: it equals 3 times 7."},
    ],
    "whitespace_unicode": [
        {"role": "user",
         "content": "Translate 'good morning' into Japanese and French, please."},
        {"role": "assistant", "content": "  おはようございます — Bonjour! Café crème, naïve, ✓ 🚀  "},
        {"role": "user", "content": "Merci! Et «bonne nuit»?"},
        {"role": "assistant", "content": "\tBonne nuit = おやすみなさい 🌙\n"},
    ],
}

CONVERSATION_KWARGS: dict[str, dict[str, Any]] = {"tool_call": {"tools": TOOLS}}
"""Extra ``apply_chat_template`` arguments a conversation needs (the tool schemas)."""


def render_kwargs(family: str, name: str) -> dict[str, Any]:
    """Keyword arguments for ``apply_chat_template`` for this family and conversation."""
    return {**FAMILIES[family].template_kwargs, **CONVERSATION_KWARGS.get(name, {})}


def render(family: str, name_or_messages: str | list[dict], *, add_generation_prompt=False,
           **kwargs) -> str:
    """The chat rendered as text by the family's real template (raises as the template does)."""
    if isinstance(name_or_messages, str):
        messages = CONVERSATIONS[name_or_messages]
        kwargs = {**render_kwargs(family, name_or_messages), **kwargs}
    else:
        messages = name_or_messages
        kwargs = {**FAMILIES[family].template_kwargs, **kwargs}
    return make_tokenizer(family).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def _kept_everything(rendered: str, messages: list[dict]) -> bool:
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) and content.strip():
            if content.strip() not in rendered and json.dumps(content) not in rendered:
                return False
        for call in message.get("tool_calls") or []:
            if call["function"]["name"] not in rendered:
                return False
    reasoning = [m["reasoning_content"] for m in messages if m.get("reasoning_content")]
    return not reasoning or reasoning[-1] in rendered


@lru_cache(maxsize=None)
def supports(family: str, name: str) -> bool:
    """Whether the family's real template renders conversation ``name`` without raising and
    without dropping any of it (see the module docstring)."""
    import jinja2

    try:
        rendered = render(family, name)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError):
        return False
    return _kept_everything(rendered, CONVERSATIONS[name])


def supported(family: str) -> list[str]:
    return [name for name in CONVERSATIONS if supports(family, name)]
