"""realm core: job model, file-backed queue, job ledger, paths and the CLI.

Never imports torch: the daemon process stays light and training runs in a child process.
"""
