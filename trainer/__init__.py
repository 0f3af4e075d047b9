"""realm trainer: the training child's package (engine, governor, data, checkpoints, adapters).

The engine modules import torch and run only in the training child process (and in the commands
that need a model, such as ``realm export``).

realm never downloads a model: a hero names a folder on disk or a model already in the local
Hugging Face cache. ``HF_HUB_OFFLINE`` is set before anything imports huggingface_hub (which reads
it once, at import), so a missing model fails at once instead of after network time-outs (about
25 s for an ``hf_name`` absent from the cache, even with ``local_files_only``).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
