"""Checking a student checkpoint's description before anything uses it.

The JSON description in a checkpoint (:mod:`.checkpoint`) may have been edited or damaged. Every
value that loading, prediction or a resumed run relies on is checked here first: types, ranges,
counts that agree with each other and with the tensors, and upper bounds on sizes. A bad file
therefore gives one :class:`~napari_maskclip.errors.ModelLoadError` that names it, never a
traceback, a hang or an allocation without bound. (The description itself is bounded by
safetensors, which refuses headers over 100 MB.)
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from ..errors import MaskClipError, ModelLoadError
from .settings import LIMITS, TrainSettings

__all__ = ["validate_description", "validate_tensors", "MAX_CLASSES", "MAX_EMBED_DIM"]

#: Labels are at most uint16, with 65535 meaning "ignore".
MAX_CLASSES = 65534
#: Widest CLIP embedding a student classifier may have (ViT-bigG has 1280).
MAX_EMBED_DIM = 8192
MAX_SYNONYMS = 256
MAX_NAMES = 1_000_000  # image names in the train / validation split
MAX_DATASETS = 10_000
_OPTIMIZER_KEY = re.compile(r"optimizer/(\d{1,9})/([A-Za-z_][A-Za-z0-9_]{0,63})")


class _Bad(Exception):
    """One inconsistency: where in the description, and what is wrong."""


def _damaged(where: str, problem: str) -> ModelLoadError:
    return ModelLoadError(
        f"The description in {where} is damaged ({problem}); use an intact checkpoint or "
        "train the student again."
    )


def validate_description(meta: Any, where: str) -> dict[str, Any]:
    """Return ``meta`` if it is a consistent student description, else raise
    :class:`ModelLoadError` naming ``where`` (the checkpoint's path)."""
    try:
        _check(meta)
    except _Bad as bad:
        raise _damaged(where, str(bad)) from None
    return meta


def validate_tensors(meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Check the tensor names and the classifier's shape against the (valid) description."""
    try:
        emb = shapes.get("model/class_embeddings")
        if emb is None:
            raise _Bad("no model/class_embeddings tensor")
        rows = len(meta["classes"]) + 1
        if len(emb) != 2 or emb[0] != rows or not 1 <= emb[1] <= MAX_EMBED_DIM:
            raise _Bad(f"model/class_embeddings is {list(emb)}, expected [{rows}, D] for "
                       f"{rows - 1} classes and background, D at most {MAX_EMBED_DIM}")
        groups = meta.get("optimizer_param_groups")
        n_params = len(groups[0]["params"]) if groups else 0
        for key in shapes:
            if not key.startswith("optimizer/"):
                continue
            match = _OPTIMIZER_KEY.fullmatch(key)
            if match is None or int(match.group(1)) >= n_params:
                raise _Bad(f"unexpected optimiser tensor {_short(key)}")
    except _Bad as bad:
        raise _damaged(where, str(bad)) from None


# ---- the checks -------------------------------------------------------------------------------

def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{name} must be a mapping, got {_short(value)}")
    return value


def _required(meta: dict[str, Any], key: str, where: str = "") -> Any:
    if key not in meta:
        raise _Bad(f"'{where}{key}' is missing")
    return meta[key]


def _integer(value: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _Bad(f"{name} must be a whole number in {lo}..{hi}, got {_short(value)}")
    return value


def _number(value: Any, name: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _Bad(f"{name} must be a finite number, got {_short(value)}")


def _text(value: Any, name: str, *, optional: bool = False, empty: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or len(value) > LIMITS["text"] or (not empty and not value.strip()):
        raise _Bad(f"{name} must be {'' if empty else 'non-empty '}text of at most "
                   f"{LIMITS['text']} characters, got {_short(value)}")


def _texts(value: Any, name: str, limit: int, *, empty: bool = True) -> list[str]:
    if not isinstance(value, list) or len(value) > limit:
        raise _Bad(f"{name} must be a list of at most {limit} names, got {_short(value)}")
    for i, item in enumerate(value):
        _text(item, f"{name}[{i}]", empty=empty)
    return value


def _check(meta: Any) -> None:
    meta = _mapping(meta, "the description")
    settings = _settings(_required(meta, "settings"))
    iteration = _integer(_required(meta, "iteration"), "iteration", 0, settings.iterations)
    if "complete" in meta and not isinstance(meta["complete"], bool):
        raise _Bad(f"complete must be true or false, got {_short(meta['complete'])}")
    _classes(_required(meta, "classes"))
    _texts(meta.get("background", []), "background", MAX_CLASSES, empty=False)
    _teacher(meta.get("teacher"))
    _text(meta.get("backbone_weights"), "backbone_weights", optional=True)
    if meta.get("split") is not None:
        split = _mapping(meta["split"], "split")
        for part in ("train", "val"):
            _texts(split.get(part, []), f"split.{part}", MAX_NAMES)
    _texts(meta.get("datasets", []), "datasets", MAX_DATASETS)
    _history(meta.get("history", []), iteration)
    if meta.get("optimizer_param_groups") is not None:
        _optimizer(meta["optimizer_param_groups"], meta.get("optimizer_scalars", {}), settings)


def _settings(value: Any) -> TrainSettings:
    try:
        settings = TrainSettings.from_dict(_mapping(value, "settings")).validate()
        if settings.teacher_settings is not None:
            _segment_settings(settings.teacher_settings, "settings.teacher_settings")
    except MaskClipError as exc:
        raise _Bad(f"settings: {exc}") from None
    return settings


def _segment_settings(value: Any, name: str) -> None:
    from ..engine.settings import SegmentSettings

    try:
        SegmentSettings.from_dict(_mapping(value, name)).validate()
    except (MaskClipError, TypeError, ValueError) as exc:  # a wrong type fails inside validate
        raise _Bad(f"{name}: {exc}") from None


def _classes(value: Any) -> None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CLASSES:
        raise _Bad(f"classes must be a list of 1..{MAX_CLASSES} classes, got {_short(value)}")
    for i, entry in enumerate(value):
        name = f"classes[{i}]"
        entry = _mapping(entry, name)
        if entry.get("index", i + 1) != i + 1:
            raise _Bad(f"{name}.index must be {i + 1}, got {_short(entry.get('index'))}")
        synonyms = _texts(_required(entry, "synonyms", f"{name}."), f"{name}.synonyms", MAX_SYNONYMS, empty=False)
        if not synonyms:
            raise _Bad(f"{name}.synonyms is empty")
        if "name" in entry and entry["name"] != synonyms[0]:
            raise _Bad(f"{name}.name {_short(entry['name'])} is not its first synonym")
        color = entry.get("color")  # shown only; 0..1 floats today
        if color is not None and not (
            isinstance(color, list) and len(color) in (3, 4)
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 255
                    for c in color)
        ):
            raise _Bad(f"{name}.color must be 3 or 4 numbers (RGB[A]), got {_short(color)}")


def _teacher(value: Any) -> None:
    if value is None:
        return
    teacher = _mapping(value, "teacher")
    for key in ("model", "pretrained", "identity"):
        _text(teacher.get(key), f"teacher.{key}", optional=True)
    if teacher.get("settings") is not None:
        _segment_settings(teacher["settings"], "teacher.settings")


def _history(value: Any, iteration: int) -> None:
    if not isinstance(value, list) or len(value) > iteration:
        raise _Bad(f"history must be a list of at most {iteration} records (one per iteration), "
                   f"got {_short(value) if not isinstance(value, list) else f'{len(value)} records'}")
    for i, record in enumerate(value):
        name = f"history[{i}]"
        record = _mapping(record, name)
        _integer(_required(record, "iteration", f"{name}."), f"{name}.iteration", 1, iteration)
        _number(_required(record, "loss", f"{name}."), f"{name}.loss")
        _number(record.get("lr", 0.0), f"{name}.lr")
        _number(record.get("val_miou"), f"{name}.val_miou", optional=True)
        if record.get("stage") not in (None, "teacher", "self-training"):
            raise _Bad(f"{name}.stage must be teacher or self-training, got {_short(record.get('stage'))}")


def _scalar(value: Any, name: str) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _text(value, name)
        return
    _number(value, name)


#: Types of the SGD group's options (any other option must be a plain scalar).
_GROUP_NUMBERS = ("lr", "momentum", "dampening", "weight_decay")
_GROUP_FLAGS = ("nesterov", "maximize", "differentiable", "foreach", "fused", "capturable")


def _optimizer(groups: Any, scalars: Any, settings: TrainSettings) -> None:
    if not isinstance(groups, list) or len(groups) != 1:
        raise _Bad(f"optimizer_param_groups must be a list of one group, got {_short(groups)}")
    group = _mapping(groups[0], "optimizer_param_groups[0]")
    params = _required(group, "params", "optimizer_param_groups[0].")
    if not isinstance(params, list) or params != list(range(len(params))) or len(params) > 100_000:
        raise _Bad(f"optimizer_param_groups[0].params must be 0, 1, 2, ..., got {_short(params)}")
    for key, value in group.items():
        name = f"optimizer_param_groups[0].{key}"
        if key in _GROUP_NUMBERS:
            _number(value, name)
            if value < 0:
                raise _Bad(f"{name} must be 0 or more, got {value}")
        elif key in _GROUP_FLAGS:
            if value is not None and not isinstance(value, bool):
                raise _Bad(f"{name} must be true, false or null, got {_short(value)}")
        elif key != "params":
            _text(key, "optimizer_param_groups[0] key")
            _scalar(value, name)
    for key in ("momentum", "weight_decay"):
        if key in group and group[key] != getattr(settings, key):
            raise _Bad(f"the optimiser's {key} {group[key]} differs from the settings' "
                       f"{getattr(settings, key)}")
    scalars = _mapping(scalars, "optimizer_scalars")
    for index, entries in scalars.items():
        if not (isinstance(index, str) and index.isdigit() and int(index) < len(params)):
            raise _Bad(f"optimizer_scalars has an unknown parameter {_short(index)}")
        for key, value in _mapping(entries, f"optimizer_scalars[{index}]").items():
            _text(key, "optimizer_scalars key")
            _scalar(value, f"optimizer_scalars[{index}].{key}")

