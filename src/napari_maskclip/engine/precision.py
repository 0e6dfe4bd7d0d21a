"""Numeric precision of a run: ``auto``, ``fp32``, ``bf16`` or ``fp16``, on any device.

``auto`` is bf16 on a CPU with native bf16 arithmetic (AVX512-BF16 or AMX, where it is about twice
as fast as fp32), fp32 on other CPUs (there bf16 is emulated and slower: never chosen by
``auto``), and fp16 on GPUs. Explicit bf16 and fp16 run anywhere this PyTorch supports them.

How: the frozen CLIP's weights are loaded in fp32 on the CPU and a half-precision run uses a copy
of them cast to that precision (:func:`model_in`, made once); on a GPU the weights are cast at
load time as before. The student, whose weights train, runs under ``torch.autocast`` instead (its
loss and optimiser stay fp32). The steps after the encoders (normalisation, cosines, softmax, key
smoothing, denoising) always run in fp32, so thresholds mean the same in every precision.

Torch is imported lazily: the names (:data:`PRECISIONS`) load without it, for UIs and CLIs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from ..errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "PRECISIONS",
    "NATIVE_BF16_FLAGS",
    "CPU_BF16_ENV",
    "check_precision",
    "cpu_flags",
    "cpu_has_native_bf16",
    "resolve_precision",
    "run_precision",
    "precision_dtype",
    "dtype_precision",
    "weights_dtype",
    "resolve_autocast",
    "autocast_context",
    "model_in",
]

#: The values of every ``precision`` setting and ``--precision`` option.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: CPU feature flags (Linux ``/proc/cpuinfo`` names) meaning bf16 runs natively: x86
#: AVX512-BF16, AMX (every AMX CPU has AMX-BF16; torch reports the tile unit as ``amx_tile``),
#: and Arm's BF16 extension (``bf16`` in an aarch64 ``Features`` line).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "amx_tile", "bf16"})
#: Overrides the detection: ``0`` makes ``auto`` pick fp32 on a CPU with native bf16 (results
#: bit-identical to a CPU without it, e.g. for a test suite or a pipeline shared across
#: machines), ``1`` treats the CPU as having it. Unset or any other value: detected.
CPU_BF16_ENV = "NAPARI_MASKCLIP_CPU_BF16"
_ENV_VALUES = {"0": False, "false": False, "no": False, "1": True, "true": True, "yes": True}


def check_precision(precision: Optional[str]) -> str:
    """The precision name in lower case; :class:`InvalidInputError` for an unknown one."""
    name = (precision or "auto").strip().lower()
    if name not in PRECISIONS:
        raise InvalidInputError(
            f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}."
        )
    return name


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags, lower case: ``/proc/cpuinfo`` where it exists, plus what torch's
    own CPU probe reports (which also works where ``/proc`` does not, e.g. on Windows)."""
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(v.lower() for v in value.split())
    try:
        import torch

        probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
        for flag, probe in probes.items():
            check = getattr(torch.cpu, probe, None)
            if check is not None and bool(check()):
                flags.add(flag)
        capability = str(torch.backends.cpu.get_cpu_capability()).lower()
        if "amx" in capability or "bf16" in capability:
            flags.add("amx_bf16" if "amx" in capability else "avx512_bf16")
    except (ImportError, AttributeError, RuntimeError):  # an older torch: /proc alone decides
        pass
    return frozenset(flags)


def cpu_has_native_bf16(flags: Optional[Iterable[str]] = None) -> bool:
    """Whether the CPU computes bf16 natively; ``flags`` simulates a CPU (tests), default: this
    one, unless :data:`CPU_BF16_ENV` says otherwise."""
    if flags is None:
        override = _ENV_VALUES.get(os.environ.get(CPU_BF16_ENV, "").strip().lower())
        if override is not None:
            return override
    found = cpu_flags() if flags is None else {f.lower() for f in flags}
    return bool(NATIVE_BF16_FLAGS & set(found))


@functools.lru_cache(maxsize=1)
def _cpu_fp16_works() -> bool:
    """Whether this PyTorch runs the encoders' operations (and autocast) in fp16 on the CPU."""
    import torch
    import torch.nn.functional as F

    half = torch.float16
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an old torch warns and disables autocast instead
            x = F.conv2d(torch.ones(1, 3, 8, 8, dtype=half), torch.ones(4, 3, 4, 4, dtype=half))
            x = F.layer_norm(x.flatten(2).transpose(1, 2), (4,))
            x = F.linear(x, torch.ones(4, 4, dtype=half)).softmax(dim=-1) @ x.transpose(1, 2)
            with torch.autocast("cpu", dtype=half):
                out = F.linear(torch.ones(2, 2), torch.ones(2, 2))
        return x.dtype == half and out.dtype == half
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False


def resolve_precision(
    device: "torch.device | str", precision: Optional[str] = "auto", *, cpu_bf16: Optional[bool] = None
) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for a run on ``device``.

    ``auto``: bf16 on a CPU with native bf16, fp32 on other CPUs, fp16 on GPUs. ``cpu_bf16``
    tells whether the CPU has native bf16 (default: detected), so tests can simulate a CPU.
    fp16 on the CPU is refused with a clear error where this PyTorch cannot autocast to it.
    """
    name = check_precision(precision)
    kind = device if isinstance(device, str) else device.type
    if kind == "cpu":
        if name == "auto":
            native = cpu_has_native_bf16() if cpu_bf16 is None else bool(cpu_bf16)
            return "bf16" if native else "fp32"
        if name == "fp16" and not _cpu_fp16_works():
            raise InvalidInputError(
                "fp16 on the CPU needs a PyTorch that runs float16 on the CPU (2.4 or newer); "
                "use --precision bf16 or fp32."
            )
        return name
    return "fp16" if name == "auto" else name


def precision_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a resolved precision name."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_precision(dtype: "torch.dtype") -> str:
    """The precision name of a floating-point torch dtype (fp32 for any other)."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def weights_dtype(device: "torch.device", name: str) -> "torch.dtype":
    """The dtype a CLIP's weights are loaded in: fp32 on the CPU (half precision runs use a cast
    copy, :func:`model_in`, so one model serves every precision), ``name``'s on a GPU (as before:
    half the memory)."""
    import torch

    return torch.float32 if device.type == "cpu" else precision_dtype(name)


def run_precision(
    requested: Optional[str], *, device: "torch.device", weights: "torch.dtype", default: str
) -> str:
    """The precision one run uses: ``default`` (the model's, resolved at load) for ``auto``.

    Weights stored in half precision (on a GPU) cannot run another precision; that is an error
    that says how to load them instead.
    """
    name = check_precision(requested)
    if name == "auto":
        return default
    name = resolve_precision(device, name)
    stored = dtype_precision(weights)
    if stored != "fp32" and name != stored:
        raise InvalidInputError(
            f"The model's weights were loaded in {stored} on {device.type}, so it cannot run in "
            f"{name}; load it with precision {name!r} (--precision {name})."
        )
    return name


def resolve_autocast(
    device: "torch.device", precision: Optional[str] = "auto", *, training: bool = False,
    cpu_bf16: Optional[bool] = None,
) -> str:
    """The precision of a network that runs under autocast (the student): ``auto`` is bf16 on a
    CPU with native bf16 and on CUDA GPUs that support bf16, else fp32. fp16 training is refused:
    it needs loss scaling, which training does not do."""
    name = check_precision(precision)
    if name == "fp16" and training:
        raise InvalidInputError(
            "fp16 training needs loss scaling, which the student's training does not do; use "
            "--precision bf16 (or fp32)."
        )
    if name == "auto" and device.type != "cpu":
        import torch

        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    return resolve_precision(device, name, cpu_bf16=cpu_bf16)


def autocast_context(device: "torch.device", name: str):
    """``torch.autocast`` to ``name`` on ``device`` (a no-op for fp32): the student's rule, whose
    weights stay fp32 because it trains them."""
    if name == "fp32":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device.type, dtype=precision_dtype(name))


_COPY_LOCK = threading.Lock()


def model_in(loaded: Any, name: str) -> "nn.Module":
    """A :class:`~.loading.LoadedModel`'s ``model`` with its weights in precision ``name``: the model itself when it holds
    them, else a cast copy made on first use and kept in ``loaded.extra`` (fp32 weights only).

    A frozen CLIP runs half precision with cast weights, not under autocast: autocast leaves
    open_clip's attention off its fused path, and with frozen weights torch then multiplies the
    transposed tokens by a copy of the weight per token (20x slower than fp32 on a CPU).
    """
    import torch

    dtype = precision_dtype(name)
    if loaded.dtype == dtype:
        return loaded.model
    if loaded.dtype != torch.float32:
        raise InvalidInputError(
            f"The model's weights were loaded in {dtype_precision(loaded.dtype)}; load it with "
            f"precision {name!r} (--precision {name}) to run it in {name}."
        )
    with _COPY_LOCK:
        copies = loaded.extra.setdefault("precision_copies", {})
        model = copies.get(name)
        if model is None:
            # The copy's parameters are cast one by one (no second fp32 copy of the model).
            memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
                    for p in loaded.model.parameters()}
            model = copy.deepcopy(loaded.model, memo).to(dtype).eval()
            copies[name] = model
    return model
