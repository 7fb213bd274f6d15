"""``clip_align``: align an open_clip model's image and text towers from image–caption pairs.

Alignment parameters (``trainable.mode: head``): one ``nn.Linear(E, E)`` head on each
tower's projected features, initialised to the identity, so training starts from the
given CLIP model exactly; with ``task.align_rank: r`` the heads are instead the identity
plus a low-rank adapter B·A (A trained from zero, B fixed random, as ``lora_fixed_up``). The towers are frozen and their features cached per
datapoint, so a query costs two E×E matmuls per contrast member. ``trainable.mode:
full`` trains the towers instead (heads fixed at identity; the backpropagation
pretraining uses it) and computes features through the towers on every call.

Per-datapoint loss. The training set is cut once, by ``run.seed``, into contrast
groups of ``task.contrast_size`` pairs (classes interleaved where labels exist, so a
group rarely holds two captions of one class). Datapoint i's loss is the symmetric
InfoNCE term of its pair inside its group:

    l_i = ½ [CE(s·f(x_i)·g(T_G)ᵀ, i) + CE(s·g(t_i)·f(X_G)ᵀ, i)]

The mean of l_i over a group is exactly open_clip's ``ClipLoss`` on that group
(tested). Groups instead of the step's batch keep l_i a fixed function of i, so the
pre-pass, every perturbed query, every cluster worker and the backpropagation
reference agree on it, and the 1/n_i-weighted estimate stays unbiased. Each query
re-embeds its whole group through the heads (one [rows, G, E] call per head), so
``lr`` noise reaches the negatives too and its estimate covers every path of l_i.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fqa.captions import captions_of, class_names_of, class_prompts
from fqa.config import Config
from fqa.data import ImageDataset
from fqa.device import cpu_only
from fqa.tasks.base import Task
from fqa.tasks.clip_models import (
    context_length,
    create_clip_model,
    encode_images,
    load_clip_weights,
    tokenizer_for,
)
from fqa.tasks.features import FeatureCache, encode_in_batches
from fqa.tasks.trainable import LoRALinear

_GROUP_PURPOSE = 0x434C4950  # seeds the contrast grouping apart from fqa.seeding's purposes


def contrast_groups(
    n: int, labels: np.ndarray | None, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """members [K, size] (row positions) and each row's own group; a pure function of seed."""
    if size < 2 or size > n:
        raise ValueError(
            f"task.contrast_size={size} must be in [2, {n}] (the training pairs available)"
        )
    order = np.random.default_rng([seed, _GROUP_PURPOSE]).permutation(n)
    if labels is not None:
        # k-th member of each class gets rank k: sorting by rank interleaves the classes
        ranks = np.empty(n, dtype=np.int64)
        for c in np.unique(labels):
            rows = order[labels[order] == c]
            ranks[rows] = np.arange(len(rows))
        order = order[np.argsort(ranks[order], kind="stable")]
    groups = -(-n // size)
    padded = np.concatenate([order, order[: groups * size - n]])  # the last group borrows negatives
    members = padded.reshape(groups, size)
    own = np.empty(n, dtype=np.int64)
    own[order] = np.arange(n) // size
    return members, own


def pair_losses(
    image: torch.Tensor, text: torch.Tensor, target: torch.Tensor, scale
) -> torch.Tensor:
    """Symmetric InfoNCE term of member ``target`` of each row's group; image/text [R, G, E]."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    rows = torch.arange(len(target))
    logits_image = scale * torch.einsum("re,rge->rg", image[rows, target], text)
    logits_text = scale * torch.einsum("re,rge->rg", text[rows, target], image)
    return 0.5 * (
        F.cross_entropy(logits_image, target, reduction="none")
        + F.cross_entropy(logits_text, target, reduction="none")
    )


def retrieval_recall(image: torch.Tensor, text: torch.Tensor, captions: list[str], ks=(1, 5)):
    """Recall@k both ways; identical caption texts count as the same (relevant) caption.

    image→text ranks the split's distinct captions; text→image asks whether any of the
    top-k images carries this caption. Features must be normalised.
    """
    unique, inverse = np.unique(np.asarray(captions), return_inverse=True)
    inverse = torch.as_tensor(inverse)
    first = torch.as_tensor(
        [int(np.flatnonzero(inverse.numpy() == u)[0]) for u in range(len(unique))]
    )
    sim = image @ text[first].T  # [n, U]
    out = {}
    for k in ks:
        top = sim.topk(min(k, len(unique)), dim=1).indices
        out[f"i2t_r{k}"] = float((top == inverse[:, None]).any(1).float().mean())
        top_images = (text @ image.T).topk(min(k, len(image)), dim=1).indices  # [n, k]
        out[f"t2i_r{k}"] = float((inverse[top_images] == inverse[:, None]).any(1).float().mean())
    return out


class AlignModel(nn.Module):
    """The CLIP model plus one identity-initialised alignment head per tower."""

    def __init__(self, clip: nn.Module, rank: int | None = None) -> None:
        super().__init__()
        self.clip = clip
        dim = int(clip.text_projection.shape[1])
        heads = []
        for _ in range(2):
            head = nn.Linear(dim, dim)
            nn.init.eye_(head.weight)
            nn.init.zeros_(head.bias)
            if rank is not None:
                # identity + B·A with B fixed random, A zero-initialised: lr noise enters
                # only at the rank-r bottleneck (fewer noise dimensions, lower variance)
                head = LoRALinear(head.requires_grad_(False), rank, float(rank), fixed_up=True)
                head.lora_b.requires_grad_(False)
            heads.append(head)
        self.image_head, self.text_head = heads
        self.trainable_heads = [
            n for n, p in self.named_parameters() if not n.startswith("clip.") and p.requires_grad
        ]

    def scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()


class ClipAlignTask(Task):
    primary_metric = "i2t_r1"

    def __init__(
        self,
        model: AlignModel,
        splits: dict[str, ImageDataset],
        captions: dict[str, list[str]],
        class_names: list[str],
        prompt_templates: list[str],
        contrast_size: int,
        seed: int,
        frozen_towers: bool,
        tokenizer,
    ) -> None:
        self.model = model.eval()
        self._splits = splits
        self._captions = captions
        self._labels = {
            s: None if d.labels is None else d.labels.numpy() for s, d in splits.items()
        }
        self._tokens = {s: tokenizer(c) for s, c in captions.items()}
        self._prompts = tokenizer(
            [p for row in class_prompts(class_names, prompt_templates) for p in row]
        )
        self.num_templates, self.num_classes = len(prompt_templates), len(class_names)
        self.frozen_towers = frozen_towers
        self._groups = {
            s: contrast_groups(len(d), self._labels[s], min(contrast_size, len(d)), seed)
            for s, d in splits.items()
        }
        clip = model.clip
        self._image_cache = FeatureCache(
            lambda s: encode_in_batches(lambda x: encode_images(clip, x), splits[s].images)
        )
        self._text_cache = FeatureCache(
            lambda s: encode_in_batches(clip.encode_text, self._tokens[s])
        )

    def train_ids(self) -> np.ndarray:
        return self._splits["train"].ids.numpy()

    # ---- features -----------------------------------------------------------------------
    def _tower_features(self, split: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen_towers:
            return self._image_cache[split][rows], self._text_cache[split][rows]
        clip = self.model.clip
        return (
            encode_images(clip, self._splits[split].images[rows]),
            clip.encode_text(self._tokens[split][rows]),
        )

    def _group_losses(self, positions: torch.Tensor, split: str = "train") -> torch.Tensor:
        members, own = self._groups[split]
        groups = torch.as_tensor(members[own[positions.numpy()]])  # [R, G]
        target = (groups == positions[:, None]).int().argmax(1)
        unique, inverse = torch.unique(groups, return_inverse=True)
        image, text = self._tower_features(split, unique)
        # one call per head on [R, G, E]: lr hooks see one row per query
        image = self.model.image_head(image[inverse])
        text = self.model.text_head(text[inverse])
        return pair_losses(image, text, target, self.model.scale())

    def _positions(self, ids: np.ndarray, split: str = "train") -> torch.Tensor:
        return self._splits[split].positions(torch.as_tensor(np.asarray(ids), dtype=torch.long))

    # ---- the Task interface -----------------------------------------------------------
    def losses(self, ids: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return self._group_losses(self._positions(ids))

    def backprop_loss(self, ids: np.ndarray) -> torch.Tensor:
        positions = self._positions(ids)
        if not self.frozen_towers:
            # tower training (the pretraining): open_clip's in-batch loss, one forward per
            # pair instead of one per contrast member — a pretrained model is all it makes
            image, text = self._embedded("train", positions)
            return pair_losses(
                image.expand(len(ids), -1, -1),
                text.expand(len(ids), -1, -1),
                torch.arange(len(ids)),
                self.model.scale(),
            ).mean()
        return self._group_losses(positions).mean()

    def prepass(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        positions = self._positions(ids)
        with torch.inference_mode():
            loss = self._group_losses(positions)
            image, text = self._embedded("train", positions)
            members, own = self._groups["train"]
            groups = torch.as_tensor(members[own[positions.numpy()]])
            _, all_text = self._embedded("train", groups.reshape(-1))
            sims = torch.einsum("re,rge->rg", image, all_text.view(*groups.shape, -1))
            correct = groups[torch.arange(len(groups)), sims.argmax(1)] == positions
        return {"loss": loss.double().cpu().numpy(), "correct": correct.cpu().numpy()}

    def _embedded(self, split: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, text = self._tower_features(split, rows)
        return (
            F.normalize(self.model.image_head(image), dim=-1),
            F.normalize(self.model.text_head(text), dim=-1),
        )

    def class_text_features(self) -> torch.Tensor:
        """[C, E] zero-shot classifier: the mean normalised feature over templates."""
        feats = F.normalize(
            self.model.text_head(self.model.clip.encode_text(self._prompts)), dim=-1
        )
        feats = feats.view(self.num_templates, self.num_classes, -1).mean(0)
        return F.normalize(feats, dim=-1)

    def evaluate(self, split: str) -> dict[str, float]:
        rows = torch.arange(len(self._splits[split]))
        with torch.inference_mode():
            image, text = self._embedded(split, rows)
            loss = float(self._group_losses(rows, split).mean())
            metrics = {"loss": loss, **retrieval_recall(image, text, self._captions[split])}
            labels = self._labels[split]
            if labels is not None:
                predicted = (image @ self.class_text_features().T).argmax(1).cpu().numpy()
                metrics["accuracy"] = float((predicted == labels).mean())
        return metrics


def clip_from_config(config: Config) -> nn.Module:
    """The open_clip model the config names, with its local weights loaded."""
    torch.manual_seed(config.run.seed)  # random initialisation is part of the run's seed
    clip = create_clip_model(config.model.name, config.model.pretrained, config.model.kwargs)
    if config.model.checkpoint:
        load_clip_weights(clip, config.model.checkpoint)
    return clip


def build_clip_align_task(config: Config, splits: dict[str, ImageDataset]) -> ClipAlignTask:
    task_cfg, mode = config.task, config.trainable.mode
    cpu_only(config.run.device, config.run.precision, "task.name=clip_align")
    if mode not in ("head", "full"):
        raise ValueError(
            f"trainable.mode={mode!r} is not supported by clip_align; use 'head' (alignment "
            "heads on frozen, cached tower features) or 'full' (the towers themselves)"
        )
    if config.estimator.name == "lr" and mode != "head":
        raise ValueError(
            "clip_align with the lr estimator needs trainable.mode=head (noise goes into the "
            "alignment heads); use estimator.name=spsa to perturb the towers"
        )
    class_names = class_names_of(splits["train"])
    captions = {
        s: captions_of(d, task_cfg.caption_templates if s == "train" else None, class_names)
        for s, d in splits.items()
    }
    clip = clip_from_config(config)
    tokenizer = tokenizer_for(config.model.name)
    check_token_lengths(
        tokenizer, context_length(clip), [c for cs in captions.values() for c in cs]
    )
    model = AlignModel(clip, task_cfg.align_rank)
    heads = set(model.trainable_heads)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("clip.") if mode == "full" else name in heads)
    return ClipAlignTask(
        model,
        splits,
        captions,
        class_names,
        list(task_cfg.prompt_templates),
        task_cfg.contrast_size,
        config.run.seed,
        frozen_towers=mode == "head",
        tokenizer=tokenizer,
    )


def check_token_lengths(tokenizer, limit: int, texts: list[str]) -> None:
    """Captions longer than the text tower's context would be silently truncated: refuse."""
    worst = max(set(texts), key=lambda t: len(tokenizer.encode(t)))
    needed = len(tokenizer.encode(worst)) + 2  # start and end tokens
    if needed > limit:
        raise ValueError(
            f"caption {worst!r} needs {needed} tokens but the text tower's context length is "
            f"{limit}; shorten the captions or use a model with a longer context"
        )
