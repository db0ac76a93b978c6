"""Benchmarks of the harness components: speed and memory on data of a realistic shape."""
