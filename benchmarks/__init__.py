"""Benchmarks: each module measures one claim and writes <name>.json and <name>.png."""
