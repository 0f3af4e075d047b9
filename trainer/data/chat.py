"""Where the trained turns of a conversation lie in its rendered chat template.

Any template, without assuming that rendering is prefix-stable (Qwen3 drops the ``<think>``
blocks of earlier turns, so a conversation's first turns render differently once it grows). The
conversation is rendered once; ``ChatLayout`` then finds the character spans that carry loss:

- The layout of a template is probed once per tokenizer: the **generation prompt** ``G`` (what
  ``add_generation_prompt`` appends, e.g. ``<|im_start|>assistant\\n``) and the **end of turn**
  (the first special token the template writes after an assistant's content: ``<|im_end|>``,
  ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ``</s>``).
- **Header search** (when ``G`` holds a special token): the k-th ``G`` in the rendering opens the
  k-th assistant turn, because message contents may not hold special tokens (a line whose content
  does is a bad line: it would be read as control tokens). A trained turn runs from the end of
  its ``G`` through its end-of-turn token: everything the model generates at inference, reasoning
  blocks and tool calls included.
- **Placeholders** (templates without a usable ``G``, such as Mistral's, or a role list with
  roles other than assistant): each trained message's content is replaced by a unique private-use
  placeholder, the conversation is rendered, and the literal template text between placeholders is
  matched against the real rendering; a trained message then runs from its content (for an
  assistant message: from the end of the ``G`` before it, when there is one) through the end of
  turn. A template that renders the two differently beyond the contents (content-dependent
  branches) cannot be matched: that line is a bad line, never a crash.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache

from trainer.data.reader import BadLine

_GENERATION_TAG = re.compile(r"\{%\s*(?:end)?generation\s*%\}")
_PH = "\U000f0100{}\U000f0101"
"""Placeholder for message i: private-use characters no real text holds."""

Span = tuple[int, int]


@dataclass
class Rendered:
    text: str
    spans: list[Span]
    """Character spans carrying loss, in order, not overlapping."""
    append_eos: bool = False
    """The last trained turn has no end-of-turn token in the rendering: train an EOS after it."""


def _conversation_kwargs(tokenizer) -> dict:
    return {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}


@lru_cache(maxsize=8)
def _compiled(template: str):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


class ChatLayout:
    """The rendering rules of one tokenizer's chat template."""

    def __init__(self, tokenizer):
        self.template: str | None = tokenizer.chat_template
        self.source_template = self.template
        self.kwargs = _conversation_kwargs(tokenizer)
        self.specials = sorted({t for t in tokenizer.all_special_tokens} |
                               {str(t) for t in tokenizer.added_tokens_encoder}, key=len,
                               reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, self.specials))) \
            if self.specials else None
        self.generation_prompt = ""
        self.end_of_turn: str | None = None
        if self.template:
            self._drop_generation_tags()
            self._probe()
        self.header_search = bool(self.generation_prompt) and self.end_of_turn is not None and \
            self._special_re is not None and bool(self._special_re.search(self.generation_prompt))

    def _drop_generation_tags(self) -> None:
        """``{% generation %}`` marks only matter to transformers' assistant-mask tracker, and
        cost a macro call per turn: rendered without them when the output is the same."""
        plain = _GENERATION_TAG.sub("", self.template)
        if plain == self.template:
            return
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                 {"role": "assistant", "content": " a\n"}, {"role": "user", "content": "v"},
                 {"role": "assistant", "content": "b"}]
        try:
            same = all(_compiled(plain).render(messages=probe, add_generation_prompt=g,
                                               tools=None, documents=None, **self.kwargs) ==
                       self.render(probe, add_generation_prompt=g) for g in (False, True))
        except Exception:  # noqa: BLE001 - keep the template as written
            same = False
        if same:
            self.template = plain

    def _probe(self) -> None:
        user = [{"role": "user", "content": "Hi"}]
        try:
            bare = self.render(user)
            with_prompt = self.render(user, add_generation_prompt=True)
            # the common prefix, not ``bare``: a template may close a conversation that does not
            # end in a generation prompt (Phi-3 appends <|endoftext|>)
            cut = len(os.path.commonprefix([bare, with_prompt]))
            for token in self._special_re.finditer(with_prompt) if self._special_re else ():
                if token.start() < cut < token.end():  # never start inside a special token
                    cut = token.start()
            self.generation_prompt = with_prompt[cut:]
            reply = self.render(user + [{"role": "assistant", "content": _PH.format(0)}])
        except BadLine:
            return
        after = reply.split(_PH.format(0), 1)[-1]
        found = self._special_re.search(after) if self._special_re else None
        if found:
            self.end_of_turn = found.group(0)

    def render(self, messages: list[dict], *, tools: list | None = None,
               add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages`` (BadLine when the template refuses them)."""
        if not self.template:
            raise BadLine("the tokenizer has no chat template, so 'messages' lines cannot be "
                          "rendered; set chat.template in the hero profile (a .jinja file) or use "
                          "text or prompt/completion lines")
        try:
            return _compiled(self.template).render(
                messages=_alias_reasoning(messages), tools=tools, documents=None,
                add_generation_prompt=add_generation_prompt, **self.kwargs)
        except Exception as exc:  # noqa: BLE001 - a template's refusal is the line's problem
            msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            raise BadLine(f"the chat template refuses this conversation: {msg}") from None

    def check_contents(self, messages: list[dict]) -> None:
        """BadLine when a content holds a special token (it would become a control token)."""
        if self._special_re is None:
            return
        for i, message in enumerate(messages):
            for key in ("content", "reasoning_content"):
                value = message.get(key)
                found = self._special_re.search(value) if isinstance(value, str) else None
                if found:
                    raise BadLine(f"messages[{i}].{key} contains the special token "
                                  f"{found.group(0)!r}, which the tokenizer would read as a "
                                  "control token; remove it from the data")

    def spans(self, messages: list[dict], trained: list[int], *, tools: list | None = None
              ) -> Rendered:
        """The rendering of ``messages`` and the spans of the messages at indices ``trained``."""
        self.check_contents(messages)
        text = self.render(messages, tools=tools)
        if not trained:
            return Rendered(text, [])
        if self.header_search and all(messages[i]["role"] == "assistant" for i in trained):
            return self._by_header(messages, trained, text)
        return self._by_placeholder(messages, trained, text, tools)

    def _by_header(self, messages: list[dict], trained: list[int], text: str) -> Rendered:
        g, eot = self.generation_prompt, self.end_of_turn
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        starts = [m.end() for m in re.finditer(re.escape(g), text)]
        if len(starts) != len(assistants):
            raise BadLine(f"the chat template wrote {len(starts)} assistant headers "
                          f"({g!r}) for {len(assistants)} assistant messages, so the assistant "
                          "turns cannot be located; set data.train_on_inputs: true to train on "
                          "every token")
        spans = []
        for k, i in enumerate(assistants):
            if i not in trained:
                continue
            stop = starts[k + 1] if k + 1 < len(starts) else len(text)
            end = text.find(eot, starts[k], stop)
            spans.append((starts[k], stop if end < 0 else end + len(eot)))
        return Rendered(text, spans, append_eos=text.find(eot, starts[-1]) < 0
                        and assistants[-1] in trained)

    def _by_placeholder(self, messages: list[dict], trained: list[int], text: str,
                        tools: list | None) -> Rendered:
        marked = [i for i in trained if isinstance(messages[i].get("content"), str)
                  and messages[i]["content"]]
        if len(marked) != len(trained):
            raise BadLine("a trained message has no text content, and this chat template has "
                          "no assistant header to locate it by; set data.train_on_inputs: true")
        probe = [dict(m) for m in messages]
        for i in marked:
            probe[i]["content"] = _PH.format(i)
        rendered = self.render(probe, tools=tools)
        literals, at = [], 0
        for i in marked:
            pos = rendered.find(_PH.format(i), at)
            if pos < 0 or rendered.count(_PH.format(i)) != 1:
                raise BadLine(f"the chat template does not render messages[{i}].content once "
                              "and in order, so it cannot be located; set "
                              "data.train_on_inputs: true")
            literals.append(rendered[at:pos])
            at = pos + len(_PH.format(i))
        literals.append(rendered[at:])
        pattern = "(.*?)".join(map(re.escape, literals))
        match = re.fullmatch(pattern, text, re.DOTALL)
        if match is not None and any(  # a template may trim a content, not rewrite it
                match.group(k + 1).strip() != messages[i]["content"].strip()
                for k, i in enumerate(marked)):
            match = None
        if match is None:
            raise BadLine("the chat template renders this conversation differently once the "
                          "trained contents are known (a content-dependent branch), so the "
                          "trained turns cannot be located; set data.train_on_inputs: true")
        spans, append_eos = [], False
        for k, i in enumerate(marked):
            start, end = match.span(k + 1)
            floor = match.end(k) if k else 0
            if messages[i]["role"] == "assistant" and self.generation_prompt:
                header = text.rfind(self.generation_prompt, floor, start)
                if header >= 0:
                    start = header + len(self.generation_prompt)
            limit = match.start(k + 2) if k + 1 < len(marked) else len(text)
            eot = text.find(self.end_of_turn, end, limit) if self.end_of_turn else -1
            if eot >= 0:
                end = eot + len(self.end_of_turn)
            elif end == len(text.rstrip()):
                append_eos = True
            spans.append((start, end))
        return Rendered(text, spans, append_eos)

    def end_of_turn_token(self) -> str | None:
        return self.end_of_turn


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    """Templates read reasoning as ``reasoning_content`` (Qwen3) or ``thinking`` (gpt-oss)."""
    out = []
    for m in messages:
        if "reasoning_content" not in m and "thinking" not in m and "reasoning" not in m:
            out.append(m)
            continue
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning")
                          if isinstance(m.get(k), str)), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m,
                                                "reasoning_content": reasoning})
    return out


def trained_indices(messages: list[dict], train_on: str) -> list[int]:
    """Indices of the messages ``data.train_on`` selects."""
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "all_assistant":
        return assistants
    if train_on == "last_assistant":
        return assistants[-1:]
    roles = {r.strip() for r in train_on.split(",")}
    return [i for i, m in enumerate(messages) if m["role"] in roles]
