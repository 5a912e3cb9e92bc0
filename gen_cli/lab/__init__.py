"""Measurement: gen compare (grid, per-process worker, quality), the benches, and report rendering."""
