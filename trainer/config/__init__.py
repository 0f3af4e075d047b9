"""Configuration: the typed schema, the six-layer resolver with provenance, the locked block."""
