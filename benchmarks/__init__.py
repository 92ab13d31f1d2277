"""Benchmarks: python -m benchmarks.<name>; never run as tests."""
