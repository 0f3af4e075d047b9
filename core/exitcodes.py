"""Exit codes of the training child (``python -m trainer.run_job``), read by the daemon.

Torch-free on purpose: the daemon interprets them without importing the trainer.
"""

COMPLETED = 0
"""The job trained to the end; results are in its sidecar."""
CRASHED = 1
"""An unexpected exception: retryable (the traceback is in the job log)."""
PERMANENT = 2
"""Bad data, bad config, a refused checkpoint, or the governor gave up: retrying cannot help."""
STOPPED = 3
"""A stop was requested; the child checkpointed at a step boundary and recorded its resume point."""
RETRYABLE = 4
"""Out of memory or another transient resource failure: try again."""

RETRYABLE_CODES = frozenset({CRASHED, RETRYABLE})
