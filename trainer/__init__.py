"""realm trainer: config (schema, loader, locked architecture), engine, governor, monitoring.

``trainer.config`` is light (no torch) so the CLI and the daemon can resolve and explain config;
the engine modules import torch and run only in the training child process.
"""
