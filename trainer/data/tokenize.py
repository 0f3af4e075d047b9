"""Examples to token ids and a per-token "trained" mask, many at a time.

Every example becomes text segments, each trained or not (``trainer.data.chat`` finds the trained
turns of a conversation in any chat template): text is one trained segment; prompt/completion is
the prompt (not trained) and the completion (trained); a conversation is its rendering cut at the
spans of its trained turns. Segments of a whole batch of examples are encoded in one call of the
fast tokenizer (Rust, every core), then joined per example.

**Boundaries.** A segment boundary is a token boundary: the prompt and the completion are
encoded separately. That is the tokenization the model meets at inference, where the prompt is
encoded alone and the model generates from its last token: with the prompt ``"The capital of
France is "`` and the completion ``"Paris."`` the model learns to produce ``Paris`` after the
prompt's own space token, and decoding the trained tokens gives exactly the completion. This
needs a tokenizer whose segments concatenate (``decode(a + b) == text_a + text_b``), which holds
for byte-level BPE (GPT-2, Qwen, Llama 3); for one that does not (a SentencePiece tokenizer that
adds a prefix space to every piece) the whole text is encoded once and a token is trained when
any of its characters lies in a trained span (offsets computed in Rust).

**Special tokens.** BOS (and any other token) the tokenizer's post-processor adds goes around text
and prompt/completion examples, as at inference; a chat template writes its own (rendered text
is encoded without adding any). An EOS is trained after text and completions, and after a
conversation whose template writes no end of turn. Content that holds a special token's text is a
bad line.

**Truncation** (``data.truncation``): ``drop`` drops an example longer than ``max_length``;
``keep_start`` / ``keep_end`` keep its first / last tokens (``keep_end`` keeps the BOS); ``auto``
drops a conversation's oldest turns (never the system prompt, never the last trained reply), then
keeps the end; prompt/completion keep the end (the completion), text the start. An example left
without a trained token is dropped. Every cut and drop is counted.

realm's own byte tokenizer (one token per byte) is encoded by a lookup table in NumPy: the Rust
path costs about a microsecond per token on these machines, so the byte tokenizer would otherwise
be the slowest of all. The table is built from the tokenizer itself and checked against it on a
probe text with every byte and special token at construction; a tokenizer that is not exactly that
byte tokenizer never takes this path.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field

import numpy as np

from core.errors import InputError
from trainer.data.chat import ChatLayout, template_of, trained_indices
from trainer.data.reader import BadLine, Example

TRUNCATIONS = ("auto", "drop", "keep_start", "keep_end")


@dataclass
class Tokenized:
    ids: np.ndarray
    """int32 token ids."""
    trained: np.ndarray
    """bool, one per token: the token is a loss target."""
    truncated: bool = False
    empty: bool = False
    """Truncation left no trained token: the example is dropped."""
    turns_dropped: int = 0

    @property
    def trained_count(self) -> int:
        return int(self.trained[1:].sum())


@dataclass
class Settings:
    max_length: int
    train_on_inputs: bool = False
    train_on: str = "all_assistant"
    truncation: str = "auto"

    @classmethod
    def of(cls, data_cfg) -> "Settings":
        return cls(data_cfg.max_length, data_cfg.train_on_inputs,
                   getattr(data_cfg, "train_on", "all_assistant"),
                   getattr(data_cfg, "truncation", "auto"))


@dataclass
class _Plan:
    """One example as segments before encoding."""

    segments: list[tuple[str, bool]]
    prefix: list[int] = field(default_factory=list)
    suffix: list[int] = field(default_factory=list)
    """Ids around the segments (post-processor specials, an EOS), trained as ``suffix_trained``."""
    suffix_trained: bool = True


class ByteTable:
    """realm's byte tokenizer as a lookup table (exact; see the module docstring)."""

    def __init__(self, lut: np.ndarray, specials: dict[str, int]):
        self.lut = lut
        self.specials = specials
        self.byte_specials = {k.encode("utf-8"): v for k, v in specials.items()}
        longest_first = sorted(specials, key=len, reverse=True)
        self.bytes_split = re.compile(b"|".join(re.escape(s.encode("utf-8"))
                                                for s in longest_first)) if specials else None

    @classmethod
    def of(cls, tokenizer) -> "ByteTable | None":
        try:
            from tokenizers import models

            backend = tokenizer.backend_tokenizer
            if not isinstance(backend.model, models.BPE) or backend.normalizer is not None:
                return None
            vocab = backend.get_vocab(with_added_tokens=False)
            alphabet = _bytes_to_unicode()
            if len(vocab) != 256 or set(vocab) != set(alphabet.values()):
                return None
            lut = np.array([vocab[alphabet[b]] for b in range(256)], dtype=np.int32)
            specials = {str(t): i for t, i in tokenizer.added_tokens_encoder.items()}
            table = cls(lut, specials)
        except Exception:  # noqa: BLE001 - any surprise: not the byte tokenizer, use Rust
            return None
        probe = "".join(map(chr, range(1, 600))) + "héllo 世界 🙂\n\t" + "".join(specials) + " x"
        expected = backend.encode(probe, add_special_tokens=False).ids
        return table if table.encode([probe])[0].tolist() == expected else None

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        ids, ends = self.encode_joined(texts)
        return np.split(ids, ends[:-1]) if texts else []

    def encode_joined(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of all texts back to back and where each text's ids end: one lookup over
        their joined bytes, then each special token found inside one text collapsed to its id."""
        if not texts:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        raw = [t.encode("utf-8") for t in texts]
        ends = np.cumsum(np.fromiter(map(len, raw), np.int64, len(raw)))
        joined = b"".join(raw)
        ids = self.lut[np.frombuffer(joined, dtype=np.uint8)]
        found = [(m.start(), m.end(), m.group()) for m in self.bytes_split.finditer(joined)] \
            if self.bytes_split is not None else []
        if found:
            starts, stops = np.array([f[0] for f in found]), np.array([f[1] for f in found])
            token = np.array([self.byte_specials[f[2]] for f in found], np.int32)
            # a match across two texts is no token of either
            inside = np.searchsorted(ends, starts, "right") == np.searchsorted(ends, stops - 1,
                                                                              "right")
            starts, stops = starts[inside], stops[inside]
            ids[starts] = token[inside]
            lens = stops - starts - 1  # the bytes after each match's first, to drop
            before = np.cumsum(lens) - lens
            drop = np.arange(int(lens.sum())) + np.repeat(starts + 1 - before, lens)
            keep = np.ones(len(ids), bool)
            keep[drop] = False
            removed = np.searchsorted(drop, ends)  # dropped positions before each text's end
            ids, ends = ids[keep], ends - removed
        return ids, ends


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ``pre_tokenizers.ByteLevel`` uses)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class ExampleEncoder:
    """Encodes examples for one tokenizer and one set of data settings."""

    def __init__(self, tokenizer, settings: Settings):
        self.tokenizer, self.settings = tokenizer, settings
        self.backend = tokenizer.backend_tokenizer
        self.layout = ChatLayout(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.prefix, self.suffix = self._post_processor_ids()
        if self.eos is None:
            raise InputError("the tokenizer has no EOS token, so no example could end; set "
                             "eos_token in its tokenizer_config.json")
        self.closing = self.suffix if self.eos in self.suffix else self.suffix + [self.eos]
        """What ends a text or a completion: the post-processor's suffix, else an EOS."""
        self.bytes = ByteTable.of(tokenizer)
        self.concatenates = self.bytes is not None or self._segments_concatenate()
        self.special_text = self._special_text(self.prefix + self.closing)
        """Id -> text of the ids put around examples, when each is a special token that encodes
        back to itself (then they travel as text through the one batched encode)."""

    # --- tokenizer facts ------------------------------------------------------------------

    def _post_processor_ids(self) -> tuple[list[int], list[int]]:
        """Ids the tokenizer's post-processor puts before and after a text (BOS, EOS)."""
        plain = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a", add_special_tokens=True).ids
        at = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
        return full[:at], full[at + len(plain):]

    def _special_text(self, ids: list[int]) -> dict[int, str] | None:
        out = {}
        for i in ids:
            text = self.tokenizer.convert_ids_to_tokens(i)
            if not isinstance(text, str) or \
                    self.backend.encode(text, add_special_tokens=False).ids != [i]:
                return None
            out[i] = text
        return out

    def _segments_concatenate(self) -> bool:
        pieces = ["Hello world", " again", "\n", "Paris.", " 3 + 5 ünï", "end"]
        ids = [i for p in pieces for i in self.backend.encode(p, add_special_tokens=False).ids]
        return self.tokenizer.decode(ids) == "".join(pieces)

    # --- examples -------------------------------------------------------------------------

    def encode(self, examples: list[Example]) -> list[Tokenized | BadLine]:
        """One result per example, in order: its tokens, or the BadLine that rejects it."""
        plans: list[_Plan | BadLine] = []
        for example in examples:
            try:
                plans.append(self._plan(example))
            except BadLine as bad:
                plans.append(bad)
        encoded = self._encode_plans([p for p in plans if isinstance(p, _Plan)])
        results: list[Tokenized | BadLine] = []
        for example, plan in zip(examples, plans):
            if isinstance(plan, BadLine):
                results.append(plan)
                continue
            ids, trained = next(encoded)
            try:
                results.append(self._finish(example, ids, trained))
            except BadLine as bad:
                results.append(bad)
        return results

    def _plan(self, example: Example, messages: list[dict] | None = None) -> _Plan:
        s = self.settings
        data = example.data
        if example.kind != "messages":
            found = self.layout.special_in({k: data[k] for k in ("text", "prompt", "completion")
                                            if k in data})
            if found:
                raise BadLine(f"'{found[0]}' contains the special token {found[1]!r}, which the "
                              "tokenizer would read as a control token; remove it from the data")
        if example.kind == "text":
            return _Plan([(data["text"], True)], list(self.prefix), self.closing)
        if example.kind == "prompt_completion":
            return _Plan([(data["prompt"], s.train_on_inputs), (data["completion"], True)],
                         list(self.prefix), self.closing)
        messages = messages if messages is not None else data["messages"]
        chosen = trained_indices(messages, s.train_on)
        if not chosen and not s.train_on_inputs:
            what = "no assistant turn" if s.train_on in ("all_assistant", "last_assistant") \
                else f"no message with a role in data.train_on ({s.train_on})"
            raise BadLine(f"'messages' has {what} to learn from (set data.train_on_inputs: true "
                          "to train on every token)")
        rendered = self.layout.spans(messages, [] if s.train_on_inputs else chosen,
                                     tools=data.get("tools"))
        if s.train_on_inputs:
            return _Plan([(rendered.text, True)])
        segments, at = [], 0
        for start, end in rendered.spans:
            if start > at:
                segments.append((rendered.text[at:start], False))
            segments.append((rendered.text[start:end], True))
            at = end
        if at < len(rendered.text):
            segments.append((rendered.text[at:], False))
        return _Plan(segments, suffix=[self.eos] if rendered.append_eos else [])

    def _encode_plans(self, plans: list[_Plan]):
        """(ids, trained) per plan, from one batched encode of every segment."""
        if not self.concatenates:
            return self._encode_with_offsets(plans)
        if self.special_text is not None:
            return self._encode_as_text(plans)
        return self._encode_with_fixed_ids(plans)

    def _encode_as_text(self, plans: list[_Plan]):
        """Prefix and suffix ids travel as their special tokens' text: one encode, one mask."""
        texts, flags, pieces = [], [], []
        for p in plans:
            n = len(p.segments)
            if p.prefix:
                texts.append("".join(self.special_text[i] for i in p.prefix))
                flags.append(False)
                n += 1
            for text, trained in p.segments:
                texts.append(text)
                flags.append(trained)
            if p.suffix:
                texts.append("".join(self.special_text[i] for i in p.suffix))
                flags.append(p.suffix_trained)
                n += 1
            pieces.append(n)
        ids, ends = self._encode_joined(texts)
        mask = np.repeat(np.asarray(flags, bool), np.diff(ends, prepend=0))
        at = 0
        for n in pieces:
            a = int(ends[at - 1]) if at else 0
            at += n
            b = int(ends[at - 1]) if at else 0
            yield ids[a:b], mask[a:b]

    def _encode_with_fixed_ids(self, plans: list[_Plan]):
        """Segments encoded in one batch, prefix and suffix ids put around them."""
        parts = self._encode_texts([text for p in plans for text, _ in p.segments])
        chunks, flags, lengths, at = [], [], [], 0
        for p in plans:
            chunks.append(np.asarray(p.prefix, np.int32))
            flags.append(False)
            for _, trained in p.segments:
                chunks.append(parts[at])
                flags.append(trained)
                at += 1
            chunks.append(np.asarray(p.suffix, np.int32))
            flags.append(p.suffix_trained)
        lengths = np.fromiter(map(len, chunks), np.int64, len(chunks))
        ids = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
        mask = np.repeat(np.asarray(flags, bool), lengths)
        ends = np.cumsum(lengths)
        first = 0
        for p in plans:
            last = first + len(p.segments) + 1  # prefix, segments, suffix
            a, b = (ends[first - 1] if first else 0), ends[last]
            yield ids[a:b], mask[a:b]
            first = last + 1

    def _encode_with_offsets(self, plans: list[_Plan]):
        """Tokenizers whose pieces do not concatenate: the whole text encoded once, a token
        trained when any of its characters lies in a trained segment."""
        encodings = self.backend.encode_batch(["".join(t for t, _ in p.segments) for p in plans],
                                              add_special_tokens=False)
        for p, enc in zip(plans, encodings):
            bounds, at = [], 0
            for text, trained in p.segments:
                if trained:
                    bounds.append((at, at + len(text)))
                at += len(text)
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            mask = np.zeros(len(offsets), bool)
            for a, b in bounds:  # any character of the token inside the span
                mask |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
            ids = np.concatenate([np.asarray(p.prefix, np.int32), np.asarray(enc.ids, np.int32),
                                  np.asarray(p.suffix, np.int32)])
            yield ids, np.concatenate([np.zeros(len(p.prefix), bool), mask,
                                       np.full(len(p.suffix), p.suffix_trained)])

    def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        ids, ends = self._encode_joined(texts)
        return np.split(ids, ends[:-1]) if texts else []

    def _encode_joined(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids back to back, and where each text's ids end."""
        if self.bytes is not None:
            return self.bytes.encode_joined(texts)
        lists = [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        ends = np.cumsum(np.fromiter(map(len, lists), np.int64, len(lists)))
        total = int(ends[-1]) if len(ends) else 0
        return np.fromiter(itertools.chain.from_iterable(lists), np.int32, total), ends

    # --- length ---------------------------------------------------------------------------

    def _head(self, example: Example, ids: np.ndarray) -> int:
        """Leading ids that keep_end keeps: the post-processor's prefix, or a template's BOS."""
        if example.kind != "messages":
            return len(self.prefix)
        bos = self.tokenizer.bos_token_id
        return 1 if bos is not None and len(ids) and ids[0] == bos else 0

    def _finish(self, example: Example, ids: np.ndarray, trained: np.ndarray) -> Tokenized:
        s = self.settings
        if s.train_on_inputs:
            trained = np.ones(len(ids), bool)
        if not trained[1:].any():  # the first token of a row is never a prediction target
            raise BadLine("no trainable tokens (nothing to learn after masking)")
        if len(ids) <= s.max_length:
            return Tokenized(ids, trained)
        policy = s.truncation
        if policy == "auto":
            if example.kind == "messages":
                return self._drop_turns(example, len(ids))
            policy = "keep_end" if example.kind == "prompt_completion" else "keep_start"
        return _cut(ids, trained, policy, s.max_length, self._head(example, ids))

    def _drop_turns(self, example: Example, length: int) -> Tokenized:
        """Drop the oldest turns (a turn: a user message and what answers it) until the rest
        fits, keeping a leading system message and the last trained reply; then keep the end.
        The cut is found by bisection (fewer turns, fewer tokens): O(log turns) renderings."""
        messages = example.data["messages"]
        system = messages[:1] if messages[0]["role"] == "system" else []
        rest = messages[len(system):]
        chosen = trained_indices(messages, self.settings.train_on) or [len(messages) - 1]
        last = chosen[-1] - len(system)
        cuts = [i for i, m in enumerate(rest) if m["role"] == "user" and 0 < i <= last]
        tried: dict[int, tuple | None] = {}

        def attempt(k: int):
            if k not in tried:
                try:
                    plan = self._plan(example, system + rest[cuts[k]:])
                    tried[k] = next(self._encode_plans([plan]))
                except BadLine:  # e.g. a template that needs another first message
                    tried[k] = None
            return tried[k]

        low, high = 0, len(cuts) - 1  # find the first cut that fits
        while low < high:
            mid = (low + high) // 2
            got = attempt(mid)
            if got is not None and len(got[0]) <= self.settings.max_length:
                high = mid
            else:
                low = mid + 1
        k = low if cuts else None
        best = attempt(k) if k is not None else None
        if best is None:
            k, best = None, next(self._encode_plans([self._plan(example)]))
        ids, trained = best
        dropped = sum(1 for m in rest[:cuts[k]] if m["role"] == "user") if k is not None else 0
        if len(ids) <= self.settings.max_length:
            return Tokenized(ids, trained, truncated=True, turns_dropped=dropped)
        out = _cut(ids, trained, "keep_end", self.settings.max_length, self._head(example, ids))
        out.turns_dropped = dropped
        return out


def _cut(ids: np.ndarray, trained: np.ndarray, policy: str, max_length: int,
         keep_head: int) -> Tokenized:
    if policy == "drop":
        return Tokenized(ids[:0], trained[:0], truncated=True, empty=True)
    if policy == "keep_start":
        ids, trained = ids[:max_length], trained[:max_length]
    else:  # keep_end, keeping the first keep_head ids (the post-processor's BOS)
        tail = max_length - keep_head
        ids = np.concatenate([ids[:keep_head], ids[len(ids) - tail:]])
        trained = np.concatenate([trained[:keep_head], trained[len(trained) - tail:]])
    return Tokenized(ids, trained, truncated=True, empty=not trained[1:].any())


def tokenize(tokenizer, example: Example, *, max_length: int, train_on_inputs: bool = False,
             train_on: str = "all_assistant", truncation: str = "auto") -> Tokenized:
    """One example (raises its BadLine): for tests and one-off use; builds use ExampleEncoder."""
    encoder = ExampleEncoder(tokenizer, Settings(max_length, train_on_inputs, train_on,
                                                 truncation))
    result = encoder.encode([example])[0]
    if isinstance(result, BadLine):
        raise result
    return result


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and the chat template's end-of-turn token: where generation must stop."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eot = ChatLayout(tokenizer).end_of_turn
    if eot is not None:
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        if isinstance(eot_id, int) and eot_id not in ids and eot_id != tokenizer.unk_token_id:
            ids.append(eot_id)
    return ids


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a tokenizer (vocabulary, normalisation, chat template) for the data cache."""
    blob = tokenizer.backend_tokenizer.to_str() + (template_of(tokenizer) or "") + \
        str(tokenizer.eos_token_id)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
