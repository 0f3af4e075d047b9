"""realm's config: the schema (``schema``), the six layers (``layers``), the resolver
(``resolver``), the locked architecture block (``locked``), the YAML/JSON reader (``reader``) and
the command line's training flags (``flags``).

Light on purpose: imports the foundation (core) only, never torch and never the trainer, so
heroes, campaigns, the daemon and the command line can all use it.
"""
