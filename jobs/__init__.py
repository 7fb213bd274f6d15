"""Entrypoints for ``ray job submit`` and Tune sweeps (``python -m jobs.train``)."""
