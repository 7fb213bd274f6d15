"""Which parameters are trained: full, head, last blocks, or low-rank adapters (LoRA)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update ``scale * B(A(x))``.

    A and B are plain ``nn.Linear`` modules, so the LR estimator's forward hooks see
    them like any other Linear layer. B starts at zero: the model is unchanged at start.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))


def _blocks(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    blocks = getattr(model, "blocks", None) or getattr(model, "layers", None)
    if blocks is None:
        raise ValueError(
            f"{type(model).__name__} has no .blocks/.layers; trainable.mode last_blocks/lora "
            "need a transformer-style model — use mode full or head"
        )
    return blocks


def add_lora(model: nn.Module, rank: int, alpha: float) -> int:
    """Wrap every Linear inside the blocks (attention and MLP) with a LoRA adapter."""
    wrapped = 0
    for block in _blocks(model):
        targets = [
            (parent, name, child)
            for parent in block.modules()
            for name, child in parent.named_children()
            if isinstance(child, nn.Linear)
        ]
        for parent, name, child in targets:
            setattr(parent, name, LoRALinear(child, rank, alpha))
            wrapped += 1
    return wrapped


def select_trainable(model: nn.Module, mode: str, blocks: int = 1) -> list[str]:
    """Set ``requires_grad`` by mode; returns the trainable parameter names."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if mode in ("head", "last_blocks", "lora") and not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} exposes no classifier head; use trainable.mode full")
    for param in model.parameters():
        param.requires_grad_(mode == "full")
    if mode in ("head", "last_blocks", "lora"):
        head.requires_grad_(True)
    if mode == "last_blocks":
        all_blocks = _blocks(model)
        if blocks > len(all_blocks):
            raise ValueError(f"trainable.blocks={blocks} but the model has {len(all_blocks)} blocks")
        for block in list(all_blocks)[-blocks:]:
            block.requires_grad_(True)
        norm = getattr(model, "norm", None)
        if isinstance(norm, nn.Module):
            norm.requires_grad_(True)
    if mode == "lora":
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_a.requires_grad_(True)
                module.lora_b.requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]
