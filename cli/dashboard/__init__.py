"""The web dashboard behind `realm serve` (starlette; imported by that command only)."""
