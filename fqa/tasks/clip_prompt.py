"""``clip_prompt``: black-box prompt tuning (CoOp-style) of an open_clip model.

The learnable part is a context of token vectors, ``[n_ctx, width]`` shared by all
classes (or ``[C, n_ctx, width]`` with ``task.class_specific``), written over the
token embeddings of ``"<ctx words> <class name>"`` before the text tower. The model
itself is a :class:`PromptBlackBox`: it takes a context and image rows and returns
only their losses — no gradients, no internals — and counts every datapoint loss it
returns (``calls``). Training therefore needs the loss-only ``spsa`` estimator.

Per-datapoint loss: cross-entropy of the image's zero-shot logits over the class
prompts. A query re-encodes the C class prompts under the perturbed context (the
expensive part); the image tower never sees the context, so its features are cached
once per image (``task.cache_features``; ``query_cost`` times both ways).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fqa.captions import class_names_of
from fqa.config import Config
from fqa.data import ImageDataset
from fqa.device import cpu_only
from fqa.tasks.base import Task
from fqa.tasks.clip_align import clip_from_config
from fqa.tasks.clip_models import context_length, encode_images, tokenizer_for
from fqa.tasks.features import FeatureCache, encode_in_batches


class PromptContext(nn.Module):
    """The only trainable state: the context vectors (the task's ``model``)."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.ctx = nn.Parameter(init.clone())


class PromptBlackBox:
    """A frozen CLIP model behind a loss-only interface, with a call counter."""

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        class_names: list[str],
        ctx_words: str,
        splits: dict[str, ImageDataset],
        cache_features: bool,
    ) -> None:
        self._clip = clip.eval().requires_grad_(False)
        self._tokens = tokenizer([f"{ctx_words} {name}" for name in class_names])  # [C, L]
        with torch.no_grad():
            self._embedded = clip.token_embedding(self._tokens)  # [C, L, W]
        self.n_ctx = len(tokenizer.encode(ctx_words))
        self._splits = splits
        self._labels = {s: d.labels for s, d in splits.items()}
        self.cache_features = cache_features
        self._cache = FeatureCache(
            lambda s: encode_in_batches(lambda x: encode_images(clip, x), splits[s].images)
        )
        self.calls = 0  # datapoint losses returned: every query of the black box
        self.text_passes = 0  # class-prompt encodings (one per call of query())

    def context_embeddings(self) -> torch.Tensor:
        """The token embeddings of the context words (the untuned prompt's context)."""
        return self._embedded[0, 1 : 1 + self.n_ctx]

    def _class_features(self, ctx: torch.Tensor) -> torch.Tensor:
        clip = self._clip
        x = self._embedded.clone()
        x[:, 1 : 1 + self.n_ctx] = ctx  # broadcasts a shared context over the classes
        x = x + clip.positional_embedding
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        x = x[torch.arange(len(x)), self._tokens.argmax(-1)]  # the end-of-text token
        self.text_passes += 1
        return F.normalize(x @ clip.text_projection, dim=-1)

    def _image_features(self, split: str, rows: torch.Tensor) -> torch.Tensor:
        if self.cache_features:
            features = self._cache[split][rows]
        else:
            features = encode_images(self._clip, self._splits[split].images[rows])
        return F.normalize(features, dim=-1)

    def reference_loss(self, ctx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Mean training loss with autograd: only for the backpropagation reference that a
        real black box would not allow (the forward-only runs never call it)."""
        logits = self._clip.logit_scale.exp() * (
            self._image_features("train", rows) @ self._class_features(ctx).T
        )
        return F.cross_entropy(logits, self._labels["train"][rows])

    def query(self, ctx: torch.Tensor, split: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image loss (and whether its top class is right) under context ``ctx``."""
        with torch.inference_mode():
            logits = self._clip.logit_scale.exp() * (
                self._image_features(split, rows) @ self._class_features(ctx).T
            )
            labels = self._labels[split][rows]
            self.calls += len(rows)
            return {
                "loss": F.cross_entropy(logits, labels, reduction="none"),
                "correct": logits.argmax(1) == labels,
            }


class ClipPromptTask(Task):
    primary_metric = "accuracy"

    def __init__(
        self, context: PromptContext, black_box: PromptBlackBox, splits: dict[str, ImageDataset]
    ) -> None:
        self.model = context
        self.black_box = black_box
        self._splits = splits

    def train_ids(self) -> np.ndarray:
        return self._splits["train"].ids.numpy()

    def _rows(self, ids: np.ndarray, split: str = "train") -> torch.Tensor:
        return self._splits[split].positions(torch.as_tensor(np.asarray(ids), dtype=torch.long))

    def losses(self, ids: np.ndarray) -> torch.Tensor:
        return self.black_box.query(self.model.ctx.detach(), "train", self._rows(ids))["loss"]

    def backprop_loss(self, ids: np.ndarray) -> torch.Tensor:
        return self.black_box.reference_loss(self.model.ctx, self._rows(ids))

    def prepass(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        out = self.black_box.query(self.model.ctx.detach(), "train", self._rows(ids))
        return {"loss": out["loss"].double().cpu().numpy(), "correct": out["correct"].cpu().numpy()}

    def evaluate(self, split: str) -> dict[str, float]:
        rows = torch.arange(len(self._splits[split]))
        out = self.black_box.query(self.model.ctx.detach(), split, rows)
        return {
            "loss": float(out["loss"].mean()),
            "accuracy": float(out["correct"].float().mean()),
            "black_box_calls": float(self.black_box.calls),
        }

    def query_cost(self, rows: int = 64, repeats: int = 5) -> dict[str, float]:
        """Seconds per datapoint query with cached image features and without."""
        ids = self.train_ids()[:rows]
        box = self.black_box
        box._cache["train"]  # fill the cache first: its one-off cost is not a query's
        out, calls = {}, box.calls
        for cached in (True, False):
            box.cache_features, saved = cached, box.cache_features
            try:
                started = time.perf_counter()
                for _ in range(repeats):
                    self.losses(ids)
                seconds = (time.perf_counter() - started) / (repeats * len(ids))
            finally:
                box.cache_features = saved
            out["cached" if cached else "uncached"] = seconds
        box.calls = calls  # a measurement, not training
        return out


def build_clip_prompt_task(config: Config, splits: dict[str, ImageDataset]) -> ClipPromptTask:
    task_cfg = config.task
    cpu_only(config.run.device, config.run.precision, "task.name=clip_prompt")
    if config.estimator.name != "spsa":
        raise ValueError(
            f"clip_prompt treats the model as a black box that returns only losses; "
            f"estimator.name={config.estimator.name!r} needs its internals — use estimator.name=spsa"
        )
    class_names = class_names_of(splits["train"])
    clip = clip_from_config(config)
    tokenizer = tokenizer_for(config.model.name)
    words = task_cfg.ctx_init or " ".join(["X"] * task_cfg.n_ctx)
    n_ctx = len(tokenizer.encode(words))
    limit = context_length(clip)
    longest = max(class_names, key=lambda name: len(tokenizer.encode(name)))
    needed = 2 + n_ctx + len(tokenizer.encode(longest))
    if needed > limit:
        raise ValueError(
            f"a prompt of {n_ctx} context tokens plus class name {longest!r} needs {needed} tokens "
            f"but the text tower's context length is {limit}; lower task.n_ctx (or shorten "
            "task.ctx_init) to at most "
            f"{limit - 2 - len(tokenizer.encode(longest))}"
        )
    box = PromptBlackBox(clip, tokenizer, class_names, words, splits, task_cfg.cache_features)
    init = box.context_embeddings()
    if task_cfg.ctx_init is None:
        generator = torch.Generator().manual_seed(config.run.seed)
        init = 0.02 * torch.randn(init.shape, generator=generator)  # CoOp's random init
    if task_cfg.class_specific:
        init = init.expand(len(class_names), -1, -1)
    return ClipPromptTask(PromptContext(init), box, splits)
