"""Benchmarks (outside the test suite): ``python benchmarks/run.py [--quick]``."""
