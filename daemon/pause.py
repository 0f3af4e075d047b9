"""Pausing claims: ``status/paused.json``, written by ``realm daemon pause`` and removed by
``realm daemon resume``. Every daemon of the realm reads it at the top of each round and claims
nothing while it exists; a job already training goes on. No signal and no restart: the file is
the whole protocol, so it also works for daemons on other hosts sharing the realm, and a daemon
started while the realm is paused starts paused.
"""

from __future__ import annotations

import contextlib
import json
import os

from core.fsutil import host_name, write_json_atomic
from core.job import utc_now
from core.paths import RealmPaths


def flag_path(paths: RealmPaths):
    return paths.status / "paused.json"


def pause(paths: RealmPaths, reason: str) -> dict | None:
    """Pause claiming; returns the pause already in force instead when there is one."""
    if (already := paused(paths)) is not None:
        return already
    paths.status.mkdir(parents=True, exist_ok=True)
    write_json_atomic(flag_path(paths), {"schema": 1, "at": utc_now(), "reason": reason,
                                         "by": f"{host_name()}:{os.getpid()}"})
    return None


def resume(paths: RealmPaths) -> dict | None:
    """Resume claiming; returns the pause that was lifted (None when none was in force)."""
    was = paused(paths)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(flag_path(paths))
    return was


def paused(paths: RealmPaths) -> dict | None:
    """The pause in force, or None. A flag file that cannot be read still pauses (someone meant
    to pause): its reason says what is wrong with it."""
    path = flag_path(paths)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"at": None, "by": None,
                "reason": f"{path} exists but is unreadable ({exc}); `realm daemon resume` "
                          "removes it"}
    return data if isinstance(data, dict) else {"at": None, "by": None,
                                                "reason": f"{path} is not a JSON object"}


def describe(pause_info: dict) -> str:
    since = f" since {pause_info['at']}" if pause_info.get("at") else ""
    by = f" by {pause_info['by']}" if pause_info.get("by") else ""
    return f"claiming paused{since}{by}: {pause_info.get('reason')}"
