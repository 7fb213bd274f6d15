"""Image classification with any timm model on Parquet image data."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from fqa.config import Config
from fqa.data import ImageDataset
from fqa.device import CPU, Placement, resolve
from fqa.tasks.base import ClassifierTask
from fqa.tasks.models import create_timm_model, load_weights
from fqa.tasks.trainable import add_lora, select_trainable

log = logging.getLogger(__name__)


def _prepare_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to the model's input size and centre pixel values (done once per split)."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return (images - 0.5) / 0.5


class ImageClassificationTask(ClassifierTask):
    def __init__(
        self,
        model: torch.nn.Module,
        splits: dict[str, ImageDataset],
        input_size: int,
        eval_batch: int = 512,
        placement: Placement = CPU,
    ) -> None:
        self.placement = placement
        self.model = model.eval().to(placement.device)  # fp32 master weights
        self.eval_batch = eval_batch
        self.input_size = input_size
        # in-memory splits are prepared once and stay on the host (pinned for a GPU);
        # lazy ones (fqa.lazy_data) are read per batch; each batch is copied non-blocking
        self._inputs = {
            name: placement.host(_prepare_images(ds.images, input_size))
            for name, ds in splits.items()
            if not hasattr(ds, "images_at")
        }
        self._labels = {name: ds.labels for name, ds in splits.items()}
        self._splits = splits
        num_classes = model.get_classifier().out_features
        for name, labels in self._labels.items():
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                raise ValueError(
                    f"{name} split has labels in [{int(labels.min())}, {int(labels.max())}] but the "
                    f"model has {num_classes} classes; check data.classes or the dataset's labels"
                )

    def train_ids(self) -> np.ndarray:
        return self._splits["train"].ids.numpy()

    def _rows(self, ids: np.ndarray, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        positions = self._splits[split].positions(
            torch.as_tensor(np.asarray(ids), dtype=torch.long)
        )
        put = self.placement.put
        return put(self._inputs_at(split, positions)), put(self._labels[split][positions])

    def _inputs_at(self, split: str, positions: torch.Tensor) -> torch.Tensor:
        if split in self._inputs:
            return self._inputs[split][positions]
        return _prepare_images(self._splits[split].images_at(positions), self.input_size)

    def evaluate(self, split: str) -> dict[str, float]:
        labels = self._labels[split]
        total_loss, correct = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(labels), self.eval_batch):
                rows = torch.arange(start, min(start + self.eval_batch, len(labels)))
                put = self.placement.put
                logits = self._logits(put(self._inputs_at(split, rows)))
                target = put(labels[rows])
                total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
                correct += int((logits.argmax(-1) == target).sum())
        n = max(len(labels), 1)
        return {"loss": total_loss / n, "accuracy": correct / n}


def build_image_task(
    config: Config,
    splits: dict[str, ImageDataset],
    num_classes: int,
    estimator_name: str | None = None,
) -> ImageClassificationTask:
    """Model by name, weights from a local file, trainable selection, all from the config."""
    placement = resolve(config.run.device, config.run.precision)  # fails before any work
    torch.manual_seed(config.run.seed)  # model initialisation is part of the run's seed
    model = create_timm_model(
        config.model.name, num_classes, config.model.kwargs, config.model.pretrained
    )
    if config.model.checkpoint:
        load_weights(model, config.model.checkpoint, reset_head=config.model.reset_head)
    if config.trainable.mode == "lora":
        trainable = config.trainable
        add_lora(
            model,
            trainable.lora_rank,
            trainable.lora_alpha,
            trainable.lora_fixed_up,
            None if trainable.lora_all_blocks else trainable.blocks,
        )
    names = select_trainable(model, config.trainable.mode, config.trainable.blocks)
    if not names:
        raise ValueError("no trainable parameters selected; check trainable.mode")
    return ImageClassificationTask(model, splits, config.model.input_size, placement=placement)
