"""Masks on the public chat templates of real models (tests/templates/, origins in its README).

For every family and every conversation its template takes, the decoded trained tokens must be
exactly the assistant replies as the template writes them (trimmed where Llama 3 and Gemma trim,
Qwen3's think blocks after the last user turn, tool calls in the family's format) each followed
by the family's end-of-turn token. The expected strings are written here by hand from the
templates' documented formats, not computed by the code under test.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tests.chat_fixtures import CONVERSATIONS, FAMILIES, make_tokenizer, render_kwargs, supports
from config.schema import DataConfig
from trainer.data.cache import hash_file, load_or_build
from trainer.data.reader import BadLine, Example
from trainer.data.tokenize import ByteTable, ExampleEncoder, Settings, stop_token_ids, tokenize

EOT = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>",
       "mistral": "</s>", "gemma": "<end_of_turn>", "phi3": "<|end|>"}
TRIMS = {"llama3", "gemma"}  # their templates write message content | trim
CASES = [(f, c) for f in FAMILIES for c in CONVERSATIONS if supports(f, c)]


def reply(family: str, messages: list[dict], i: int) -> str:
    """What the model writes for assistant message i, end of turn included."""
    m = messages[i]
    text = (m.get("content") or "").strip() if family in TRIMS else (m.get("content") or "")
    for call in m.get("tool_calls") or []:
        f = call["function"]
        if family.startswith("qwen"):
            text += "<tool_call>\n" + json.dumps({"name": f["name"],
                                                 "arguments": f["arguments"]}) + "\n</tool_call>"
        else:  # Llama 3.1+ JSON tool calls
            text += json.dumps({"name": f["name"], "parameters": f["arguments"]})
    if family == "qwen3":  # think blocks only after the last user query, on the last turn or
        last_query = max(j for j, x in enumerate(messages) if x["role"] == "user")  # reasoning
        reasoning = m.get("reasoning_content") or ""
        if i > last_query and (i == len(messages) - 1 or reasoning):
            text = f"<think>\n{reasoning.strip()}\n</think>\n\n" + text
    if family == "mistral":  # ' ' + content + eos after [/INST]: the model writes the space
        text = " " + text
    return text + EOT[family]


def trained_text(tokenizer, tok) -> str:
    return tokenizer.decode(np.asarray(tok.ids)[np.asarray(tok.trained, bool)].tolist())


def encode(family: str, name: str, **kw):
    data = {"messages": CONVERSATIONS[name], **render_kwargs(family, name)}
    return tokenize(make_tokenizer(family), Example(1, "messages", data), max_length=4096, **kw)


def test_every_family_takes_the_core_conversations():
    # guards the parametrization below against silently shrinking
    assert {f for f, c in CASES if c == "multi_turn"} == set(FAMILIES)
    assert ("qwen3", "reasoning") in CASES and ("qwen3", "tool_call") in CASES
    assert ("qwen2.5", "tool_call") in CASES and ("llama3", "tool_call") in CASES
    assert ("phi3", "system") in CASES


@pytest.mark.parametrize("family,name", CASES)
def test_trained_tokens_are_exactly_the_replies(family, name):
    messages = CONVERSATIONS[name]
    tok = encode(family, name)
    expected = "".join(reply(family, messages, i) for i, m in enumerate(messages)
                       if m["role"] == "assistant")
    assert trained_text(make_tokenizer(family), tok) == expected
    # the trained tokens sit inside the real rendering, tokenized as at inference
    rendered = make_tokenizer(family).apply_chat_template(
        messages, tokenize=False, **render_kwargs(family, name))
    assert make_tokenizer(family).decode(tok.ids.tolist()) == rendered


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_last_assistant_trains_only_the_final_reply(family):
    messages = CONVERSATIONS["multi_turn"]
    tok = encode(family, "multi_turn", train_on="last_assistant")
    assert trained_text(make_tokenizer(family), tok) == reply(family, messages, 5)


def test_qwen3_multi_turn_is_not_prefix_stable_and_still_masks():
    tokenizer = make_tokenizer("qwen3")
    messages = CONVERSATIONS["reasoning"]
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    first = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert not whole.startswith(first)  # the first reply's think block is gone from the whole
    assert "17 is only divisible" not in trained_text(tokenizer, encode("qwen3", "reasoning"))


def test_role_list_trains_those_roles_through_their_end_of_turn():
    tokenizer = make_tokenizer("qwen2.5")
    tok = encode("qwen2.5", "system", train_on="user")
    assert trained_text(tokenizer, tok) == ("Name one museum in Paris.<|im_end|>"
                                            "And one in Madrid?<|im_end|>")
    tok = encode("qwen2.5", "system", train_on="system,assistant")
    assert trained_text(tokenizer, tok) == ("You are a concise travel assistant.<|im_end|>"
                                            "The Louvre.<|im_end|>The Prado.<|im_end|>")


def test_completion_boundary_is_a_token_boundary():
    """The prompt ends in a space: the first word of the completion is still trained whole."""
    tokenizer = make_tokenizer("qwen2.5")
    prompt, completion = "The capital of France is ", "Paris."
    joined = tokenizer("The capital of France is Paris.", add_special_tokens=False).input_ids
    assert "ĠParis" in tokenizer.convert_ids_to_tokens(joined)  # the trap: one token across
    tok = tokenize(tokenizer, Example(1, "prompt_completion", {"prompt": prompt,
                                                               "completion": completion}),
                   max_length=512)
    assert trained_text(tokenizer, tok) == "Paris.<|im_end|>"
    assert tok.ids.tolist() == (tokenizer(prompt, add_special_tokens=False).input_ids +
                                tokenizer(completion, add_special_tokens=False).input_ids +
                                [tokenizer.eos_token_id])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bos_where_the_tokenizer_or_template_puts_it(family):
    spec, tokenizer = FAMILIES[family], make_tokenizer(family)
    bos = tokenizer.bos_token_id
    for kind, data in (("text", {"text": "The capital of France is Paris."}),
                       ("prompt_completion", {"prompt": "Q: ", "completion": "Paris."})):
        ids = tokenize(tokenizer, Example(1, kind, data), max_length=512).ids.tolist()
        assert (ids[0] == bos) == spec.adds_bos, (kind, ids[:3])
        assert ids.count(bos) == (1 if spec.adds_bos else 0) or bos is None
        assert ids[-1] == tokenizer.eos_token_id
    chat = encode(family, "single_turn").ids.tolist()
    if spec.template_emits_bos:
        assert chat[0] == bos and chat.count(bos) == 1  # never doubled


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stop_tokens_are_eos_and_end_of_turn(family):
    tokenizer = make_tokenizer(family)
    ids = stop_token_ids(tokenizer)
    assert tokenizer.eos_token_id in ids
    assert tokenizer.convert_tokens_to_ids(EOT[family]) in ids


def test_template_refusals_and_missing_templates_are_bad_lines():
    gemma = make_tokenizer("gemma")
    with pytest.raises(BadLine, match="chat template refuses"):
        tokenize(gemma, Example(1, "messages", {"messages": [
            {"role": "assistant", "content": "Hello first."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]}),
            max_length=512)
    bare = make_tokenizer("qwen2.5").__class__(
        tokenizer_object=make_tokenizer("qwen2.5").backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(BadLine, match="no chat template"):
        tokenize(bare, Example(1, "messages", {"messages": CONVERSATIONS["single_turn"]}),
                 max_length=512)
    with pytest.raises(BadLine, match="special token '<\\|im_end\\|>'"):
        tokenize(make_tokenizer("qwen2.5"), Example(1, "messages", {"messages": [
            {"role": "user", "content": "Hi<|im_end|>"}, {"role": "assistant", "content": "x"}]}),
            max_length=512)


def test_content_dependent_template_is_a_bad_line_not_a_crash(tokenizer):
    other = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer,
                                eos_token=tokenizer.eos_token)
    other.chat_template = ("{% for m in messages %}{% if m.content|length > 5 %}LONG:{% endif %}"
                           "{{ m.content }}<|im_end|>{% endfor %}")
    with pytest.raises(BadLine, match="differently once the trained contents are known"):
        tokenize(other, Example(1, "messages", {"messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a long one"}]}),
            max_length=512)
    tok = tokenize(other, Example(1, "messages", {"messages": [
        {"role": "user", "content": "a long question"}, {"role": "assistant", "content": "a"}]}),
        max_length=512)
    assert trained_text(other, tok) == "a<|im_end|>"


def test_bad_lines_under_skip_are_counted_never_a_crash(tmp_path):
    gemma = make_tokenizer("gemma")
    good = {"messages": CONVERSATIONS["multi_turn"]}
    bad = [{"messages": CONVERSATIONS["system"]},  # Gemma refuses a system role
           {"messages": [{"role": "assistant", "content": "first"}]},  # no user
           {"messages": [{"role": "user", "content": "no reply"}]}]  # nothing to learn
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in [good] * 7 + bad))
    cfg = DataConfig(on_bad_line="skip", max_bad_fraction=0.5, max_length=1024)
    store, _ = load_or_build(path, hash_file(path), gemma, cfg, tmp_path / "cache")
    assert store.meta["num_examples"] == 7 and store.meta["bad_lines"] == 3


def test_truncation_auto_drops_oldest_turns_and_keeps_system_and_last_reply(tokenizer):
    system = {"role": "system", "content": "You are terse."}
    turns = []
    for i in range(8):
        turns += [{"role": "user", "content": f"question {i} " + "x" * 40},
                  {"role": "assistant", "content": f"answer {i} " + "y" * 40}]
    ex = Example(1, "messages", {"messages": [system] + turns})
    tok = tokenize(tokenizer, ex, max_length=300)
    text = tokenizer.decode(tok.ids.tolist())
    assert tok.truncated and not tok.empty and len(tok.ids) <= 300
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert "answer 7 " + "y" * 40 + "<|im_end|>" in trained_text(tokenizer, tok)
    assert "question 0" not in text and tok.turns_dropped >= 5
    # the whole turns that remain are intact: every kept question has its answer
    kept = [i for i in range(8) if f"question {i} " in text]
    assert kept == list(range(8 - len(kept), 8)) and all(f"answer {i} " in text for i in kept)


def test_truncation_policies(tokenizer):
    ex = Example(1, "prompt_completion", {"prompt": "p" * 100, "completion": "c" * 20})
    end = tokenize(tokenizer, ex, max_length=40)  # auto: the end, so the completion survives
    assert trained_text(tokenizer, end) == "c" * 20 + "<|endoftext|>" and len(end.ids) == 40
    start = tokenize(tokenizer, ex, max_length=40, truncation="keep_start")
    assert start.empty  # only prompt left: dropped, counted
    dropped = tokenize(tokenizer, ex, max_length=40, truncation="drop")
    assert dropped.empty and dropped.truncated
    text = tokenize(tokenizer, Example(1, "text", {"text": "abcdefghij" * 10}), max_length=16)
    assert tokenizer.decode(text.ids.tolist()) == "abcdefghijabcdef"  # auto: the start


def test_keep_end_keeps_the_bos():
    tokenizer = make_tokenizer("llama3")
    ex = Example(1, "prompt_completion", {"prompt": "The capital of France " * 20,
                                          "completion": "Paris."})
    tok = tokenize(tokenizer, ex, max_length=24, truncation="keep_end")
    assert tok.ids[0] == tokenizer.bos_token_id and len(tok.ids) == 24
    assert trained_text(tokenizer, tok) == "Paris.<|eot_id|>"


def test_truncation_counts_reach_the_cache(tmp_path, tokenizer):
    long_chat = [{"role": "user", "content": "q " * 100}, {"role": "assistant", "content": "a"},
                 {"role": "user", "content": "last"}, {"role": "assistant", "content": "ok"}]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": long_chat}) + "\n" +
                    json.dumps({"text": "short"}) + "\n")
    store, _ = load_or_build(path, hash_file(path), tokenizer, DataConfig(max_length=64),
                             tmp_path / "c")
    assert store.meta["truncated_examples"] == 1 and store.meta["turns_dropped"] == 1
    assert store.meta["num_examples"] == 2 and store.meta["truncation"] == "auto"


def test_byte_table_equals_the_rust_tokenizer(tokenizer):
    table = ByteTable.of(tokenizer)
    assert table is not None
    rng = random.Random(7)
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_", "|>"]
    texts = ["".join(rng.choice([chr(rng.randint(0, 0x2FFF)), rng.choice(specials), " ", "\n"])
                     for _ in range(rng.randint(0, 80))) for _ in range(300)]
    texts = [t.encode("utf-8", "ignore").decode("utf-8") for t in texts]
    ours = table.encode(texts)
    for text, ids in zip(texts, ours):
        assert ids.tolist() == tokenizer.backend_tokenizer.encode(
            text, add_special_tokens=False).ids
    assert ByteTable.of(make_tokenizer("qwen2.5")) is None  # a BPE with merges never takes it


def test_a_tokenizer_whose_pieces_do_not_concatenate_uses_offsets():
    """SentencePiece-style tokenizers add a prefix space to every piece: the text is encoded
    whole and a token is trained when any of its characters is in the completion."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    core.decoder = decoders.Metaspace(prepend_scheme="always")
    core.train_from_iterator(["The capital of France is Paris."] * 20 + ["a b c d e"] * 5,
                             trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"],
                                                 show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>")
    encoder = ExampleEncoder(tok, Settings(512))
    assert not encoder.concatenates
    out = encoder.encode([Example(1, "prompt_completion", {"prompt": "The capital of France is",
                                                           "completion": " Paris."})])[0]
    assert trained_text(tok, out).strip() == "Paris.</s>"
    assert tok.decode(out.ids.tolist()) == "The capital of France is Paris.</s>"


# --- hostile and unusual conversations (each a bad line with a reason, or exact) -----------

def test_special_tokens_anywhere_the_template_renders_are_bad_lines():
    qwen3 = make_tokenizer("qwen3")
    user = {"role": "user", "content": "Hi"}
    for reply_ in ({"role": "assistant", "content": "A.", "reasoning": "a<|im_end|>b"},
                   {"role": "assistant", "content": "A.", "thinking": "x<|im_start|>"}):
        with pytest.raises(BadLine, match="special token"):
            tokenize(qwen3, Example(1, "messages", {"messages": [user, reply_]}), max_length=512)
    call = json.loads(json.dumps(CONVERSATIONS["tool_call"]))
    call[1]["tool_calls"][0]["function"]["arguments"]["city"] = "Paris<|im_end|>"
    with pytest.raises(BadLine, match=r"messages\[1\]\.tool_calls\[0\]\.function"):
        tokenize(make_tokenizer("qwen2.5"), Example(1, "messages", {"messages": call}),
                 max_length=512)
    tools = json.loads(json.dumps(render_kwargs("qwen2.5", "tool_call")["tools"]))
    tools[0]["function"]["description"] = "x<|im_end|>y"
    with pytest.raises(BadLine, match="special token"):
        tokenize(make_tokenizer("qwen2.5"), Example(1, "messages", {
            "messages": CONVERSATIONS["tool_call"], "tools": tools}), max_length=512)
    for kind, data in (("text", {"text": "doc<|endoftext|><|im_start|>assistant\nx"}),
                       ("prompt_completion", {"prompt": "q", "completion": "a<|im_end|>"})):
        with pytest.raises(BadLine, match="special token"):
            tokenize(qwen3, Example(1, kind, data), max_length=512)


def test_non_special_added_tokens_are_text_not_control_tokens():
    """Qwen's <think> and <tool_call> are added, not special: data in the canonical Qwen3
    reasoning format is accepted and trained as the template writes it."""
    tok = tokenize(make_tokenizer("qwen3"), Example(1, "messages", {"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\nFour."}]}), max_length=512)
    assert trained_text(make_tokenizer("qwen3"), tok) == "<think>\nadd\n</think>\n\nFour.<|im_end|>"


def test_a_trained_turn_never_runs_into_the_next_turn():
    """Mistral's user turn ends in [/INST], not in </s>: training users must not swallow the
    replies after them."""
    tokenizer = make_tokenizer("mistral")
    tok = encode("mistral", "multi_turn", train_on="user")
    assert trained_text(tokenizer, tok) == "".join(
        m["content"] for m in CONVERSATIONS["multi_turn"] if m["role"] == "user")


def test_role_list_with_tool_call_replies_and_empty_contents():
    tokenizer = make_tokenizer("qwen2.5")
    tok = encode("qwen2.5", "tool_call", train_on="assistant,tool")
    text = trained_text(tokenizer, tok)
    assert text.startswith("<tool_call>\n") and text.endswith("18 degrees.<|im_end|>")
    assert '{"temperature": 18, "condition": "sunny"}' in text


def test_templates_that_drop_a_turn_or_a_tool_call_are_bad_lines(tokenizer):
    with pytest.raises(BadLine, match="dropped"):  # Phi-3 renders no tool turns
        encode("phi3", "tool_call")
    # realm's own ChatML renders tool calls as Qwen does
    tok = tokenize(tokenizer, Example(1, "messages", {"messages": CONVERSATIONS["tool_call"]}),
                   max_length=1024)
    assert trained_text(tokenizer, tok).startswith(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
        '"celsius"}}\n</tool_call><|im_end|>')


def test_a_template_without_a_special_end_of_turn_is_a_bad_line():
    llama = make_tokenizer("llama3")
    other = llama.__class__(tokenizer_object=llama.backend_tokenizer, eos_token="<|eot_id|>")
    other.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(BadLine, match="where its turn ends"):
        tokenize(other, Example(1, "messages", {"messages": CONVERSATIONS["single_turn"]}),
                 max_length=512)


def test_named_templates_use_the_default_one(tmp_path):
    from transformers import AutoTokenizer

    source = make_tokenizer("qwen2.5")
    named = source.__class__(tokenizer_object=source.backend_tokenizer, eos_token="<|im_end|>")
    named.chat_template = {"default": source.chat_template, "tool_use": "{{ 'x' }}"}
    named.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded.chat_template, dict)
    tok = tokenize(loaded, Example(1, "messages", {"messages": CONVERSATIONS["single_turn"]}),
                   max_length=512)
    assert trained_text(loaded, tok) == "The capital of France is Paris.<|im_end|>"
    assert stop_token_ids(loaded) == [loaded.convert_tokens_to_ids("<|im_end|>")]


def test_dropping_turns_renders_a_logarithmic_number_of_times(tokenizer, monkeypatch):
    turns = [{"role": "system", "content": "Be brief."}]
    for i in range(512):
        turns += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    encoder = ExampleEncoder(tokenizer, Settings(128))
    calls = []
    original = encoder._plan
    monkeypatch.setattr(encoder, "_plan", lambda *a, **k: calls.append(1) or original(*a, **k))
    tok = encoder.encode([Example(1, "messages", {"messages": turns})])[0]
    assert len(calls) <= 2 + 2 * 10, len(calls)  # bisection over 512 cuts, not one per turn
    text = tokenizer.decode(tok.ids.tolist())
    assert len(tok.ids) <= 128 and text.startswith("<|im_start|>system\nBe brief.")
    assert "a511<|im_end|>" in trained_text(tokenizer, tok)
    # the largest suffix of whole turns that fits: one turn more would not
    kept = text.count("<|im_start|>user")
    more = ExampleEncoder(tokenizer, Settings(10_000)).encode([Example(1, "messages", {
        "messages": turns[:1] + turns[1:][-2 * (kept + 1):]})])[0]
    assert len(more.ids) > 128 and tok.turns_dropped == 512 - kept


def test_placeholder_matching_is_linear_on_content_dependent_templates(tokenizer):
    other = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer,
                                eos_token=tokenizer.eos_token)
    other.chat_template = ("{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"
                           "{% if messages[-1].content|length > 5 %}END{% endif %}")
    turns = []
    for i in range(40):
        turns += [{"role": "user", "content": f"question {i}"},
                  {"role": "assistant", "content": f"answer {i}"}]
    with pytest.raises(BadLine, match="content-dependent"):  # would backtrack for hours
        tokenize(other, Example(1, "messages", {"messages": turns}), max_length=4096,
                 train_on="user,assistant")


def test_null_content_with_tool_calls_and_a_byte_order_mark(tmp_path, tokenizer):
    call = json.loads(json.dumps(CONVERSATIONS["tool_call"]))
    call[1]["content"] = None
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps({"messages": call}) + "\n").encode())
    store, _ = load_or_build(path, hash_file(path), tokenizer, DataConfig(max_length=1024),
                             tmp_path / "c")
    assert store.meta["num_examples"] == 1 and store.meta["bad_lines"] == 0
