"""Benchmarks of the gateway against the alternatives a user would pick (see docs/BENCHMARKS.md)."""
