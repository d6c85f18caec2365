"""Benchmarks of the cohort's real code path (``python -m bench.exchange``)."""
