"""Choosing the compute device and precision.

``auto`` picks CUDA, then Apple's MPS, then the CPU. The precision of a run (``auto``, fp32, bf16,
fp16) is decided in :mod:`.precision`; here only the dtype the weights are loaded in.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError
from .precision import resolve_precision, weights_dtype

__all__ = ["resolve_device", "resolve_dtype"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` into a usable device."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise InvalidInputError(
            f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps."
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("CUDA was asked for but no CUDA GPU is available; use --device cpu.")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InvalidInputError("MPS was asked for but is not available; use --device cpu.")
    return dev


def resolve_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype a CLIP's weights are loaded in: fp32 on the CPU (half-precision runs there use a
    cast copy); on a GPU, fp16 by default or what ``precision`` asks for."""
    return weights_dtype(device, resolve_precision(device, precision))
