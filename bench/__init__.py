"""Benchmarks of the agent against real servers on loopback (see bench/README.md)."""
