"""timm models by name, from random initialisation or a local safetensors file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fqa.checkpoint import CheckpointError

log = logging.getLogger(__name__)


# The smallest ViT of the tests and quick benchmarks: 16x16 single-channel digits, 2 blocks.
TINY_VIT = {
    "img_size": 16,
    "patch_size": 4,
    "in_chans": 1,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
}


def create_timm_model(
    name: str, num_classes: int, kwargs: dict, pretrained: bool | str = False
) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(
            f"unknown timm model {name!r}; examples of known names: {', '.join(close) or 'see timm.list_models()'}"
        )
    options = dict(kwargs)
    if isinstance(pretrained, str):
        # a tag or a local file handed to timm's own loader (a path avoids the hub)
        options["pretrained_cfg_overlay"] = (
            {"file": pretrained} if Path(pretrained).exists() else {"tag": pretrained}
        )
        pretrained = True
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **options)
    except TypeError as exc:
        raise ValueError(
            f"model.kwargs {kwargs} are not accepted by timm model {name!r}: {exc}"
        ) from None
    return model.eval()


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if "://" in str(path):  # object storage: a local copy, downloaded once per process
        from fqa.storage import fetch

        try:
            path = fetch(path)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} does not exist; check model.checkpoint") from None
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist; check model.checkpoint")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint file {path} is not a readable safetensors file ({exc}); "
            "it may be truncated — re-create it or point model.checkpoint elsewhere"
        ) from None


def load_weights(model: nn.Module, path: str | Path, reset_head: bool = True) -> list[str]:
    """Load a state dict into ``model``; returns the keys left at initialisation.

    Every key must match by name and shape, except classifier weights whose shape
    differs when ``reset_head`` (fine-tuning to a new set of classes).
    """
    state = read_safetensors(path)
    own = model.state_dict()
    head_names = _head_parameter_names(model)
    skipped, mismatched = [], []
    for key, tensor in list(state.items()):
        if key in own and own[key].shape != tensor.shape:
            if reset_head and key in head_names:
                skipped.append(key)
                del state[key]
            else:
                mismatched.append(
                    f"{key}: file {tuple(tensor.shape)} vs model {tuple(own[key].shape)}"
                )
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - set(skipped))
    missing = [k for k in missing if not (reset_head and k in head_names)]
    if mismatched or unexpected or missing:
        details = (
            mismatched
            + [f"unexpected {k}" for k in unexpected[:5]]
            + [f"missing {k}" for k in missing[:5]]
        )
        raise CheckpointError(
            f"checkpoint {path} does not fit model ({len(mismatched)} shape mismatches, "
            f"{len(unexpected)} unexpected, {len(missing)} missing keys: {'; '.join(details[:8])}); "
            "it was saved from another model — check model.name and model.kwargs"
        )
    model.load_state_dict(state, strict=False)
    left = sorted(set(own) - set(state))
    if left:
        log.info("initialised fresh (not in checkpoint): %s", ", ".join(left))
    return left


def _head_parameter_names(model: nn.Module) -> set[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if head is None:
        return set()
    prefix = next(name for name, module in model.named_modules() if module is head)
    return {f"{prefix}.{name}" for name, _ in head.named_parameters()}
