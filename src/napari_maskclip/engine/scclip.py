"""SC-CLIP (Self-Calibrated CLIP, Bai et al. 2024): the last-block read-out of mode ``scclip``.

Written from the paper and the authors' code (SuleBai/SC-CLIP, read only). With ``inter[i]`` the
output of block ``i + 1`` (blocks ``1..L-1``; ViT-B/16: ``pre = 8``, ``post = 3``, fusion over
``inter[3:10]``, ``beta = 0.4``, ``res_cls = 0.3``), per image:

1. *Anomaly tokens*: local outlier factor of the patch tokens entering the last block (30
   neighbours, squared Euclidean distances; as in the official code each point's reach distance
   is its own k-distance, so ``LOF(p) = mean_j kd(p) / kd(o_j)``); tokens above the 95th
   percentile are replaced by the mean of their non-outlier 8-neighbours (``fix``).
2. *Self-adjusting*: ``S_pre = cos(fix(inter[pre]))``, ``S_post = cos(inter[post])``;
   ``agg(x, S) = (S * [S >= beta]) x / (row sums + 1e-6)``.
   ``attn(t) = out_proj(((softmax(M) + softmax(k k^T / sqrt(d))) / 2) v)`` on ``ln_1(t)``, with
   ``M = 3 (S_pre - mean(S_pre))``, negative entries ``-inf`` (the same for every head).
3. ``x = agg(attn(agg(fix(inter[-1]), S_pre)) + res_cls * cls, S_post)`` - no residual, no MLP;
4. *Multi-level fusion*: ``r = sum inter[start:end]``;
   ``x += agg(attn(r_patches) + res_cls * r_cls, S_post)``;
5. ``feat = ln_post(x) @ proj`` (done by the caller).

Layer indices scale with depth (``round(i * (L - 2) / 10)``, exact for 12-layer ViTs). The
official code assumes square grids and batch 1 (it divides flat indices by the grid height and
takes the similarity mean over the batch); here rows and columns are exact and each image is
its own batch. Every N x N matrix is formed in blocks of rows, so memory stays O(N) per row block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SCCLIP", "scclip_layers", "scclip_tokens", "lof_outliers"]

_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class SCCLIP:
    """SC-CLIP's hyper-parameters (official values, 12-layer indices)."""

    pre: int = 8
    post: int = 3
    start: int = 3
    end: int = 10
    beta: float = 0.4
    res_cls: float = 0.3
    neighbours: int = 30
    contamination: float = 0.05


def scclip_layers(depth: int, p: SCCLIP = SCCLIP()) -> tuple[int, int, int, int]:
    """(pre, post, start, end) indices into the ``depth - 1`` intermediate outputs."""
    n = depth - 1
    if n < 1:
        raise ValueError("SC-CLIP needs a ViT with at least two blocks")

    def scale(i: int) -> int:
        return min(n - 1, max(0, round(i * (n - 1) / 10))) if n > 1 else 0

    pre, post, start = scale(p.pre), scale(p.post), scale(p.start)
    end = max(start + 1, min(n, round(p.end * (n - 1) / 10)) if n > 1 else 1)
    return pre, post, start, end


def _rows(n: int, width: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, n * width))


def lof_outliers(x: torch.Tensor, neighbours: int = 30, contamination: float = 0.05) -> torch.Tensor:
    """Boolean mask of the ``N x C`` tokens whose (official-code) LOF is above the quantile."""
    n = x.shape[0]
    k = min(neighbours, n - 1)
    if k < 1:
        return torch.zeros(n, dtype=torch.bool, device=x.device)
    x = x.float()
    sq = (x * x).sum(dim=1)
    knn_d = torch.empty(n, k, device=x.device)
    knn_i = torch.empty(n, k, dtype=torch.long, device=x.device)
    for start in range(0, n, _rows(n, 1)):
        rows = slice(start, min(n, start + _rows(n, 1)))
        d = (sq[rows, None] + sq[None, :] - 2.0 * (x[rows] @ x.t())).clamp_min_(0.0)
        idx = torch.arange(rows.start, rows.stop, device=x.device)
        d[idx - rows.start, idx] = -1.0  # self first, then dropped
        vals, inds = torch.topk(d, k + 1, dim=1, largest=False)
        knn_d[rows], knn_i[rows] = vals[:, 1:], inds[:, 1:]
    k_dist = knn_d[:, -1:]
    reach = torch.maximum(knn_d, k_dist).mean(dim=1)
    lrd = k / torch.nan_to_num(reach, nan=1e-6)
    lof = (lrd[knn_i] / lrd[:, None]).mean(dim=1)
    threshold = torch.quantile(lof, 1.0 - contamination)
    return lof > threshold


def _fix(tokens: torch.Tensor, outliers: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Outlier tokens (``N x C``) replaced by the mean of their in-grid non-outlier 8-neighbours."""
    if not bool(outliers.any()):
        return tokens
    gh, gw = grid
    fmap = tokens.t().reshape(1, -1, gh, gw)
    keep = (~outliers).to(tokens.dtype).reshape(1, 1, gh, gw)
    pad_f = F.pad(fmap * keep, (1, 1, 1, 1))
    pad_k = F.pad(keep, (1, 1, 1, 1))
    total = torch.zeros_like(fmap)
    count = torch.zeros_like(keep)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if (dy, dx) != (1, 1):
                total += pad_f[..., dy:dy + gh, dx:dx + gw]
                count += pad_k[..., dy:dy + gh, dx:dx + gw]
    update = (outliers.reshape(1, 1, gh, gw)) & (count > 0)
    out = torch.where(update, total / count.clamp_min(1.0), fmap)
    return out.reshape(-1, gh * gw).t()


def _aggregate(x: torch.Tensor, unit: torch.Tensor, beta: float) -> torch.Tensor:
    """``agg(x, S)`` with ``S = unit unit^T`` thresholded at ``beta``; ``x`` N x C."""
    n = x.shape[0]
    out = torch.empty_like(x)
    step = _rows(n, 1)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        s = unit[rows] @ unit.t()
        s = torch.where(s < beta, torch.zeros_like(s), s)
        out[rows] = (s / (s.sum(dim=1, keepdim=True) + 1e-6)) @ x
    return out


def _attention(block: nn.Module, t: torch.Tensor, unit: torch.Tensor, sim_mean: torch.Tensor) -> torch.Tensor:
    """SC-CLIP's last-block attention on ``t`` (N x W, already ``ln_1``), after ``out_proj``."""
    attn: nn.MultiheadAttention = block.attn
    heads = attn.num_heads
    n, width = t.shape
    q, k, v = F.linear(t, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    hd = width // heads
    k = k.reshape(n, heads, hd).transpose(0, 1)  # H N hd
    v = v.reshape(n, heads, hd).transpose(0, 1)
    scale = hd ** -0.5
    out = torch.empty_like(v)
    step = _rows(n, heads)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        m = (unit[rows] @ unit.t() - sim_mean) * 3.0
        m = m.masked_fill(m < 0.0, float("-inf")).softmax(dim=-1)  # the diagonal always survives
        a = (m[None] + ((k[:, rows] @ k.transpose(-1, -2)) * scale).softmax(dim=-1)) / 2
        out[:, rows] = a @ v
    return attn.out_proj(out.transpose(0, 1).reshape(n, width))


def scclip_tokens(
    last: nn.Module,
    inter: list[torch.Tensor],
    grid: tuple[int, int],
    p: SCCLIP = SCCLIP(),
    layerscale: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Patch tokens ``B x N x W`` (before ``ln_post``) from the intermediate outputs
    ``inter`` (each ``B x (1+N) x W``, batch-first, class token first) of blocks ``1..L-1``."""
    ls = layerscale or (lambda t: t)
    pre, post, start, end = scclip_layers(len(inter) + 1, p)
    out = []
    for b in range(inter[0].shape[0]):
        last_in = inter[-1][b]
        outliers = lof_outliers(last_in[1:], p.neighbours, p.contamination)
        unit_pre = F.normalize(_fix(inter[pre][b, 1:], outliers, grid), dim=-1)
        unit_post = F.normalize(inter[post][b, 1:], dim=-1)
        n = unit_pre.shape[0]
        sim_mean = (unit_pre.sum(dim=0) ** 2).sum() / (n * n)  # mean of S_pre, without forming it
        x = _aggregate(_fix(last_in[1:], outliers, grid), unit_pre, p.beta)
        x = ls(_attention(last, last.ln_1(x), unit_pre, sim_mean)) + p.res_cls * last_in[:1]
        x = _aggregate(x, unit_post, p.beta)
        fused = torch.stack([inter[i][b] for i in range(start, end)]).sum(dim=0)
        r = ls(_attention(last, last.ln_1(fused[1:]), unit_pre, sim_mean)) + p.res_cls * fused[:1]
        out.append(x + _aggregate(r, unit_post, p.beta))
    return torch.stack(out)
