"""Reading checkpoint files safely.

A checkpoint is only ever read in a way that cannot run code: safetensors files directly,
PyTorch files with ``torch.load(weights_only=True)`` (tensors and plain containers only), and
OpenAI's original TorchScript archives with :mod:`.torchscript`'s reader, which takes their
weights out of the zip without compiling or running any of the archive's code (never
``torch.jit.load``, which runs the modules' ``__setstate__``). A file that needs a full pickle or
code is refused with :class:`~napari_maskclip.errors.UnsafeCheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ModelLoadError, UnsafeCheckpointError

__all__ = [
    "read_state_dict",
    "is_torchscript_archive",
    "file_digest",
    "CHECKPOINT_SUFFIXES",
]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

# Keys found in OpenAI's archives that are metadata, not parameters.
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript zip (OpenAI's original CLIP release format)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _unwrap(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = checkpoint.get(key)
            if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                checkpoint = inner
                break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ModelLoadError(f"{path} holds no state dict of tensors; is it a CLIP checkpoint?")
    state = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = str(key)
        if key.startswith("module."):
            key = key[len("module."):]
        state[key] = value
    if not state:
        raise ModelLoadError(f"{path} holds no tensors; is it a CLIP checkpoint?")
    return state


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint's tensors on the CPU, safely.

    Returns the state dict and its format: ``"safetensors"``, ``"torch"`` or ``"openai-jit"``.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"Checkpoint file not found: {p}")
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(p), device="cpu"), p), "safetensors"
        except Exception as exc:
            raise ModelLoadError(f"Cannot read safetensors file {p}: {exc}") from exc
    if is_torchscript_archive(p):
        from .torchscript import read_torchscript_state_dict

        state = {k: v for k, v in read_torchscript_state_dict(p).items() if k not in _OPENAI_META_KEYS}
        return _unwrap(state, p), "openai-jit"
    try:
        checkpoint = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"Refusing to load {p}: it is not a weights-only checkpoint (it would need to run "
            "arbitrary pickled code). Re-save it as a state dict, e.g. "
            "torch.save(model.state_dict(), 'weights.pt'), or as .safetensors."
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"Cannot read checkpoint {p}: {exc}") from exc
    state = _unwrap(checkpoint, p)
    for key in _OPENAI_META_KEYS:
        state.pop(key, None)
    return state, "torch"


def _digest_memo_path() -> Path:
    from .cache_dir import user_cache_dir

    return user_cache_dir() / "file-digests.json"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, remembered per (path, size, mtime) so it is hashed once."""
    p = Path(path).resolve()
    stat = p.stat()
    memo_key = f"{p}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = _digest_memo_path()
    memo: dict[str, str] = {}
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError, RecursionError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    digest = hashlib.sha256()
    with open(p, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    memo[memo_key] = value
    if len(memo) > 512:  # keep the memo small: drop the oldest entries
        memo = dict(list(memo.items())[-256:])
    try:
        from ..atomic import atomic_write_text

        atomic_write_text(memo_path, json.dumps(memo))
    except OSError:
        pass  # an unwritable cache only costs a re-hash next time
    return value
