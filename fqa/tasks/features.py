"""Frozen-tower feature cache: each datapoint's features are computed once.

When the perturbed parameters sit after a frozen tower (alignment heads, or a text
prompt that never touches the image tower), the tower's output for a datapoint
cannot change during training, so a query only pays for the part that changes. The
cache lives in memory, keyed by split and row; it is rebuilt from the (fixed) tower
weights whenever a task is built, so cluster workers and resumed runs agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def encode_in_batches(
    encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, batch: int = 512
) -> torch.Tensor:
    """``encode`` over ``inputs`` in row batches, without autograd."""
    with torch.inference_mode():
        parts = [encode(inputs[start : start + batch]) for start in range(0, len(inputs), batch)]
    with torch.inference_mode(False):  # also when called under an outer inference_mode
        return torch.cat(parts).clone()  # a normal tensor: usable by autograd later


class FeatureCache:
    """features[split] -> [n, E] tensor, computed on first use by ``encode``."""

    def __init__(self, encode: Callable[[str], torch.Tensor]) -> None:
        self._encode = encode
        self._features: dict[str, torch.Tensor] = {}
        self.computed = 0  # rows encoded so far (each row once)

    def __getitem__(self, split: str) -> torch.Tensor:
        if split not in self._features:
            self._features[split] = self._encode(split)
            self.computed += len(self._features[split])
        return self._features[split]
