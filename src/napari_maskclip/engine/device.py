"""Choosing the compute device and precision.

``auto`` picks CUDA, then Apple's MPS, then the CPU. Half precision is used only on GPUs (fp16, or
bf16 where the GPU supports it and the user asks); on the CPU, half precision is slower and less
exact, so the CPU always runs fp32.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError

__all__ = ["resolve_device", "resolve_dtype"]

_PRECISIONS = {"auto", "fp32", "fp16", "bf16"}


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
    """fp32 on the CPU; on a GPU, fp16 by default or what ``precision`` asks for."""
    precision = (precision or "auto").lower()
    if precision not in _PRECISIONS:
        raise InvalidInputError(f"Unknown precision {precision!r}: use one of {sorted(_PRECISIONS)}.")
    if device.type == "cpu" or precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    return torch.float16
