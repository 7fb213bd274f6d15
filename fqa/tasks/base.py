"""What is being learned: a model plus its per-datapoint loss, addressed by global index.

Estimators only ever call ``losses(ids)`` (and, for `lr`, watch the model's Linear
layers through hooks), so a task is all they need to know about the problem.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn.functional as F
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


class ClassifierTask(Task):
    """A task whose loss is cross-entropy of ``model`` on labelled training rows: the
    queries, the pre-pass and the backpropagation loss, given ``_rows(ids)``."""

    @abstractmethod
    def _rows(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(model inputs, labels) of the training datapoints ``ids``, on the device."""

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with self.placement.autocast():
            return self.model(inputs).float()  # the loss in fp32 whatever the compute dtype

    def losses(self, ids: np.ndarray) -> torch.Tensor:
        inputs, labels = self._rows(ids)
        with torch.inference_mode():
            return F.cross_entropy(self._logits(inputs), labels, reduction="none")

    def prepass(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        inputs, labels = self._rows(ids)
        with torch.inference_mode():
            logits = self._logits(inputs)
            loss = F.cross_entropy(logits, labels, reduction="none")
        return {  # one host copy per batch
            "loss": loss.double().cpu().numpy(),
            "correct": (logits.argmax(-1) == labels).cpu().numpy(),
        }

    def backprop_loss(self, ids: np.ndarray) -> torch.Tensor:
        inputs, labels = self._rows(ids)
        return F.cross_entropy(self._logits(inputs), labels)
