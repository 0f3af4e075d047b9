"""contrib/realm-daemon.service matches the daemon's warm stop (issue 15)."""

from __future__ import annotations

from pathlib import Path

from config.schema import DaemonConfig

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "realm-daemon.service"


def parse_unit(text: str) -> tuple[dict[str, dict[str, str]], dict[str, bool]]:
    """(section -> key -> value, key -> whether a comment line sits right above it)."""
    sections: dict[str, dict[str, str]] = {}
    commented: dict[str, bool] = {}
    current, previous = None, ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], {})
        elif stripped and not stripped.startswith(("#", ";")):
            key, sep, value = stripped.partition("=")
            assert sep and current is not None, f"not a unit line: {line!r}"
            current[key.strip()] = value.strip()
            commented[key.strip()] = previous.startswith("#")
        previous = stripped
    return sections, commented


def _seconds(value: str) -> float:
    for suffix, scale in (("min", 60), ("ms", 0.001), ("s", 1)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value)


def test_the_unit_stops_the_daemon_warmly_within_its_grace_period():
    sections, commented = parse_unit(UNIT.read_text())
    service = sections["Service"]
    cfg = DaemonConfig()
    assert service["KillSignal"] == "SIGTERM", "the daemon's warm stop is its first SIGTERM"
    assert service["KillMode"] == "mixed", "SIGTERM to the daemon alone, SIGKILL to all at the end"
    timeout = _seconds(service["TimeoutStopSec"])
    needed = cfg.stop_grace_seconds + 2 * cfg.heartbeat_seconds
    assert needed < timeout <= 2 * needed, (
        f"TimeoutStopSec {timeout:g} must outlast the warm stop ({needed:g} s: "
        f"daemon.stop_grace_seconds + 2 x daemon.heartbeat_seconds) without waiting forever")
    assert service["ExecStart"].split()[-1] == "daemon" and "--once" not in service["ExecStart"]
    assert "2" in service["RestartPreventExitStatus"].split(), "a config error is not retried"
    for key in ("KillSignal", "KillMode", "TimeoutStopSec", "ExecStart", "Restart",
                "RestartPreventExitStatus", "Environment"):
        assert commented[key], f"{key} needs a comment saying why"


def test_the_parser_catches_a_line_without_a_comment():
    sections, commented = parse_unit("[Service]\n# why\nA=1\nB=2\n")
    assert sections == {"Service": {"A": "1", "B": "2"}}
    assert commented == {"A": True, "B": False}
