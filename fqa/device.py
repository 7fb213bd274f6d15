"""Where a replica computes and in what precision: ``run.device`` and ``run.precision``.

``auto`` is the GPU when one is visible — inside a Ray actor started with ``num_gpus``,
Ray sets CUDA_VISIBLE_DEVICES, so ``cuda:0`` is that actor's own GPU — else the CPU.
Everything impossible here is refused with one clear error before any work.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class DeviceError(ValueError):
    """A device or precision this machine cannot provide; the message names the fix."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    precision: str = "fp32"

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def autocast(self):
        """Forward passes in the compute dtype; master weights stay fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host-side data, pinned when batches go to a GPU (non-blocking copies)."""
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)


CPU = Placement(torch.device("cpu"))


def resolve(device: str = "auto", precision: str = "fp32") -> Placement:
    """``run.device``/``run.precision`` -> a Placement, or a DeviceError naming the fix."""
    if precision not in DTYPES:
        raise DeviceError(f"run.precision={precision!r} is not one of {sorted(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "run.device='cuda' but torch sees no CUDA GPU here (torch.cuda.is_available() is "
                "False; on Ray, give the worker cluster.gpus_per_worker > 0); use run.device: auto "
                "or cpu"
            )
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise DeviceError(
                f"run.precision='bf16' but {torch.cuda.get_device_name(0)} has no bfloat16 "
                "support; use run.precision: fp32"
            )
        return Placement(torch.device("cuda", 0), precision)
    if device == "cpu":
        return Placement(torch.device("cpu"), precision)  # CPU autocast supports bf16
    raise DeviceError(f"run.device={device!r} is not one of auto, cpu, cuda")


def resolution(dtype: torch.dtype) -> float:
    """Relative spacing of representable numbers (2^-7 for bf16, 2^-23 for fp32)."""
    return float(torch.finfo(dtype).eps)


def cpu_only(device: str, precision: str, what: str) -> Placement:
    """For tasks not yet placed on a GPU: ``auto`` means the CPU, anything else is refused."""
    if device == "cuda" or precision != "fp32":
        raise DeviceError(
            f"{what} runs on the CPU in fp32 only so far (got run.device={device!r}, "
            f"run.precision={precision!r}); use run.device: auto or cpu and run.precision: fp32"
        )
    return CPU
