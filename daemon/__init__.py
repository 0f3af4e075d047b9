"""realm's daemon: the claim loop (``training_daemon``), the child it starts per job
(``supervisor``), the files the two speak through (``protocol``) and the realm's lock (``lock``).

Imports the foundation (core), config and guild; never the trainer (the child is started by
module name, ``python -m trainer.run_job``) and never torch.
"""
