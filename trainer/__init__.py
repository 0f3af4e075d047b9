"""realm trainer: config (schema, loader, locked architecture), engine, governor, monitoring.

Imported only in the training child process (it pulls in torch).
"""
