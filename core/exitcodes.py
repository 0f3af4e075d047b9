"""Exit codes of the training child (``python -m trainer.run_job``), read by the daemon.

Torch-free on purpose: the daemon interprets them without importing the trainer. The outcome
file (``daemon.protocol.Outcome``) says more (kind, reason, results); the exit code alone is
what the daemon uses when a child ended without writing one.
"""

COMPLETED = 0
"""The job trained to the end; results are in its outcome file."""
CRASHED = 1
"""An unexpected exception: retryable (the traceback is in the job log)."""
PERMANENT = 2
"""Bad data, bad config, a refused checkpoint, or the governor gave up: retrying cannot help."""
STOPPED = 3
"""A stop was requested; the child checkpointed at a step boundary and reported its resume
point."""
RETRYABLE = 4
"""Out of memory or another transient resource failure: try again."""
NO_SPACE = 5
"""The realm's file system filled up (ENOSPC): requeued with its resume point, not counted as an
attempt; the daemon waits for free space before it claims again."""

ONCE_LEFT_QUEUED = 3
"""``realm daemon --once`` exit code when the disk/memory guard left jobs queued."""
