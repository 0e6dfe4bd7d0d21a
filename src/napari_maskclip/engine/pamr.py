"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth 2020), as SCLIP/NACLIP/SC-CLIP use it.

Class scores at image resolution are repeatedly replaced by an affinity-weighted mean of their
neighbours, the affinity coming from local colour differences, so labels snap to image edges:

* neighbours: the 8 pixels around ``p`` at each dilation ``d`` (default 8 and 16 pixels, the
  successors' ``pamr_stride``; 16 neighbours in all), the image replicate-padded at its borders;
* per image channel ``c``: ``a_c(p, n) = -|I_c(p) - I_c(n)| / (1e-8 + 0.1 * std_c(p))`` where
  ``std_c(p)`` is the (unbiased) standard deviation of the 3x3 neighbourhoods of ``p`` at every
  dilation, centre included (9 values per dilation);
* ``w(p, .) = softmax_n(mean_c a_c(p, n))`` (the centre itself is not a neighbour);
* ``iterations`` times (default 10): ``m(p) <- sum_n w(p, n) m(n)``.

The affinity is invariant to a per-channel scale and offset of the image, so any normalisation of
the guide image gives the same result (up to the 1e-8).

Memory: tiles of ``tile x tile`` pixels are refined with a halo of ``iterations * max(dilations)``
pixels, which makes the tiled result equal to refining the whole image at once (a pixel's value
after ``t`` iterations depends only on pixels within ``t * max(dilations)``). Working memory is
``O((tile + 2 halo)^2 * (K + 16))`` floats beyond the input and output, whatever the image size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["pamr", "pamr_halo", "PAMR_ITERATIONS", "PAMR_DILATIONS"]

PAMR_ITERATIONS = 10
PAMR_DILATIONS = (8, 16)  # SCLIP/NACLIP/SC-CLIP (pamr_stride); the PAMR paper used 1..24
_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def pamr_halo(iterations: int = PAMR_ITERATIONS, dilations: Sequence[int] = PAMR_DILATIONS) -> int:
    """Pixels of context a tile needs on each side for an exact result."""
    return int(iterations) * max(int(d) for d in dilations)


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    """``x[..., y + dy, x + dx]`` for every pixel, from a replicate-padded copy."""
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def _affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """``B x C x H x W`` guide -> ``B x P x H x W`` neighbour weights (softmax over P)."""
    h, w = image.shape[-2:]
    pad = max(dilations)
    padded = F.pad(image, [pad] * 4, mode="replicate")
    shifts = [(oy * d, ox * d) for d in dilations for oy, ox in _OFFSETS]
    # Unbiased std of the 3x3 windows at every dilation (centre included), in two passes.
    mean = sum(_shifted(padded, pad, dy, dx, h, w) for dy, dx in shifts) / len(shifts)
    var = sum((_shifted(padded, pad, dy, dx, h, w) - mean).square_() for dy, dx in shifts)
    inv = 1.0 / (1e-8 + 0.1 * (var / (len(shifts) - 1)).sqrt_())  # B x C x H x W
    channels = image.shape[1]
    logits = torch.stack([
        ((image - _shifted(padded, pad, oy * d, ox * d, h, w)).abs_().mul_(inv)).sum(dim=1)
        for d in dilations for oy, ox in _OFFSETS if (oy, ox) != (0, 0)
    ], dim=1).div_(-channels)  # B x P x H x W: mean over channels of -|dI| / (0.1 std)
    return logits.softmax(dim=1)


def _refine_whole(image: torch.Tensor, scores: torch.Tensor, iterations: int,
                  dilations: Sequence[int]) -> torch.Tensor:
    weights = _affinity(image, dilations)
    h, w = scores.shape[-2:]
    pad = max(dilations)
    offsets = [(oy * d, ox * d) for d in dilations for oy, ox in _OFFSETS if (oy, ox) != (0, 0)]
    for _ in range(iterations):
        padded = F.pad(scores, [pad] * 4, mode="replicate")
        out = torch.zeros_like(scores)
        for i, (dy, dx) in enumerate(offsets):
            out.addcmul_(weights[:, i:i + 1], _shifted(padded, pad, dy, dx, h, w))
        scores = out
    return scores


@torch.no_grad()
def pamr(
    image: torch.Tensor,
    scores: torch.Tensor,
    *,
    iterations: int = PAMR_ITERATIONS,
    dilations: Sequence[int] = PAMR_DILATIONS,
    tile: int = 1024,
) -> torch.Tensor:
    """Refine ``B x K x H x W`` (or ``K x H x W``) ``scores`` guided by ``image`` of the same size
    (``B x C x H x W`` / ``C x H x W``, any channel count). Returns a new float32 tensor."""
    squeeze = scores.dim() == 3
    if squeeze:
        scores, image = scores[None], image[None]
    if image.shape[0] != scores.shape[0] or image.shape[-2:] != scores.shape[-2:]:
        raise ValueError(f"guide {tuple(image.shape)} does not match scores {tuple(scores.shape)}")
    dilations = tuple(int(d) for d in dilations)
    if iterations < 0 or not dilations or min(dilations) < 1:
        raise ValueError("PAMR needs iterations >= 0 and dilations >= 1")
    image = image.to(device=scores.device, dtype=torch.float32)
    scores = scores.float()
    if iterations == 0:
        out = scores.clone()
        return out[0] if squeeze else out
    h, w = scores.shape[-2:]
    halo = pamr_halo(iterations, dilations)
    out = torch.empty_like(scores)
    for y0 in range(0, h, tile):
        y1 = min(h, y0 + tile)
        for x0 in range(0, w, tile):
            x1 = min(w, x0 + tile)
            ty0, ty1 = max(0, y0 - halo), min(h, y1 + halo)
            tx0, tx1 = max(0, x0 - halo), min(w, x1 + halo)
            part = _refine_whole(image[..., ty0:ty1, tx0:tx1], scores[..., ty0:ty1, tx0:tx1],
                                 iterations, dilations)
            out[..., y0:y1, x0:x1] = part[..., y0 - ty0:y1 - ty0, x0 - tx0:x1 - tx0]
    return out[0] if squeeze else out
