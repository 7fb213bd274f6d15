"""Backpropagation: the reference fine-tuning, and the pretraining that stands in for hub weights."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from fqa.config import Config, with_overrides
from fqa.progress import Progress
from fqa.setup import BatchSampler, build_optimizer, build_task, set_learning_rate
from fqa.storage import Remote, location, scratch_dir

log = logging.getLogger(__name__)

# One backpropagation step costs about three forward passes per datapoint (forward,
# backward through activations, weight gradients): its queries in forward equivalents.
BACKPROP_FORWARD_EQUIVALENTS = 3


class BackpropReference:
    """The backpropagation reference one step at a time, like ``Trainer.step()``: the same
    batches, optimizer and schedule, with queries counted in forward equivalents."""

    def __init__(self, config: Config, task=None) -> None:
        self.config = config
        self.task = task if task is not None else build_task(config)
        self.params = [p for _, p in self.task.trainable_parameters()]
        self.optimizer = build_optimizer(config, self.params)
        self.sampler = BatchSampler(self.task.train_ids(), config.train.batch_size, config.run.seed)
        self.global_step = 0
        self.queries = 0
        self.task.model.eval()  # same (dropout-free) behaviour as the forward-only queries

    def step(self) -> dict[str, float]:
        step, ids = self.global_step, self.sampler.batch(self.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self.task.backprop_loss(ids)
            loss.backward()
        set_learning_rate(self.optimizer, self.config, step)
        self.optimizer.step()
        self.global_step += 1
        self.queries += len(ids) * BACKPROP_FORWARD_EQUIVALENTS
        return {"step": step, "loss": float(loss.detach()), "queries": self.queries}


def train_backprop(
    task, config: Config, steps: int, progress: bool = True, label: str = "backprop"
) -> dict:
    """Fine-tune the task's trainable parameters with autograd; returns metrics."""
    reference = BackpropReference(config, task)
    started = time.perf_counter()
    with Progress(steps, label, enabled=progress, every=config.train.log_every) as bar:
        for _ in range(steps):
            bar.update(1, loss=f"{reference.step()['loss']:.3f}")
    test = task.evaluate("test")
    return {
        "run": label,
        "estimator": "backprop",
        "allocator": "-",
        "steps": steps,
        "queries": reference.queries,
        **{f"test_{k}": v for k, v in test.items()},  # accuracy, loss and task metrics
        "val_accuracy": task.evaluate("validation")["accuracy"],
        "seconds": time.perf_counter() - started,
    }


def pretrain_config(config: Config) -> Config:
    """The source task: the pretrain classes only, all parameters, backpropagation."""
    pre = config.pretrain
    # a backbone for image classification (backbone_features reads its tokens) ...
    task = {"task.name": "image_classification"}
    if config.task.name.startswith("clip_"):
        # ... or CLIP: contrastive pretraining of the towers, whichever task follows
        task = {"task.name": "clip_align", "estimator.name": "spsa"}
    return with_overrides(
        config,
        {
            "data.classes": list(pre.classes),
            "model.checkpoint": None,
            "model.pretrained": False,
            "trainable.mode": "full",
            "train.optimizer": "adamw",
            "train.lr": pre.lr,
            "train.batch_size": pre.batch_size,
            "estimator.name": "lr",
            "allocator.name": "uniform",
            **task,
        },
    )


def ensure_pretrained(config: Config, progress: bool = True) -> Path | Remote:
    """Pretrain the backbone on the source classes once; later runs reuse the cached file."""
    source = pretrain_config(config)
    fields = ("run.seed", "data", "model", "pretrain")
    if config.task.name.startswith("clip_"):
        fields += ("task.name", "task.caption_templates")
    key = source.fingerprint(fields)
    path = location(config.pretrain.cache_dir) / f"pretrain-{key}.safetensors"
    if path.is_file():
        log.info("pretrained weights from the cache: %s", path)
        return path
    task = build_task(source)
    steps_per_epoch = max(1, len(task.train_ids()) // source.train.batch_size)
    metrics = train_backprop(
        task, source, config.pretrain.epochs * steps_per_epoch, progress, "pretrain"
    )
    log.info(
        "pretrained on classes %s: test accuracy %.3f",
        config.pretrain.classes,
        metrics["test_accuracy"],
    )
    state = {k: v.contiguous() for k, v in task.model.state_dict().items()}
    if isinstance(path, Remote):  # one object upload is atomic; the metrics file first
        staged = scratch_dir("fqa-pretrain-") / path.name
        save_file(state, str(staged))
        (path.parent / f"pretrain-{key}.json").write_text(json.dumps(metrics, indent=1))
        path.upload(staged)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(metrics, indent=1))
    return path


def with_pretrained(config: Config) -> Config:
    """The config with its cached pretrained backbone as ``model.checkpoint``: pretraining
    (single process) happens before any trainer, worker or trial builds a replica."""
    if not config.pretrain.enabled or config.model.checkpoint:
        return config
    checkpoint = ensure_pretrained(config, config.train.progress)
    if isinstance(checkpoint, Path):  # workers and trials must not depend on this cwd
        checkpoint = checkpoint.resolve()
    return with_overrides(config, {"model.checkpoint": str(checkpoint), "pretrain.enabled": False})
