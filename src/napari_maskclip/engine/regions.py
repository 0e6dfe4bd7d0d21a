"""Region voting: every pixel of a class-agnostic region gets the region's vote.

Regions come from superpixels of the image (scikit-image SLIC or Felzenszwalb, on the CPU) or
from the user (any label image of the same size: SAM, micro-sam or Cellpose output, a napari
Labels layer). Region 0 of a user's label image means "no region": those pixels keep their own
probabilities. Two rules (``SegmentSettings.region_vote``):

* ``mean`` (default): the region's mean class probabilities, so its label is the class with
  the highest mean probability;
* ``majority``: CorrCLIP's vote, the most frequent per-pixel label (argmax) of the region (ties:
  the lowest class index); the maps then hold each class's share of the region's pixels, so
  the confidence is the winner's share.

Voting runs in two passes over row blocks (:class:`RegionVote`), so it needs ``K x regions``
floats beyond the probabilities, whatever the image size.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ..errors import InvalidInputError

__all__ = ["REGION_METHODS", "superpixels", "check_regions", "RegionVote", "region_vote",
           "patch_regions"]

REGION_METHODS = ("slic", "felzenszwalb")
SLIC_DEFAULTS = {"n_segments": 400, "compactness": 10.0, "sigma": 0.0}
FELZENSZWALB_DEFAULTS = {"scale": 100.0, "sigma": 0.8, "min_size": 50}


def superpixels(unit: np.ndarray, method: str, **params: Any) -> np.ndarray:
    """Superpixels of a 0..1 ``H x W x C`` image: int32 labels from 1 (every pixel in one)."""
    from skimage.segmentation import felzenszwalb, slic

    image = np.asarray(unit, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if method == "slic":
        p = {**SLIC_DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
        labels = slic(image, n_segments=int(p["n_segments"]), compactness=float(p["compactness"]),
                      sigma=float(p["sigma"]), start_label=1, channel_axis=-1)
    elif method == "felzenszwalb":
        p = {**FELZENSZWALB_DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
        labels = felzenszwalb(image, scale=float(p["scale"]), sigma=float(p["sigma"]),
                              min_size=int(p["min_size"]), channel_axis=-1) + 1
    else:
        raise InvalidInputError(
            f"Unknown region method {method!r}: use {' or '.join(REGION_METHODS)}, or give a label image."
        )
    return labels.astype(np.int32, copy=False)


def check_regions(regions: Any, shape: tuple[int, int]) -> np.ndarray:
    """A user's label image as compact int32 ids (0 stays 0 = no region), or a clear error."""
    arr = np.asarray(regions)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.shape != tuple(shape):
        raise InvalidInputError(
            f"The region label image has shape {tuple(arr.shape)} but the image is "
            f"{shape[0]}x{shape[1]} (rows x columns): give one 2D label image of the same size."
        )
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise InvalidInputError("The region label image must hold whole numbers (one id per region).")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise InvalidInputError("The region label image has negative ids: use 0 for 'no region', ids from 1.")
    values, inverse = np.unique(arr, return_inverse=True)
    if values.size and values[0] != 0:
        inverse = inverse + 1  # no 0 in the image: every id is a region
    return inverse.reshape(arr.shape).astype(np.int32)


class RegionVote:
    """Two passes over row blocks: :meth:`add` every block's probabilities, then :meth:`apply`."""

    def __init__(self, regions: np.ndarray, channels: int, device: Any = "cpu",
                 rule: str = "mean") -> None:
        if rule not in ("mean", "majority"):
            raise InvalidInputError(f"Unknown region vote {rule!r}: use mean or majority.")
        self.rule = rule
        self.regions = torch.from_numpy(np.ascontiguousarray(regions, dtype=np.int64))
        n = int(self.regions.max()) + 1 if self.regions.numel() else 1
        self.sums = torch.zeros(channels, n, dtype=torch.float64, device=device)
        self.counts = torch.zeros(n, dtype=torch.float64, device=device)

    def _ids(self, y0: int, y1: int, device) -> torch.Tensor:
        return self.regions[y0:y1].reshape(-1).to(device)

    def add(self, probs: torch.Tensor, y0: int) -> None:
        """Accumulate ``K x rows x W`` probabilities of rows ``y0..``."""
        ids = self._ids(y0, y0 + probs.shape[1], self.sums.device)
        flat = probs.reshape(probs.shape[0], -1).to(self.sums)
        if self.rule == "majority":  # one vote per pixel, for its most probable class
            flat = torch.zeros_like(flat).scatter_(0, flat.argmax(dim=0, keepdim=True), 1.0)
        self.sums.index_add_(1, ids, flat)
        self.counts.index_add_(0, ids, torch.ones_like(ids, dtype=self.counts.dtype))

    def covers(self, y0: int, y1: int) -> bool:
        """Whether every pixel of rows ``y0..y1`` lies in a region (then :meth:`voted` suffices)."""
        return bool((self.regions[y0:y1] != 0).all())

    def voted(self, y0: int, y1: int) -> torch.Tensor:
        """The region means of rows ``y0..y1`` (``K x rows x W``), for rows that :meth:`covers`."""
        ids = self._ids(y0, y1, self.sums.device)
        means = (self.sums / self.counts.clamp_min(1.0)).float()
        return means[:, ids].reshape(-1, y1 - y0, self.regions.shape[1])

    def apply(self, probs: torch.Tensor, y0: int) -> torch.Tensor:
        """Rows ``y0..`` with each region's mean (region 0 keeps its own probabilities)."""
        ids = self._ids(y0, y0 + probs.shape[1], self.sums.device)
        means = (self.sums / self.counts.clamp_min(1.0)).to(probs.dtype)
        voted = means[:, ids].reshape(probs.shape).to(probs.device)
        own = (ids == 0).reshape(probs.shape[1:]).to(probs.device)
        return torch.where(own[None], probs, voted)


def region_vote(probs: torch.Tensor, regions: np.ndarray, block: Optional[int] = None,
                rule: str = "mean") -> torch.Tensor:
    """``K x H x W`` probabilities voted within ``regions`` (``H x W`` ids, 0 = no region) by
    ``rule`` (``mean`` or ``majority``)."""
    vote = RegionVote(regions, probs.shape[0], probs.device, rule)
    h = probs.shape[1]
    step = block or h
    for y0 in range(0, h, step):
        vote.add(probs[:, y0:y0 + step], y0)
    return torch.cat([vote.apply(probs[:, y0:y0 + step], y0) for y0 in range(0, h, step)], dim=1)


def patch_regions(labels: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """Region ids at patch resolution (``gh x gw``): the id at each patch's centre pixel (a
    partial last patch: its centre clamped into the image). For restricting the last block's
    attention to within-region patches (``SegmentSettings.attention_regions``)."""
    h, w = labels.shape
    ys = np.minimum(np.arange(grid[0]) * patch + patch // 2, h - 1)
    xs = np.minimum(np.arange(grid[1]) * patch + patch // 2, w - 1)
    return np.ascontiguousarray(labels[ys][:, xs])
