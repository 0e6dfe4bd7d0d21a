"""NACLIP's additive attention bias: a Gaussian of patch distance (used by naclip and resclip)."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["NACLIP_SIGMA", "naclip_gaussian"]

NACLIP_SIGMA = 5.0


def naclip_gaussian(grid: tuple[int, int], sigma: float = NACLIP_SIGMA, *, device=None,
                    dtype=torch.float32, rows: Optional[slice] = None) -> torch.Tensor:
    """NACLIP's additive attention bias over ``1 + gh*gw`` tokens (zero row/column for the class).

    ``G[i, j] = exp(-|p_i - p_j|^2 / (2 sigma^2))`` for patches i, j at grid positions p.
    ``rows`` selects a block of query rows (token indices) to bound memory.
    """
    gh, gw = grid
    n = gh * gw
    ys = torch.arange(gh, device=device, dtype=torch.float32).repeat_interleave(gw)
    xs = torch.arange(gw, device=device, dtype=torch.float32).repeat(gh)
    rows = rows or slice(0, n + 1)
    token_rows = torch.arange(n + 1, device=device)[rows]
    out = torch.zeros(len(token_rows), n + 1, device=device, dtype=torch.float32)
    patch_rows = token_rows >= 1
    if patch_rows.any():
        idx = token_rows[patch_rows] - 1
        d2 = (ys[idx, None] - ys[None, :]) ** 2 + (xs[idx, None] - xs[None, :]) ** 2
        out[patch_rows, 1:] = torch.exp(-d2 / (2.0 * sigma * sigma))
    return out.to(dtype)
