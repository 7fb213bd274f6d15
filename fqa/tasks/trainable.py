"""Which parameters are trained: full, head, last blocks, or low-rank adapters (LoRA)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen Linear plus a low-rank update ``scale * B(A(x))``.

    A and B are plain ``nn.Linear`` modules, so the LR estimator's forward hooks see
    them like any other Linear layer. One factor starts at zero, so the model is
    unchanged at start. With ``fixed_up`` the up-projection B is a fixed random matrix
    and only A (zero-initialised) trains: noise then enters only at the rank-r
    bottleneck, which keeps the LR estimator's variance small (docs/METHOD.md §2).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, fixed_up: bool = False) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        self.fixed_up = fixed_up
        if fixed_up:
            nn.init.zeros_(self.lora_a.weight)
            nn.init.normal_(self.lora_b.weight, std=1.0 / math.sqrt(rank))
        else:
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


def add_lora(
    model: nn.Module, rank: int, alpha: float, fixed_up: bool = False, blocks: int | None = None
) -> int:
    """Wrap every Linear inside the last ``blocks`` blocks (all if None) with a LoRA adapter."""
    wrapped = 0
    all_blocks = list(_blocks(model))
    for block in all_blocks[-blocks:] if blocks else all_blocks:
        targets = [
            (parent, name, child)
            for parent in block.modules()
            for name, child in parent.named_children()
            if isinstance(child, nn.Linear)
        ]
        for parent, name, child in targets:
            setattr(parent, name, LoRALinear(child, rank, alpha, fixed_up))
            wrapped += 1
    return wrapped


def select_trainable(model: nn.Module, mode: str, blocks: int = 1) -> list[str]:
    """Set ``requires_grad`` by mode; returns the trainable parameter names."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if mode in ("head", "last_blocks", "lora") and not isinstance(head, nn.Module):
        raise ValueError(
            f"{type(model).__name__} exposes no classifier head; use trainable.mode full"
        )
    for param in model.parameters():
        param.requires_grad_(mode == "full")
    if mode in ("head", "last_blocks", "lora"):
        head.requires_grad_(True)
    if mode == "last_blocks":
        all_blocks = _blocks(model)
        if blocks > len(all_blocks):
            raise ValueError(
                f"trainable.blocks={blocks} but the model has {len(all_blocks)} blocks"
            )
        for block in list(all_blocks)[-blocks:]:
            block.requires_grad_(True)
        norm = getattr(model, "norm", None)
        if isinstance(norm, nn.Module):
            norm.requires_grad_(True)
    if mode == "lora":
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_a.requires_grad_(True)
                module.lora_b.requires_grad_(not module.fixed_up)
    return [name for name, param in model.named_parameters() if param.requires_grad]
