"""The small set of named exceptions realm raises.

Every user-facing error carries an exit code (SPEC section 3): 2 for bad usage, bad config or bad
input; 1 for a runtime failure. The CLI prints ``error: <message>`` and exits with that code; the
message itself must say what went wrong, where (file:line or config key) and how to fix it.
"""

from __future__ import annotations


class RealmError(Exception):
    """Base for errors the CLI reports as one ``error: ...`` paragraph."""

    exit_code = 1


class UsageError(RealmError):
    """Bad command-line usage or bad input named on the command line."""

    exit_code = 2


class InputError(RealmError):
    """A file the user wrote (dataset, sidecar, config) is invalid."""

    exit_code = 2


class SidecarError(InputError):
    """A job sidecar cannot be read; the message names the file and the field."""


class JobNotFound(UsageError):
    """No job matches the identifier given on the command line."""


class CampaignNotFound(UsageError):
    """No campaign of the name (and hero) given."""


class JobRunning(UsageError):
    """The job is processing: this change needs its daemon (a cancel request) or a stop."""


class IllegalTransition(RealmError):
    """A job state change that the transition table forbids."""

    exit_code = 2


class ClaimLost(Exception):
    """Control signal: another process moved the job first (not an error)."""


class ConfigError(InputError):
    """One or more config problems, reported together (each names key, layer, file and fix)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            body = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{len(self.problems)} config problems:\n{body}")
