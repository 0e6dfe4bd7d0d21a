"""ResCLIP (Yang et al., CVPR 2025): the read-out of mode ``resclip``.

Written from the math of the authors' code (yvhangyang/ResCLIP, ``clip/model.py`` and
``resclip_segmentor.py``, read only). Blocks ``1..L-1`` run unchanged; the last block's
attention, per head, for the base attention ``resclip_base`` (its configs: ``naclip``, the
code's ``resclip`` strategy; ``clearclip``; ``sclip``, which keeps the residual and the MLP):

* logits ``M``: ``k k^T s`` (naclip), ``q q^T s`` (clearclip), or both (sclip), ``s = d^-1/2``;
* *SFR* (semantic feedback, when given): ``M <- t_f ((1 - l_f) M + l_f F)``, ``F`` below;
* ``A = softmax(M + G)`` (naclip: ``G`` NACLIP's Gaussian, sigma 5 patches, zero for the class
  token; the others ``G = 0``; sclip: ``softmax(M_q) + softmax(M_k)``);
* *RCS* (residual cross-correlation): ``A <- t_r ((1 - l_r) A + l_r R)``, ``R`` the mean of
  the ordinary attention ``softmax(q_l k_l^T s)`` of blocks 6-9 (12-layer index; scaled with
  depth otherwise);
* output ``ls_1(out_proj(A v))`` (sclip: plus the residual and the MLP).

``F`` comes from the text (so it is computed at query time, :func:`resclip_features`):

1. the RCS-only features (no ``F``; what encoding stores) give prompt cosines per cell,
   upsampled bilinearly to the window (as the window's scores are), refined by PAMR (10
   iterations, dilations 8 and 16 px) guided by the window as encoded; ``softmax(scale * .)``
   over the prompts; each pixel's best prompt, or prompt 0 where its probability is below
   ``resclip_temp_threshold``; each patch takes the most frequent label of its pixels
   (ties: the lowest);
2. ``F0_ij = 1`` for patches of one label (diagonal 1); with ``resclip_delete_same_entity``, a
   pair whose straight path (``c = c_i + (c_j - c_i) t``, ``t = k / T``, ``k = 0..dist``, ``T``
   the largest Chebyshev distance on the grid, rounded half to even; the reference's sampling)
   leaves the label is decayed by ``exp(-dist / T)``;
3. each row of ``F0`` blurred by a 1D Gaussian along the flat patch index (sigma 5, width
   ``min(N, 31)`` made odd, zero padded), divided by its sum + 1e-8; ``F = F / max F`` rounded
   to float16 (and ``l_f F`` again, as the reference multiplies in float16); class row and
   column zero.

Differences from the reference: its ``use_rcs``/``use_sfr`` flags are always on (a trailing
comma makes them tuples), as here; it assumes CUDA and batch 1; the tie rule of the patch
label is CPU ``torch.mode``'s (CUDA's is unspecified); ``F0`` is formed here in float64.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention_bias import naclip_gaussian
from .modes import RESCLIP_BASES
from .pamr import pamr

__all__ = ["RESCLIP_BASES", "resclip_layers", "resclip_encode", "resclip_features",
           "sfr_attention", "patch_labels"]

RESCLIP_SIGMA = 5.0
RCS_LAYERS = (5, 9)  # blocks 6..9 (indices into the L-1 intermediate attentions), 12 layers
_BLOCK_ELEMENTS = 1 << 25

RunBlock = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def resclip_layers(depth: int) -> tuple[int, ...]:
    """Indices of the intermediate blocks whose attention is averaged into ``R``."""
    n = depth - 1
    if n < 1:
        raise ValueError("ResCLIP needs a ViT with at least two blocks")
    if n == 1:
        return (0,)
    start = min(n - 1, max(0, round(RCS_LAYERS[0] * (n - 1) / 10)))
    end = max(start + 1, min(n, round(RCS_LAYERS[1] * (n - 1) / 10)))
    return tuple(range(start, end))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, width = t.shape
    return t.reshape(b, n, heads, width // heads).transpose(1, 2)


def _qkv(attn: nn.MultiheadAttention, y: torch.Tensor):
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return tuple(_heads(t, attn.num_heads) for t in (q, k, v))


def _qk(attn: nn.MultiheadAttention, y: torch.Tensor):
    width = y.shape[-1]
    b = attn.in_proj_bias
    q = F.linear(y, attn.in_proj_weight[:width], None if b is None else b[:width])
    k = F.linear(y, attn.in_proj_weight[width:2 * width], None if b is None else b[width:2 * width])
    return _heads(q, attn.num_heads), _heads(k, attn.num_heads)


def _last_block(
    visual_blocks: Sequence[nn.Module],
    last_in: torch.Tensor,
    rcs_in: torch.Tensor,
    grid: tuple[int, int],
    base: str,
    rcs_weights: tuple[float, float],
    sfr: Optional[torch.Tensor] = None,
    sfr_weights: Optional[tuple[float, float]] = None,
) -> torch.Tensor:
    """The last block under ResCLIP: ``B x N x W`` patch tokens before ``ln_post``.

    ``last_in``: tokens entering the last block (``B x (1+N) x W``); ``rcs_in``: ``ln_1`` inputs
    of the RCS blocks (``B x layers x (1+N) x W``, already normalised); ``sfr``: ``B x (1+N) x
    (1+N)`` (already scaled by ``l_f``, zero class row and column), or None."""
    last = visual_blocks[-1]
    attn: nn.MultiheadAttention = last.attn
    q, k, v = _qkv(attn, last.ln_1(last_in))
    rcs_blocks = [visual_blocks[i] for i in resclip_layers(len(visual_blocks))]
    rq, rk = zip(*[_qk(blk.attn, rcs_in[:, j]) for j, blk in enumerate(rcs_blocks)])
    b, heads, n1, hd = q.shape
    scale = hd ** -0.5
    t_r, l_r = (float(w) for w in rcs_weights)
    t_f, l_f = (float(w) for w in (sfr_weights or (1.0, 0.0)))
    out = torch.empty_like(v)
    step = max(1, _BLOCK_ELEMENTS // max(1, b * heads * n1 * (len(rq) + 2)))
    for start in range(0, n1, step):
        rows = slice(start, min(n1, start + step))
        extra = None if sfr is None else sfr[:, None, rows].to(q.dtype)

        def mixed(m: torch.Tensor) -> torch.Tensor:
            return m if extra is None else t_f * ((1 - l_f) * m + extra)

        if base == "sclip":
            a = (mixed((q[:, :, rows] @ q.transpose(-1, -2)) * scale).softmax(dim=-1)
                 + mixed((k[:, :, rows] @ k.transpose(-1, -2)) * scale).softmax(dim=-1))
        elif base == "clearclip":
            a = mixed((q[:, :, rows] @ q.transpose(-1, -2)) * scale).softmax(dim=-1)
        else:  # naclip
            g = naclip_gaussian(grid, RESCLIP_SIGMA, device=q.device, dtype=q.dtype, rows=rows)
            a = (mixed((k[:, :, rows] @ k.transpose(-1, -2)) * scale) + g).softmax(dim=-1)
        r = sum(((qq[:, :, rows] * scale) @ kk.transpose(-1, -2)).softmax(dim=-1)
                for qq, kk in zip(rq, rk)) / len(rq)
        out[:, :, rows] = (t_r * ((1 - l_r) * a + l_r * r)) @ v
    z = last.ls_1(attn.out_proj(out.transpose(1, 2).reshape(b, n1, heads * hd)))
    if base == "sclip":
        z = last_in + z
        z = z + last.ls_2(last.mlp(last.ln_2(z)))
    return z[:, 1:]


def resclip_encode(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    grid: tuple[int, int],
    base: str,
    rcs_weights: tuple[float, float],
    run_block: RunBlock,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Blocks ``1..L-1`` on the embedded tokens (batch-first), then the RCS-only last block:
    ``(patch tokens B x N x W before ln_post, tokens entering the last block, state)`` where the
    state holds what the query-time SFR needs (``last_in``, ``rcs_in``)."""
    chosen = set(resclip_layers(len(blocks)))
    rcs_in = []
    for i, block in enumerate(blocks[:-1]):
        if i in chosen:
            rcs_in.append(block.ln_1(x))
        x = run_block(block, x)
    rcs = torch.stack(rcs_in, dim=1)
    z = _last_block(blocks, x, rcs, grid, base, rcs_weights)
    return z, x, {"last_in": x, "rcs_in": rcs}


# ---- semantic feedback (query time) -------------------------------------------------------------
def patch_labels(scores: torch.Tensor, guide: torch.Tensor, patch: int, grid: tuple[int, int],
                 scale: float, threshold: float) -> torch.Tensor:
    """Step 1 for one window: ``Q x gh x gw`` cell cosines and the window's ``C x H x W`` network
    input -> ``gh x gw`` labels (prompt indices)."""
    up = F.interpolate(scores[None].float(), size=tuple(guide.shape[-2:]), mode="bilinear",
                       align_corners=False)
    up = pamr(guide[None].float(), up, iterations=10, dilations=(8, 16))[0]
    probs = torch.softmax(up * scale, dim=0)
    best_p, best = probs.max(dim=0)
    best = torch.where(best_p < threshold, torch.zeros_like(best), best)
    gh, gw = grid
    cells = best[:gh * patch, :gw * patch].reshape(gh, patch, gw, patch).permute(0, 2, 1, 3)
    cells = cells.reshape(gh * gw, patch * patch)
    count = scores.shape[0]
    onehot = torch.zeros(gh * gw, count, dtype=torch.int32, device=cells.device)
    onehot.scatter_add_(1, cells, torch.ones_like(cells, dtype=torch.int32))
    return onehot.argmax(dim=1).reshape(gh, gw)  # the first (lowest) label among ties


def sfr_attention(labels: torch.Tensor, delete_same_entity: bool = True,
                  sigma: float = RESCLIP_SIGMA) -> torch.Tensor:
    """Steps 2-3 before the final scaling: ``N x N`` float64 (rows sum to 1, up to 1e-8)."""
    gh, gw = labels.shape
    n = gh * gw
    device = labels.device
    flat = labels.reshape(-1)
    same = (flat[:, None] == flat[None, :]).to(torch.float64)
    same.fill_diagonal_(1.0)
    top = max(gh, gw) - 1
    if delete_same_entity and top > 0:
        _decay_broken_paths(same, labels, top)
    size = min(n, int(6 * sigma + 1))
    size = size if size % 2 == 1 else size + 1
    offsets = torch.arange(size, device=device, dtype=torch.float64) - size // 2
    kernel = torch.exp(-(offsets ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    blurred = F.conv1d(same[:, None], kernel.view(1, 1, -1), padding=size // 2)[:, 0].relu()
    return blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)


def _decay_broken_paths(same: torch.Tensor, labels: torch.Tensor, top: int) -> None:
    """Step 2's decay, in place on ``same`` (``N x N``): every same-label pair whose sampled
    straight path leaves the label gets ``exp(-dist / T)``. A path stays inside the bounding box
    of its two patches, so a pair whose box holds only its label is valid without sampling (a
    2D prefix sum per label tells); the others are sampled in chunks of similar distance, each
    only as far as its longest path (the points are the reference's: ``c_i (1 - t) + c_j t`` in
    float32, ``t`` from ``linspace(0, 1, T + 1)``, rounded half to even)."""
    gh, gw = labels.shape
    n = gh * gw
    device = labels.device
    flat = labels.reshape(-1)
    ys = torch.arange(n, device=device, dtype=torch.int32) // gw
    xs = torch.arange(n, device=device, dtype=torch.int32) % gw
    _, inverse = flat.unique(return_inverse=True)
    onehot = F.one_hot(inverse.reshape(gh, gw)).permute(2, 0, 1).to(torch.int32)
    csum = F.pad(onehot.cumsum(1).cumsum(2), (1, 0, 1, 0)).to(torch.int32).reshape(-1)
    stride_l, stride_y = (gh + 1) * (gw + 1), gw + 1
    ts = torch.linspace(0, 1, steps=top + 1, device=device)
    rows_per = max(1, _BLOCK_ELEMENTS // (8 * n))
    need_i, need_j = [], []
    for start in range(0, n, rows_per):
        rows = torch.arange(start, min(n, start + rows_per), device=device)
        y0, y1 = torch.minimum(ys[rows, None], ys[None]), torch.maximum(ys[rows, None], ys[None])
        x0, x1 = torch.minimum(xs[rows, None], xs[None]), torch.maximum(xs[rows, None], xs[None])
        base = (inverse[rows] * stride_l)[:, None].to(torch.int32)

        def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return csum.take((base + y * stride_y + x).long())

        count = at(y1 + 1, x1 + 1) - at(y0, x1 + 1) - at(y1 + 1, x0) + at(y0, x0)
        need = (flat[rows, None] == flat[None]) & (count != (y1 - y0 + 1) * (x1 - x0 + 1))
        pi, pj = torch.nonzero(need, as_tuple=True)
        need_i.append(rows[pi])
        need_j.append(pj)
    i_all, j_all = torch.cat(need_i), torch.cat(need_j)
    if not i_all.numel():
        return
    dist_all = torch.maximum((ys[i_all] - ys[j_all]).abs(), (xs[i_all] - xs[j_all]).abs())
    order = torch.argsort(dist_all)
    i_all, j_all, dist_all = i_all[order], j_all[order], dist_all[order]
    flat32 = flat.reshape(-1)
    c = 0
    while c < i_all.numel():
        longest = int(dist_all[min(i_all.numel(), c + 1) - 1])
        chunk = max(1, _BLOCK_ELEMENTS // (4 * (longest + 1)))
        stop = min(i_all.numel(), c + chunk)
        longest = int(dist_all[stop - 1])
        i, j, dist = i_all[c:stop], j_all[c:stop], dist_all[c:stop]
        t = ts[:longest + 1][None]
        u = 1 - t
        py = (ys[i].float()[:, None] * u + ys[j].float()[:, None] * t).round_().to(torch.int32)
        px = (xs[i].float()[:, None] * u + xs[j].float()[:, None] * t).round_().to(torch.int32)
        on = flat32.take((py * gw + px).long()) == flat32[i][:, None]
        inside = torch.arange(longest + 1, device=device, dtype=torch.int32)[None] <= dist[:, None]
        broken = ~(on | ~inside).all(dim=1)
        bi, bj = i[broken], j[broken]
        same[bi, bj] = same[bi, bj] * torch.exp(-dist[broken].to(torch.float64) / top)
        c = stop


def _scaled_sfr(sfr: torch.Tensor, weight: float) -> torch.Tensor:
    """``l_f F`` as the reference forms it: ``F / max F`` and the product rounded to float16;
    ``(1+N) x (1+N)`` with a zero class row and column (float32)."""
    n = sfr.shape[0]
    half = (sfr / sfr.max()).to(torch.float16)
    full = torch.zeros(n + 1, n + 1, dtype=torch.float32, device=sfr.device)
    full[1:, 1:] = (weight * half).float()
    return full


@torch.no_grad()
def resclip_features(
    visual: nn.Module,
    rcs_features: torch.Tensor,
    state: dict[str, torch.Tensor],
    text: torch.Tensor,
    patch: int,
    *,
    base: str,
    rcs_weights: tuple[float, float],
    sfr_weights: tuple[float, float],
    scale: float,
    threshold: float,
    delete_same_entity: bool = True,
) -> torch.Tensor:
    """The final ResCLIP features ``B x D x gh x gw`` (unit norm, float32) of windows encoded by
    :func:`resclip_encode`: ``rcs_features`` (the RCS-only features, ``B x D x gh x gw``), their
    ``state`` (``last_in``, ``rcs_in``, ``pixels``: the windows as encoded) and the ``Q x D`` unit
    prompt embeddings."""
    b, _, gh, gw = rcs_features.shape
    text32 = text.to(device=rcs_features.device, dtype=torch.float32)
    cosines = torch.einsum("bdhw,qd->bqhw", rcs_features.float(), text32)
    last_in = state["last_in"]
    sfr = []
    for i in range(b):
        labels = patch_labels(cosines[i], state["pixels"][i], patch, (gh, gw), scale, threshold)
        sfr.append(_scaled_sfr(sfr_attention(labels, delete_same_entity), sfr_weights[1]))
    z = _last_block(visual.transformer.resblocks, last_in, state["rcs_in"], (gh, gw), base,
                    rcs_weights, torch.stack(sfr).to(last_in.device), sfr_weights)
    feat = F.normalize((visual.ln_post(z) @ visual.proj).float(), dim=-1)
    return feat.transpose(1, 2).reshape(b, -1, gh, gw)


def state_bytes_per_cell(width: int, layers: int, patch: int, itemsize: int) -> int:
    """About what a window's ResCLIP state adds per feature cell (tokens, RCS inputs, pixels)."""
    return (1 + len(resclip_layers(layers))) * width * itemsize + 3 * patch * patch * itemsize
