"""realm core, the foundation: errors, files, paths, the job model, the ledger, the settle rule,
the queue scan and the file-backed queue. Imports nothing of the project above it.

Never imports torch: the daemon process stays light and training runs in a child process.
"""
