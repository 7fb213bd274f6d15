"""What is being learned: a model plus its per-datapoint loss, addressed by global index.

Estimators only ever call ``losses(ids)`` (and, for `lr`, watch the model's Linear
layers through hooks), so a task is all they need to know about the problem.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import nn

from fqa.device import CPU, Placement


class Task(ABC):
    model: nn.Module
    # device and precision of the model, batches and noise (estimators read it)
    placement: Placement = CPU

    @abstractmethod
    def losses(self, ids: np.ndarray) -> torch.Tensor:
        """Per-row loss of the training datapoints ``ids`` (ids may repeat), no autograd."""

    @abstractmethod
    def prepass(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Unperturbed per-datapoint ``loss`` (and e.g. ``correct``) for a batch."""

    @abstractmethod
    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics on a held-out split (``validation`` or ``test``)."""

    @abstractmethod
    def train_ids(self) -> np.ndarray:
        """Global indices of the training datapoints."""

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def backprop_loss(self, ids: np.ndarray) -> torch.Tensor:
        """Mean loss with autograd enabled (backpropagation reference and tests)."""
        raise NotImplementedError(f"{type(self).__name__} has no backpropagation path")
