"""Backpropagation: the reference fine-tuning, and the pretraining that stands in for hub weights."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fqa.config import Config, with_overrides
from fqa.setup import BatchSampler, build_optimizer, build_task, set_learning_rate
from fqa.storage import Remote, location, scratch_dir

log = logging.getLogger(__name__)

# One backpropagation step costs about three forward passes per datapoint (forward,
# backward through activations, weight gradients): its queries in forward equivalents.
BACKPROP_FORWARD_EQUIVALENTS = 3


def train_backprop(
    task, config: Config, steps: int, progress: bool = True, label: str = "backprop"
) -> dict:
    """Fine-tune the task's trainable parameters with autograd; returns metrics."""
    params = [p for _, p in task.trainable_parameters()]
    optimizer = build_optimizer(config, params)
    sampler = BatchSampler(task.train_ids(), config.train.batch_size, config.run.seed)
    started = time.perf_counter()
    task.model.eval()  # same (dropout-free) behaviour as the forward-only queries
    for step in tqdm(range(steps), disable=not progress, desc=label):
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = task.backprop_loss(sampler.batch(step))
            loss.backward()
        set_learning_rate(optimizer, config, step)
        optimizer.step()
    test = task.evaluate("test")
    return {
        "run": label,
        "estimator": "backprop",
        "allocator": "-",
        "steps": steps,
        "queries": steps * config.train.batch_size * BACKPROP_FORWARD_EQUIVALENTS,
        **{f"test_{k}": v for k, v in test.items()},  # accuracy, loss and task metrics
        "val_accuracy": task.evaluate("validation")["accuracy"],
        "seconds": time.perf_counter() - started,
    }


def pretrain_config(config: Config) -> Config:
    """The source task: the pretrain classes only, all parameters, backpropagation."""
    pre = config.pretrain
    clip = {}
    if config.task.name.startswith("clip_"):
        # CLIP: contrastive pretraining of the towers, whichever task follows
        clip = {"task.name": "clip_align", "estimator.name": "spsa"}
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
            **clip,
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
