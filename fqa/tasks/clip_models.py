"""open_clip models by name: a hub tag or a local weights file, or the project's tiny CLIP.

``create_clip_model`` accepts any name ``open_clip.list_models()`` knows, plus the
small configs registered here (``fqa-clip-tiny``: 2-layer, width-64 towers for 8×8
digits, randomly initialised or pretrained by backpropagation on a disjoint source
task). ``pretrained`` is an open_clip tag (needs the network) or a local file; a local
``.safetensors`` state dict (e.g. the project's cached pretraining) goes through
``load_clip_weights``. Every failure is a ``ValueError``/``CheckpointError`` that
names the value and the fix, raised before any training.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fqa.checkpoint import CheckpointError
from fqa.tasks.models import read_safetensors

# Small enough for tests and the 2-core demo; the BPE vocabulary is open_clip's own
# (bundled with the package), so real words such as "three" are single tokens.
PROJECT_CONFIGS: dict[str, dict[str, Any]] = {
    "fqa-clip-tiny": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 8,
            "patch_size": 2,
            "width": 64,
            "layers": 2,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 64,
            "heads": 4,
            "layers": 2,
        },
    },
}


def register_project_configs() -> None:
    """Make the project's configs known to open_clip (its registry is a module dict)."""
    from open_clip import factory

    for name, cfg in PROJECT_CONFIGS.items():
        factory._MODEL_CONFIGS.setdefault(name, copy.deepcopy(cfg))


def list_clip_models() -> list[str]:
    import open_clip

    register_project_configs()
    return open_clip.list_models()


def create_clip_model(name: str, pretrained: bool | str = False, overrides: dict | None = None):
    """An open_clip CLIP model in eval mode; ``overrides`` patch its config (e.g. layers)."""
    import open_clip
    from open_clip import factory

    register_project_configs()
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.split("-")[0].lower() in m.lower()][:8]
        raise ValueError(
            f"unknown open_clip model {name!r}; known names include "
            f"{', '.join(close or list(PROJECT_CONFIGS))} (see fqa.tasks.clip_models.list_clip_models())"
        )
    if pretrained is True:
        raise ValueError(
            f"model.pretrained=true is ambiguous for open_clip model {name!r}; give a tag "
            "(e.g. 'openai', needs the network) or a local weights file path"
        )
    tag = pretrained or None
    if isinstance(tag, str) and not Path(tag).exists():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tag not in tags:
            raise CheckpointError(
                f"model.pretrained={tag!r} is neither a local file nor a known tag of {name!r} "
                f"(tags: {tags or 'none'}); give an existing weights file"
            )
    if isinstance(tag, str) and Path(tag).suffix == ".safetensors":
        # our own state dicts (e.g. "clip."-prefixed pretraining) load through our checker
        model = create_clip_model(name, False, overrides)
        load_clip_weights(model, tag)
        return model
    cfg = factory.get_model_config(name)
    for key, value in (overrides or {}).items():
        if key not in cfg:
            raise ValueError(
                f"model.kwargs key {key!r} is not an open_clip config field of {name!r} "
                f"(fields: {sorted(cfg)}); CLIP tasks take config overrides, not timm kwargs: "
                "set model.kwargs: {} or e.g. {text_cfg: {layers: 1}}"
            )
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    try:
        model = open_clip.create_model(
            name if not overrides else _registered(name, cfg),
            pretrained=tag,
            load_weights=bool(tag),
        )
    except (RuntimeError, OSError, ValueError, KeyError, EOFError) as exc:
        raise CheckpointError(
            f"open_clip could not build {name!r} with pretrained={tag!r} ({exc}); check that the "
            "weights file is readable and belongs to this model"
        ) from None
    return model.eval()


def _registered(name: str, cfg: dict) -> str:
    """Register an overridden config under a derived name (open_clip builds by name)."""
    import hashlib
    import json

    from open_clip import factory

    derived = (
        f"{name}-fqa-{hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]}"
    )
    factory._MODEL_CONFIGS[derived] = copy.deepcopy(cfg)
    return derived


def load_clip_weights(model: nn.Module, path: str | Path) -> None:
    """Load a CLIP state dict, bare or saved from a task model (keys prefixed ``clip.``)."""
    state = read_safetensors(path)
    if any(k.startswith("clip.") for k in state):
        state = {k.removeprefix("clip."): v for k, v in state.items() if k.startswith("clip.")}
    own = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        details = (
            mismatched + [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
        )
        raise CheckpointError(
            f"weights file {path} does not fit this CLIP model ({'; '.join(details[:6])}); it "
            "was saved from another model — check model.name and model.kwargs"
        )
    model.load_state_dict(state)


def tokenizer_for(name: str):
    import open_clip

    register_project_configs()
    return open_clip.get_tokenizer(name)


def context_length(model: nn.Module) -> int:
    return int(model.positional_embedding.shape[0])


def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Gray [n, 1, h, w] in [0, 1] -> the image tower's projected features [n, E]."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    if images.shape[-1] != size or images.shape[-2] != size:
        images = nn.functional.interpolate(images, size=(size, size), mode="bilinear")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)  # open_clip's patch embedding takes RGB
    return model.encode_image((images - 0.5) / 0.5)
