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

import json
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
        self.template: str | None = template_of(tokenizer)
        self.kwargs = _conversation_kwargs(tokenizer)
        # control tokens only: non-special added tokens (Qwen's <think>, <tool_call>) are text
        # that data may hold, and the template may parse
        self.specials = sorted({str(t) for t in tokenizer.all_special_tokens} |
                               {str(t) for t in tokenizer.added_tokens_decoder.values()
                                if getattr(t, "special", False)}, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, self.specials))) \
            if self.specials else None
        self._dumps_plain = all(json.dumps(t, ensure_ascii=False) == f'"{t}"'
                                for t in self.specials)
        """JSON writes every special token as is (so a search of the dumped line finds them)."""
        self.generation_prompt = ""
        self.end_of_turn: str | None = None
        if self.template:
            self._drop_generation_tags()
            self._probe()
        self.header_search = bool(self.generation_prompt) and self.end_of_turn is not None and \
            self._special_re is not None and bool(self._special_re.search(self.generation_prompt))
        self._header_re = re.compile(re.escape(self.generation_prompt))

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

    def check_contents(self, messages: list[dict], tools: list | None = None) -> None:
        """BadLine when any string the template may render (contents, reasoning, tool calls,
        names, tool schemas) holds a special token: it would become a control token."""
        if self._special_re is None or (self._dumps_plain and not self._any_special(messages)
                                        and not self._any_special(tools)):
            return  # the common case, checked fast: no special token text anywhere
        found = self.special_in(messages, "messages") or self.special_in(tools, "tools")
        if found:
            where, token = found
            raise BadLine(f"{where} contains the special token {token!r}, which the tokenizer "
                          "would read as a control token; remove it from the data")

    def _any_special(self, value) -> bool:
        """Whether special token text occurs in ``value``'s strings (nested values are searched
        as their JSON, which writes special tokens as is: ``_dumps_plain``)."""
        search = self._special_re.search
        for message in value if isinstance(value, list) else [value]:
            if isinstance(message, dict):
                for item in message.values():
                    if search(item) if isinstance(item, str) else \
                            item is not None and search(json.dumps(item, ensure_ascii=False)):
                        return True
            elif message is not None and search(json.dumps(message, ensure_ascii=False)):
                return True
        return False

    def special_in(self, value, where: str = "") -> tuple[str, str] | None:
        """(where, token) of the first special token's text inside ``value``'s strings."""
        if self._special_re is None:
            return None
        if isinstance(value, str):
            found = self._special_re.search(value)
            return (where or "the text", found.group(0)) if found else None
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, list):
            items = ((f"[{i}]", v) for i, v in enumerate(value))
        else:
            return None
        for key, item in items:
            name = f"{where}{key}" if str(key).startswith("[") else f"{where}.{key}"
            found = self.special_in(item, name.lstrip("."))
            if found:
                return found
        return None

    def check_kept(self, messages: list[dict], text: str) -> None:
        """BadLine when the rendering lost a message or a tool call (templates that silently
        drop tool turns or tool calls would train a reply without its turn)."""
        for i, m in enumerate(messages):
            content = (m.get("content") or "").strip()
            tail = content[-32:]
            if tail and tail not in text and json.dumps(tail)[1:-1] not in text:
                raise BadLine(f"the chat template dropped messages[{i}] ({m['role']}) from the "
                              "rendering, so training would see a conversation that is not "
                              "the one in the data; use a template that renders this role "
                              "(chat.template in the hero profile)")
            for call in m.get("tool_calls") or []:
                name = (call.get("function") or {}).get("name") if isinstance(call, dict) \
                    else None
                if isinstance(name, str) and name not in text:
                    raise BadLine(f"the chat template dropped the tool call {name!r} of "
                                  f"messages[{i}] from the rendering; use a template that "
                                  "renders tool calls (chat.template in the hero profile)")

    def spans(self, messages: list[dict], trained: list[int], *, tools: list | None = None
              ) -> Rendered:
        """The rendering of ``messages`` and the spans of the messages at indices ``trained``."""
        self.check_contents(messages, tools)
        text = self.render(messages, tools=tools)
        self.check_kept(messages, text)
        if not trained:
            return Rendered(text, [])
        if self.end_of_turn is None:
            raise BadLine("the chat template writes no special token after an assistant's reply, "
                          "so the model could not learn where its turn ends; set chat.template "
                          "to a template whose turns end in one of this tokenizer's special "
                          "tokens (or set data.train_on_inputs: true)")
        if not self.header_search:
            return self._by_placeholder(messages, trained, text, tools)
        replies = [i for i in trained if messages[i]["role"] == "assistant"]
        others = [i for i in trained if messages[i]["role"] != "assistant"
                  and messages[i].get("content")]  # an empty turn has nothing to learn
        found = self._by_header(messages, replies, text)
        if others:
            more = self._by_placeholder(messages, others, text, tools)
            found.spans = sorted(found.spans + more.spans)
            found.append_eos = found.append_eos or more.append_eos
        return found

    def _by_header(self, messages: list[dict], trained: list[int], text: str) -> Rendered:
        g, eot = self.generation_prompt, self.end_of_turn
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        starts = [m.end() for m in self._header_re.finditer(text)]
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
        groups = _match_literals(literals, text)
        if groups is not None and any(  # a template may trim a content, not rewrite it
                text[a:b].strip() != messages[i]["content"].strip()
                for (a, b), i in zip(groups, marked)):
            groups = None
        if groups is None:
            raise BadLine("the chat template renders this conversation differently once the "
                          "trained contents are known (a content-dependent branch), so the "
                          "trained turns cannot be located; set data.train_on_inputs: true")
        spans, append_eos = [], False
        for k, ((start, end), i) in enumerate(zip(groups, marked)):
            floor = groups[k - 1][1] if k else 0
            if messages[i]["role"] == "assistant":
                start = self._reply_start(text, floor, start)
            after = self._special_re.search(text, end) if self._special_re else None
            if after is not None and after.group(0) == self.end_of_turn:
                end = after.end()  # the turn's own end, never a later turn's
            elif end == len(text.rstrip()) and messages[i]["role"] == "assistant":
                append_eos = True
            spans.append((start, end))
        return Rendered(text, spans, append_eos)

    def _reply_start(self, text: str, floor: int, content: int) -> int:
        """Where an assistant reply starts: after its generation prompt when the template has
        one, else after the last special token before its content (Mistral's ``[/INST]``: the
        space the template writes before the reply is generated by the model)."""
        if self.generation_prompt:
            header = text.rfind(self.generation_prompt, floor, content)
            return header + len(self.generation_prompt) if header >= 0 else content
        last = None
        for last in self._special_re.finditer(text, floor, content) if self._special_re else ():
            pass
        return last.end() if last is not None else content


def template_of(tokenizer) -> str | None:
    """The tokenizer's chat template; of named templates (a dict), the ``default`` one."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def _match_literals(literals: list[str], text: str) -> list[Span] | None:
    """Spans between the template's literal pieces, each literal at its first place after the
    previous one (linear: no regex backtracking), the last one ending the text."""
    if not text.startswith(literals[0]):
        return None
    groups, at = [], len(literals[0])
    for k, literal in enumerate(literals[1:], 1):
        last = k == len(literals) - 1
        pos = len(text) - len(literal) if last else text.find(literal, at)
        if pos < at or (last and not text.endswith(literal)):
            return None
        groups.append((at, pos))
        at = pos + len(literal)
    return groups


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    """Templates read reasoning as ``reasoning_content`` (Qwen3) or ``thinking`` (gpt-oss); a
    null content (tool calls only) is an empty string to them."""
    out = []
    for m in messages:
        if m.get("content") is None and "content" in m:
            m = {**m, "content": ""}
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
