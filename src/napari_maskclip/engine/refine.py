"""MaskCLIP's refinements (paper section 3.3) and how class probabilities are formed.

* Probabilities: ``softmax(scale * cosine)`` over all prompts (each synonym is a prompt); a class's
  probability is the max over its synonyms (the successors' "merge by max probability").
* Prompt denoising: a class whose probability never reaches ``threshold`` anywhere in the image
  is removed before the final argmax (it is unlikely to be present and only steals pixels). It
  never removes every class: the most confident one always stays.
* Key smoothing (paper eq. 5): ``pred_i = sum_j cos(k_i, k_j) pred_j`` on class probabilities at
  patch resolution, with the last layer's keys. We implement the paper's cosine over the channel
  axis (the official code normalises over the spatial axis instead, a quirk). Negative cosines
  (dissimilar patches) contribute nothing and each position is renormalised, so the result stays a
  probability distribution. As in the official code, only positions whose max probability is below
  ``threshold`` are smoothed (1.0 = all). Computed in blocks of rows: O(N) memory, not O(N^2).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "class_probabilities",
    "denoise_keep",
    "key_smoothing",
]


def class_probabilities(
    logits: torch.Tensor, groups: Sequence[Sequence[int]], scale: float, *, dim: int = 0
) -> torch.Tensor:
    """Prompt cosines (prompts along ``dim``) -> class probabilities (classes along ``dim``,
    max over synonyms)."""
    probs = torch.softmax(logits * scale, dim=dim)
    if all(len(g) == 1 for g in groups) and [g[0] for g in groups] == list(range(len(groups))):
        return probs
    return torch.stack([probs.index_select(dim, _index(g, probs)).amax(dim=dim) for g in groups], dim=dim)


def _index(group: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(group), dtype=torch.long, device=like.device)


def denoise_keep(class_max: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which classes survive prompt denoising, from each class's max probability over the image."""
    keep = class_max >= threshold
    if not bool(keep.any()):
        keep = torch.zeros_like(keep)
        keep[int(torch.argmax(class_max))] = True
    return keep


def key_smoothing(
    probs: torch.Tensor,
    keys: torch.Tensor,
    *,
    threshold: float = 1.0,
    rows_per_block: int = 2048,
) -> torch.Tensor:
    """Smooth ``K x N`` class probabilities with ``N x C`` unit-norm keys (see module doc)."""
    n = probs.shape[1]
    if keys.shape[0] != n:
        raise ValueError(f"{keys.shape[0]} keys for {n} positions")
    out = probs.clone()
    keys = keys.to(probs.dtype)
    probs_t = probs.t()  # N x K
    for start in range(0, n, rows_per_block):
        rows = slice(start, min(n, start + rows_per_block))
        weights = (keys[rows] @ keys.t()).clamp_min_(0.0)  # r x N; the diagonal is 1
        smoothed = (weights @ probs_t) / weights.sum(dim=1, keepdim=True)  # r x K
        select = probs[:, rows].amax(dim=0) < threshold
        block = out[:, rows]
        block[:, select] = smoothed.t()[:, select]
        out[:, rows] = block
    return out
