"""Benchmarks of the embedding worker: ``python -m benchmarks.run`` (see docs/benchmarks/)."""
