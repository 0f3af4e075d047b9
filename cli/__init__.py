"""realm's command line: ``realm`` (``python -m cli``), one module per group of subcommands.

The top layer: it may import every package below it (core, config, guild, daemon, trainer) but
imports the trainer only inside the commands that need it, so ``realm daemon`` never loads torch.
"""
