"""Student checkpoints: one safetensors file, tensors plus a JSON description.

Layout of ``student.safetensors``:

* tensors ``model/<name>``: the network's state dict (weights, batch-norm statistics, and the
  frozen classifier ``model/class_embeddings``, (K+1) x D, row 0 = background);
* tensors ``optimizer/<i>/<name>``: the SGD state (momentum buffers) of parameter ``i``, so a
  resumed run continues exactly;
* metadata key ``napari_maskclip``: JSON with ``format`` (:data:`FORMAT`), ``format_version``,
  ``iteration`` (completed steps), ``complete`` (the schedule finished), ``classes`` (index, name,
  synonyms, colour), ``background`` (names), ``settings`` (:class:`~.settings.TrainSettings`),
  ``teacher`` (model, pretrained, identity, MaskCLIP settings; None when no teacher was used),
  ``backbone_weights`` (where the initial weights came from), ``split`` (train / validation image
  names), ``datasets``, ``history`` (loss, lr, stage, validation mIoU), ``optimizer_param_groups``,
  versions and times.

safetensors cannot hold code, so opening a checkpoint never runs anything; the JSON is read from
the header alone, which makes :func:`is_student_checkpoint` cheap enough for a file picker, and is
validated before use (:mod:`.checkpoint_meta`). Files are written atomically: an interrupted save
leaves the previous checkpoint intact, and its temporary file is named after the checkpoint
(:func:`checkpoint_temp_prefix`) so the next run can remove it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from ..atomic import TEMP_PREFIX, atomic_write
from ..classes import ClassSpec, class_colors
from ..errors import ModelLoadError
from .checkpoint_meta import validate_description, validate_tensors
from .network import StudentNet, build_student
from .settings import TrainSettings

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "StudentCheckpoint",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "is_student_checkpoint",
    "classes_to_json",
    "checkpoint_temp_prefix",
]

FORMAT = "napari-maskclip-student"
FORMAT_VERSION = 1
_META_KEY = "napari_maskclip"


def checkpoint_temp_prefix(path: str | os.PathLike) -> str:
    """How the temporary files of saves to ``path`` begin: they name their checkpoint, so the
    next run can tell a killed run's leftovers for this file from anything else."""
    name = Path(path).name
    if len(name.encode("utf-8")) > 64:  # keep the temporary name within the 255-byte limit
        name = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
    return f"{TEMP_PREFIX}{name}-"


def classes_to_json(classes: list[ClassSpec]) -> list[dict[str, Any]]:
    colors = class_colors([c.name for c in classes])
    return [
        {"index": i, "name": c.name, "synonyms": list(c.synonyms), "color": list(color)}
        for i, (c, color) in enumerate(zip(classes, colors), start=1)
    ]


@dataclass
class StudentCheckpoint:
    """A checkpoint in memory: the description, the network state and the optimiser state."""

    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: Optional[dict[str, Any]] = None
    path: Optional[Path] = None

    @property
    def classes(self) -> list[ClassSpec]:
        return [ClassSpec(tuple(c["synonyms"])) for c in self.meta["classes"]]

    @property
    def background(self) -> list[ClassSpec]:
        return [ClassSpec(tuple(t.split("; "))) for t in self.meta.get("background", [])]

    @property
    def settings(self) -> TrainSettings:
        return TrainSettings.from_dict(self.meta["settings"])

    @property
    def iteration(self) -> int:
        return int(self.meta["iteration"])

    @property
    def class_embeddings(self) -> torch.Tensor:
        return self.model_state["class_embeddings"]

    def build_network(self) -> StudentNet:
        """The network with these weights (on the CPU, in eval mode)."""
        settings = self.settings
        net = build_student(settings.backbone, self.class_embeddings,
                            normalize_features=settings.normalize_features,
                            feature_scale=settings.feature_scale, seed=settings.seed)
        try:
            net.load_state_dict(self.model_state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"The weights in {self.path or 'the checkpoint'} do not fit a "
                f"{settings.backbone} student: {str(exc).splitlines()[0]}"
            ) from exc
        return net.eval()


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value.detach().cpu().contiguous()
            elif value is not None:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, state["param_groups"], scalars


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict], scalars: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in scalars.items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    path: str | os.PathLike,
    net: StudentNet,
    meta: dict[str, Any],
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Path:
    """Write ``net`` (+ optimiser state) and ``meta`` to ``path`` atomically.

    The file is serialised in memory and written here, not by ``safetensors.torch.save_file``:
    that one writes through a temporary file of its own (``.tmpXXXXXX``), which a killed run would
    leave behind under a name no later run could tell apart from anyone else's."""
    from safetensors.torch import save

    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    record = dict(meta)
    record.update(format=FORMAT, format_version=FORMAT_VERSION, napari_maskclip_version=__version__,
                  torch_version=torch.__version__, saved=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if optimizer is not None:
        opt_tensors, groups, scalars = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        record["optimizer_param_groups"] = groups
        record["optimizer_scalars"] = scalars
    else:
        record.pop("optimizer_param_groups", None)
        record.pop("optimizer_scalars", None)
    text = json.dumps(record, default=_jsonable)
    target = Path(path)
    data = save(tensors, metadata={_META_KEY: text})
    del tensors
    with atomic_write(target, temp_prefix=checkpoint_temp_prefix(target)) as tmp:
        tmp.write_bytes(data)
    return target


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON description of a student checkpoint, read from the file header only."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"Student checkpoint not found: {p}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
    except Exception as exc:
        raise ModelLoadError(
            f"{p} is not a napari-maskclip student checkpoint (not a safetensors file: {exc}). "
            "Train one with 'napari-maskclip train'."
        ) from exc
    text = header.get(_META_KEY)
    if text is None:
        raise ModelLoadError(
            f"{p} is a safetensors file but not a napari-maskclip student checkpoint (no "
            f"'{_META_KEY}' description). Is it a CLIP checkpoint? Use it as --pretrained instead."
        )
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(f"The description in {p} is damaged: {str(exc)[:200]}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelLoadError(f"{p} is not a napari-maskclip student checkpoint.")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelLoadError(f"The description in {p} is damaged (format_version {version!r:.40}).")
    if version > FORMAT_VERSION:
        raise ModelLoadError(
            f"{p} was written by a newer napari-maskclip (checkpoint format "
            f"{version}); update napari-maskclip to read it."
        )
    return validate_description(meta, str(p))


def is_student_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a readable student checkpoint (header check only; never raises)."""
    try:
        read_checkpoint_meta(path)
    except Exception:
        return False
    return True


def load_checkpoint(path: str | os.PathLike, *, with_optimizer: bool = True) -> StudentCheckpoint:
    """Read a student checkpoint (weights on the CPU)."""
    from safetensors import safe_open

    meta = read_checkpoint_meta(path)
    model_state: dict[str, torch.Tensor] = {}
    opt_tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            validate_tensors(meta, {k: tuple(handle.get_slice(k).get_shape()) for k in keys},
                             str(path))
            for key in keys:
                if key.startswith("model/"):
                    model_state[key[len("model/"):]] = handle.get_tensor(key)
                elif with_optimizer and key.startswith("optimizer/"):
                    opt_tensors[key] = handle.get_tensor(key)
    except ModelLoadError:
        raise
    except Exception as exc:  # safetensors' own errors (a file changed or cut short meanwhile)
        raise ModelLoadError(f"{path} cannot be read ({str(exc)[:200]}).") from exc
    optimizer_state = None
    if with_optimizer and "optimizer_param_groups" in meta:
        optimizer_state = _unflatten_optimizer(opt_tensors, meta["optimizer_param_groups"],
                                               meta.get("optimizer_scalars", {}))
    return StudentCheckpoint(meta=meta, model_state=model_state, optimizer_state=optimizer_state,
                             path=Path(path))
