"""Benchmarks: one script per question (see benchmarks/README.md); shared helpers in common.py."""
