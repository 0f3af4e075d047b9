"""Job sidecars on disk: where they are, how they are read, and how realm proves it wrote one.

A sidecar a person writes before adoption may hold only the user fields (``core.job.USER_FIELDS``).
Every sidecar realm writes carries a ``seal``: an HMAC-SHA256 of its canonical JSON under the
realm's own key (``status/.sidecar-key``, mode 0600, created on first use). A sidecar that holds
realm's fields (``id``, ``dataset_path``, ``status``...) without a valid seal was not written by
realm and is refused: nobody can hand realm a record that points at a file outside the queue, or
claims a hash realm never computed. The key protects against people who can drop files into the
inboxes but cannot read the realm's status folder; whoever can read the key can administer the
realm anyway.

Reads never follow a symlink, never block on a FIFO and are bounded in size and depth
(``core.validate``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from core.errors import InputError, SidecarError
from core.paths import RealmPaths, sidecar_of  # noqa: F401  (sidecar_of: re-exported)
from core.validate import MAX_SIDECAR_BYTES, parse_json, read_regular

SEAL_FIELD = "seal"
KEY_FILE = ".sidecar-key"


def read_sidecar_json(path: Path) -> Any:
    """Parse a sidecar; every problem (bad JSON with file:line:col, too deep, too big, a FIFO,
    a directory, a symlink) becomes a SidecarError naming the file."""
    try:
        return parse_json(read_regular(Path(path), MAX_SIDECAR_BYTES, "sidecar"), str(path))
    except SidecarError:
        raise
    except InputError as exc:
        raise SidecarError(str(exc)) from None


class RealmKey:
    """The realm's sidecar key, read (or created) once per process."""

    def __init__(self, paths: RealmPaths):
        self.path = paths.status / KEY_FILE
        self._key: bytes | None = None

    def key(self) -> bytes:
        if self._key is None:
            self._key = self._load_or_create()
        return self._key

    def _load_or_create(self) -> bytes:
        try:
            return bytes.fromhex(self.path.read_text().strip())
        except FileNotFoundError:
            pass
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{KEY_FILE}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, self.path)  # never replaces: the first process to create it wins
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        return bytes.fromhex(self.path.read_text().strip())

    def seal(self, record: dict) -> str:
        body = {k: v for k, v in record.items() if k != SEAL_FIELD}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hmac.new(self.key(), canonical.encode(), hashlib.sha256).hexdigest()

    def sealed(self, record: dict) -> dict:
        return {**record, SEAL_FIELD: self.seal(record)}

    def verify(self, record: dict, source: str) -> dict:
        """``record`` without its seal; SidecarError when realm did not write it."""
        given = record.get(SEAL_FIELD)
        if not isinstance(given, str) or not hmac.compare_digest(given, self.seal(record)):
            fields = ", ".join(sorted(k for k in record if k != SEAL_FIELD)[:6])
            raise SidecarError(
                f"{source}: holds fields only realm writes ({fields}...) but realm did not write "
                "it (its seal is missing or does not match). A hand-written sidecar may hold only "
                "hero_id, campaign_id, overrides and metadata: remove the other fields.")
        return {k: v for k, v in record.items() if k != SEAL_FIELD}
