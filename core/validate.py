"""The validation kit every reader of a user-written file goes through.

Sidecars, config.json, campaign.json, hero YAML and dataset lines are written by people and by
scripts, and some of them by attackers: each is read with a size bound, without following a
symlink or blocking on a special file, parsed with a depth bound, and its numbers checked to be
finite and in range. Every refusal is an ``InputError`` whose message says what, where and how to
fix it. Torch-free: the daemon, ``queue status`` and the child all use it.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from core.errors import InputError

MAX_SIDECAR_BYTES = 1 << 20
"""A sidecar, campaign.json or config.json larger than this is refused (realm writes < 64 KiB)."""
MAX_DEPTH = 32
"""Deepest nesting of objects and lists accepted in any user-written JSON or YAML."""
MAX_NAME_LEN = 64
"""Longest hero, campaign or job name (they become folder names and parts of file names)."""
MAX_FILE_NAME_BYTES = 200
"""Longest dataset file name in bytes: realm adds ``.job.json`` and temporary suffixes to it and
the file system's limit is 255 bytes."""
MAX_INT = 2**53
"""Largest integer accepted in a config value (beyond it JSON readers lose precision)."""


def open_regular(path: Path, what: str):
    """Open a user's file for binary reading: never follows a symlink, never blocks on a FIFO or
    device (InputError for anything but a regular file). FileNotFoundError passes through."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        if os.path.islink(path):
            raise InputError(f"{path}: {what} is a symlink; realm reads only regular files it "
                             "can own. Replace it with a copy of the file.") from None
        raise InputError(f"{path}: cannot open {what} ({exc.strerror}).") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{path}: {what} is {kind_of(st.st_mode)}, not a regular file; "
                         "remove it and write a regular file.")
    return os.fdopen(fd, "rb")


def read_regular(path: Path, max_bytes: int, what: str) -> bytes:
    """Read a small regular file (see ``open_regular``), refusing more than ``max_bytes``."""
    with open_regular(path, what) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise InputError(f"{path}: {what} is {size:,} bytes, over the limit of "
                             f"{max_bytes:,}; a {what} holds a few fields, not data.")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"{path}: {what} grew past {max_bytes:,} bytes while read.")
    return data


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def parse_json(text: str | bytes, source: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` with a depth bound and finite numbers only; errors name file:line:col."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{source}: not UTF-8 text (byte {exc.start}: {exc.reason}); "
                             "write it as UTF-8 JSON.") from None
    depth = nesting_depth(text)
    if depth > max_depth:
        raise InputError(f"{source}: JSON nested {depth} deep; at most {max_depth} levels are "
                         "accepted. Flatten it.")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg}); fix "
                         "the file.") from None
    except _NonFinite as exc:
        raise InputError(f"{source}: {exc} is not a JSON number; write a finite number (NaN, "
                         "Infinity and literals that overflow are refused).") from None
    except RecursionError:
        raise InputError(f"{source}: JSON nested too deep to parse; flatten it.") from None


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise _NonFinite(text[:40])
    return value


def nesting_depth(text: str) -> int:
    """Deepest bracket nesting outside strings: a linear scan, so a 100,000-deep document costs
    a pass over its bytes, never a RecursionError."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def read_json_file(path: Path, what: str, *, max_bytes: int = MAX_SIDECAR_BYTES) -> Any:
    """A user-written JSON file, bounded in size and depth (see ``read_regular``)."""
    return parse_json(read_regular(path, max_bytes, what), str(path))


def finite_number(value: Any, key: str) -> str | None:
    """A problem message when ``value`` is a NaN/Infinity or an integer past ``MAX_INT``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} is {value!r}; write a finite number"
    if isinstance(value, int) and abs(value) > MAX_INT:
        return f"{key} is {value}, larger than {MAX_INT:,}; write a smaller number"
    return None


def check_file_name(name: str, where: str) -> str | None:
    """A problem message when a dataset file name cannot be a realm job name: not valid UTF-8
    (it could not be shown or recorded) or too long to carry realm's suffixes."""
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return (f"{where}/{shown}: the file name is not valid UTF-8; rename it (realm records "
                "names in JSON, which holds text only)")
    if len(raw) > MAX_FILE_NAME_BYTES:
        return (f"{where}/{name[:40]}...: the file name is {len(raw)} bytes; at most "
                f"{MAX_FILE_NAME_BYTES} are accepted (realm adds .job.json to it). Rename it.")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return (f"{where}/{name!r}: the file name holds control characters; rename it")
    return None


ABBREVIATIONS = {"lr": "learning_rate", "bs": "batch_size", "wd": "weight_decay",
                 "seq_len": "max_length", "max_seq_len": "max_length", "seq_length": "max_length",
                 "max_seq_length": "max_length", "context_length": "max_length",
                 "grad_accumulation": "grad_accum", "gradient_accumulation_steps": "grad_accum",
                 "steps": "max_steps", "warmup": "warmup_steps", "epoch": "epochs",
                 "betas": "adam_beta1", "eps": "adam_epsilon", "clip": "max_grad_norm",
                 "grad_clip": "max_grad_norm", "gradient_clipping": "max_grad_norm"}
"""Names people bring from other trainers (HF TrainingArguments, Axolotl, torchtune) -> realm's."""


def did_you_mean(word: Any, choices, *, quote: str = "'") -> str:
    """`` (did you mean 'x'?)`` for an unknown name, or ``""`` when nothing is close.

    Dotted names look in their own section first (``training.lr`` -> ``training.learning_rate``,
    never ``training.seed`` or another section's key); within it an abbreviation people bring from
    other trainers, the initials of a key (``mbs`` -> ``micro_batch_size``), a name that contains
    or is contained in a key, then spelling (difflib). A name in an unknown section is matched
    against every section's keys (``optimizer.lr`` -> ``training.learning_rate``)."""
    best = closest(str(word), [str(c) for c in choices])
    return f" (did you mean {quote}{best}{quote}?)" if best else ""


def closest(word: str, choices: list[str]) -> str | None:
    section, _, leaf = word.rpartition(".")
    same = [c for c in choices if c.rpartition(".")[0] == section]
    if section and same:
        match = _closest_leaf(leaf, {c.rpartition(".")[2]: c for c in same})
        if match:
            return match
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if found:
        return found[0]
    if section and not same:  # an unknown section: the key may live in another one
        return _closest_leaf(leaf, {c.rpartition(".")[2]: c for c in choices if "." in c})
    return None


def _closest_leaf(leaf: str, by_leaf: dict[str, str]) -> str | None:
    lower = leaf.lower()
    wanted = ABBREVIATIONS.get(lower)
    if wanted:
        hits = [k for k in by_leaf if k == wanted or k.endswith("_" + wanted)]
        if hits:
            return by_leaf[min(hits, key=len)]
    initials = [k for k in by_leaf if "_" in k and "".join(p[0] for p in k.split("_")) == lower]
    if len(initials) == 1:
        return by_leaf[initials[0]]
    if len(lower) >= 4:
        inside = [k for k in by_leaf if lower in k or (len(k) >= 4 and k in lower)]
        if len(inside) == 1:
            return by_leaf[inside[0]]
    found = difflib.get_close_matches(lower, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[found[0]] if found else None
