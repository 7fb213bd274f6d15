"""Classification by a trainable head over a frozen backbone's intermediate tokens.

The backbone (the config's timm ViT, usually pretrained with backpropagation on the
``pretrain.classes`` only: ``fqa.backprop.with_pretrained``) never changes, so each row's
features are computed once, when the task is built: the tokens after block
``task.feature_block``, flattened and standardised with the statistics of the
pretraining rows (the source classes' training split, which the backbone was fitted
on; no target row enters them). Only the head (``task.head_hidden``: 0 for one Linear
layer, else Linear-GELU-Linear), initialised from ``run.seed``, is trained, so a query
costs one small matrix product. The target classes are ``data.classes`` (relabelled
0..K-1), which must not overlap ``pretrain.classes``: every train, validation and test
row is then of a class that pretraining never saw.

Features are a pure function of the checkpoint, the data and the thread count, so
cluster workers, resumed runs and the backpropagation reference see the same numbers.
The few-shot benchmark (``benchmarks/fewshot.py``) uses the same encoder and head task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fqa.device import CPU, Placement
from fqa.tasks.base import ClassifierTask

# ---------------------------------------------------------------------------- features


def load_backbone(config, checkpoint) -> nn.Module:
    """The config's timm model with ``checkpoint``'s weights (its classifier is unused)."""
    from fqa.tasks.models import create_timm_model, load_weights

    backbone = create_timm_model(
        config.model.name, len(config.pretrain.classes), config.model.kwargs
    )
    if checkpoint is not None:
        load_weights(backbone, checkpoint, reset_head=True)
    return backbone.eval()


def block_features(backbone: nn.Module, images: torch.Tensor, input_size: int, block: int):
    """The patch tokens after block ``block`` for each image, flattened: [n, E]."""
    from fqa.tasks.features import encode_in_batches
    from fqa.tasks.image_classification import _prepare_images

    depth = len(backbone.blocks)
    if not 0 <= block < depth:
        raise ValueError(
            f"feature block {block} but the backbone has blocks 0..{depth - 1}; "
            "pick one in that range (task.feature_block, or --feature-block)"
        )

    def tokens(x: torch.Tensor) -> torch.Tensor:
        out = backbone.forward_intermediates(
            x, indices=[block], norm=False, intermediates_only=True
        )
        return out[0].flatten(1)

    return encode_in_batches(tokens, _prepare_images(images, input_size)).float()


def standardise(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-dimension standardisation with ``reference``'s mean and std (source rows)."""
    return (features - reference.mean(0)) / (reference.std(0) + 1e-6)


def make_head(features: int, hidden: int, classes: int, seed: int) -> nn.Module:
    """A fresh head from the seed: Linear-GELU-Linear, or one Linear when hidden=0."""
    torch.manual_seed(seed)
    if hidden == 0:
        return nn.Sequential(nn.Linear(features, classes))
    return nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, classes))


# ---------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class FeatureSplit:
    ids: np.ndarray  # int64 [n]: global row ids
    features: torch.Tensor  # float32 [n, E]
    labels: torch.Tensor  # int64 [n]


class FeatureHeadTask(ClassifierTask):
    """Classification by a trainable head over fixed features, addressed by global id."""

    def __init__(
        self, head: nn.Module, splits: dict[str, FeatureSplit], placement: Placement = CPU
    ) -> None:
        self.placement = placement
        self.model = head.eval().to(placement.device)
        self._ids = {name: s.ids for name, s in splits.items()}
        self._x = {name: placement.put(s.features) for name, s in splits.items()}
        self._y = {name: placement.put(s.labels) for name, s in splits.items()}
        # id -> training row, one array lookup per batch
        train = self._ids["train"]
        self._row = np.full(int(train.max()) + 1 if len(train) else 0, -1, dtype=np.int64)
        self._row[train] = np.arange(len(train))

    def split_ids(self, split: str) -> np.ndarray:
        return self._ids[split]

    def train_ids(self) -> np.ndarray:
        return self._ids["train"]

    def _rows(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.asarray(ids, dtype=np.int64)
        known = ids < len(self._row)
        rows = np.where(known, self._row[np.where(known, ids, 0)], -1)
        if (rows < 0).any():
            raise KeyError(f"ids not in the training set: {ids[rows < 0][:5].tolist()}")
        rows = torch.from_numpy(rows).to(self.placement.device)
        return self._x["train"][rows], self._y["train"][rows]

    def evaluate(self, split: str) -> dict[str, float]:
        with torch.inference_mode():
            logits = self._logits(self._x[split])
            y = self._y[split]
            return {
                "loss": float(F.cross_entropy(logits, y)),
                "accuracy": float((logits.argmax(-1) == y).float().mean()),
            }


def build_backbone_features_task(config, splits, num_classes: int) -> FeatureHeadTask:
    """The task from the config: ``splits`` hold the target classes (``data.classes``,
    relabelled); the source classes' training rows are read for the statistics."""
    from fqa.config import with_overrides
    from fqa.device import resolve
    from fqa.setup import load_data

    placement = resolve(config.run.device, config.run.precision)  # fails before any work
    source = sorted(config.pretrain.classes)
    target = config.data.classes
    if target is None:
        raise ValueError(
            "task.name=backbone_features needs data.classes: the target classes, disjoint "
            f"from pretrain.classes={source} (e.g. the other classes of the dataset)"
        )
    overlap = sorted(set(target) & set(source))
    if overlap:
        raise ValueError(
            f"data.classes={target} and pretrain.classes={source} share {overlap}: the target "
            "task must hold only classes the backbone never saw; remove them from one list"
        )
    if config.pretrain.enabled and not config.model.checkpoint:
        from fqa.backprop import ensure_pretrained

        checkpoint = ensure_pretrained(config, progress=False)
    else:
        checkpoint = config.model.checkpoint  # None: the seeded random backbone
    torch.manual_seed(config.run.seed)  # a random backbone (no checkpoint) is seeded too
    backbone = load_backbone(config, checkpoint)
    block, size = config.task.feature_block, config.model.input_size
    source_splits, _ = load_data(with_overrides(config, {"data.classes": source}))
    reference = block_features(backbone, source_splits["train"].images, size, block)
    features = {
        name: FeatureSplit(
            ids=ds.ids.numpy().astype(np.int64),
            features=standardise(block_features(backbone, ds.images, size, block), reference),
            labels=ds.labels.long(),
        )
        for name, ds in splits.items()
    }
    width = features["train"].features.shape[1]
    head = make_head(width, config.task.head_hidden, num_classes, config.run.seed)
    return FeatureHeadTask(head, features, placement)
