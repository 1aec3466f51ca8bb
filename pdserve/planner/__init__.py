"""The SLO planner: sizes the prefill, decode and mixed pools to the load (docs/planner.md)."""
