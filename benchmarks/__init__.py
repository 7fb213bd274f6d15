"""Benchmarks: measurements built on fqa's trainer and cluster layer."""
