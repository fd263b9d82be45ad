"""Benchmarks: `python -m benchmarks.bench_train` (see docs/performance.md)."""
