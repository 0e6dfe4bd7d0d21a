"""Encoded images: dense features per window, and the cache that makes re-queries instant.

An image is encoded once (the expensive part: the CLIP image encoder) into :class:`ImageFeatures`.
Every later query with other class names, thresholds or templates reads these features again
without touching the image encoder. The cache key is the image content (a hash of its bytes,
shape and dtype), the channel mapping, the model identity and the encode settings, so a changed
image, model or setting is never served stale features.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from .windows import Box

__all__ = ["WindowFeatures", "ImageFeatures", "FeatureCache", "image_digest"]


@dataclass
class WindowFeatures:
    """Dense features of one crop: ``D x gh x gw`` cells covering ``box`` (plus padding)."""

    box: Box
    features: torch.Tensor
    keys: Optional[torch.Tensor] = None  # (gh*gw) x C, unit norm
    #: What a text-aware mode reads at query time besides the features (rfclip: ``global``, the
    #: class embedding; resclip: the last block's inputs and the window's pixels).
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.features.shape[-2]), int(self.features.shape[-1])

    @property
    def nbytes(self) -> int:
        size = self.features.numel() * self.features.element_size()
        if self.keys is not None:
            size += self.keys.numel() * self.keys.element_size()
        return size + sum(t.numel() * t.element_size() for t in self.state.values())


@dataclass
class ImageFeatures:
    """Everything a query needs about one encoded 2D image."""

    key: str
    image_shape: tuple[int, int]
    proc_shape: tuple[int, int]
    patch: int
    windows: list[WindowFeatures]
    model_identity: str
    encode_settings: dict[str, Any]
    plan: dict[str, Any] = field(default_factory=dict)
    #: The encoded image (a :class:`~.preprocess.PreparedImage`: a view of the caller's array
    #: and its conversion rule, no copy): PAMR's guide and the source of superpixels, read only
    #: when a query asks for them, so both stay query-time refinements.
    source: Optional[Any] = None
    #: Superpixel maps computed so far, by method and parameters (re-queries reuse them).
    regions: dict[str, np.ndarray] = field(default_factory=dict)
    #: Refinement guides other than the image itself, by kind (``refine_guide="resized"``).
    guides: dict[str, np.ndarray] = field(default_factory=dict)

    def guide(self, y0: int = 0, y1: Optional[int] = None) -> Optional[np.ndarray]:
        """Rows ``y0..y1`` of the image as the model sees it before resizing (``h x W x 3``,
        0..1), rounded through float16 (the student's teacher rounds its crops the same way)."""
        if self.source is None:
            return None
        height, width = self.source.shape
        rows = self.source.window(y0, height if y1 is None else y1, 0, width)
        return rows.astype(np.float16).astype(np.float32)

    @property
    def has_keys(self) -> bool:
        return all(w.keys is not None for w in self.windows)

    @property
    def nbytes(self) -> int:
        size = sum(w.nbytes for w in self.windows)
        size += sum(g.nbytes for g in self.guides.values())
        return size + sum(r.nbytes for r in self.regions.values())


def image_digest(image: np.ndarray, extra: str = "") -> str:
    """A content hash of an image array (bytes, shape, dtype) plus ``extra``."""
    data = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{data.shape}|{data.dtype}|{extra}".encode())
    digest.update(memoryview(data).cast("B"))
    return digest.hexdigest()


class FeatureCache:
    """A small LRU of encoded images, bounded by count and by memory."""

    def __init__(self, max_items: int = 4, max_bytes: int = 2 << 30) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: "OrderedDict[str, ImageFeatures]" = OrderedDict()

    def get(self, key: str, *, need_keys: bool = False) -> Optional[ImageFeatures]:
        """The entry for ``key``; with ``need_keys`` only if it kept the attention keys."""
        for suffix in ("|keys", "|nokeys"):
            entry = self._items.get(key + suffix)
            if entry is None or (need_keys and not entry.has_keys):
                continue
            self._items.move_to_end(key + suffix)
            return entry
        return None

    def put(self, features: ImageFeatures) -> None:
        base = features.key
        suffix = "|keys" if features.has_keys else "|nokeys"
        if suffix == "|keys":
            self._items.pop(base + "|nokeys", None)  # the entry with keys serves both
        self._items[base + suffix] = features
        self._items.move_to_end(base + suffix)
        while len(self._items) > self.max_items or (
            len(self._items) > 1 and sum(f.nbytes for f in self._items.values()) > self.max_bytes
        ):
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
