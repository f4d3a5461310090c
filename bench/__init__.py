"""Benchmarks of dspex_jupyter (run from the repository root; see bench/README.md)."""
