"""Build a run's pieces from its config: data, task, estimator, allocator, optimizer.

Shared by the single-process trainer, the backpropagation reference and (later) the
cluster's workers, so every path builds exactly the same objects.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from fqa.allocators import create_allocator
from fqa.config import Config
from fqa.data import ImageDataset, check_splits, ensure_digits, load_splits
from fqa.estimators import Estimator, create_estimator
from fqa.host_memory import retain_freed_memory
from fqa.seeding import derive_seed
from fqa.tasks import create_task

log = logging.getLogger(__name__)


def load_data(config: Config) -> tuple[dict[str, ImageDataset], int]:
    """The train/validation/test splits and the number of classes the head needs."""
    # image classification reads big splits lazily (fqa.lazy_data); CLIP tasks need them in memory
    lazy = config.task.name == "image_classification"
    sizes = {
        "in_memory_mb": config.data.in_memory_mb if lazy else None,
        "cache_mb": config.data.cache_mb,
    }
    if config.data.dataset == "digits":
        splits = ensure_digits(config.data.dir, **sizes)
    else:
        splits = load_splits(config.data.dir, **sizes)
    if config.data.classes is not None:
        splits = {k: v.filter_labels(config.data.classes, relabel=True) for k, v in splits.items()}
    num_classes = splits["train"].num_classes or int(splits["train"].labels.max()) + 1
    return splits, num_classes


def check_data(config: Config) -> None:
    """Fail on missing data before any worker starts (the bundled digits are prepared
    here, once, rather than by every worker at the same time); reads no rows."""
    if config.data.dataset == "digits":
        ensure_digits(config.data.dir)
    else:
        check_splits(config.data.dir)


def prepare_host(config: Config) -> None:
    """The process-wide host settings the config asks for (``run.retain_host_memory``);
    every path that builds a task calls it first."""
    if config.run.retain_host_memory:
        retain_freed_memory()


def build_task(config: Config):
    """The task the config names (``task.name``, see ``fqa.tasks.list_tasks()``), built
    on the configured data."""
    prepare_host(config)
    splits, num_classes = load_data(config)
    return create_task(config.task.name, config=config, splits=splits, num_classes=num_classes)


def configured_estimator(config: Config) -> Estimator:
    """The estimator the config names; enough for planning shards (no model needed)."""
    return create_estimator(**config.estimator.model_dump())


def build_estimator(config: Config, task) -> Estimator:
    """The configured estimator, with the task's model prepared for it; settings the
    task's device or precision cannot honour fail here, before any query."""
    estimator = configured_estimator(config)
    estimator.prepare(task)
    estimator.check(task)
    return estimator


def build_allocator(config: Config):
    return create_allocator(config.allocator.name, **config.allocator.kwargs)


def build_optimizer(config: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    train = config.train
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, config: Config, step: int) -> float:
    """The schedule as a pure function of the step (nothing extra to checkpoint).

    A decaying step size lowers the noise floor that a noisy gradient estimate leaves.
    """
    train = config.train
    progress = min(step / train.steps, 1.0)
    factor = {
        "constant": 1.0,
        "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
        "linear": 1.0 - progress,
    }[train.schedule]
    for group in optimizer.param_groups:
        group["lr"] = train.lr * factor
    return train.lr * factor


class BatchSampler:
    """Epoch-wise shuffled batches as a pure function of (seed, step): nothing to checkpoint."""

    def __init__(self, ids: np.ndarray, batch_size: int, seed: int) -> None:
        if batch_size > len(ids):
            raise ValueError(
                f"train.batch_size={batch_size} is larger than the training set ({len(ids)} "
                f"datapoints); use at most {len(ids)}"
            )
        self.ids = np.asarray(ids, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = len(ids) // batch_size  # the ragged tail is dropped each epoch

    def batch(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.per_epoch)
        order = np.random.default_rng(derive_seed(self.seed, "batch", epoch)).permutation(
            len(self.ids)
        )
        return self.ids[order[index * self.batch_size : (index + 1) * self.batch_size]]
