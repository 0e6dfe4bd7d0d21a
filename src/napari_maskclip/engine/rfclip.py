"""RF-CLIP (ReFocusing CLIP, Li et al., AAAI 2026): the read-out of mode ``rfclip``.

Written from the math of the authors' code (liblacklucy/RF-CLIP, ``clip/model.py`` and
``custom_segmentor.py``, read only). ``x`` are the tokens (class token first), ``W`` channels,
``L`` blocks, ``D`` the distraction channels (published for ViT-B/16 and ViT-L/14).

Encode, per image:

1. *Distraction fix* after every block, the last one included (read normally for this):
   for each patch token ``f``, ``w = (f - min f) / sum(f - min f)``; a token whose largest
   ``w`` over ``D`` exceeds ``5 / W`` becomes ``0.6 f + 0.4 m``, ``m`` the 3x3 mean of the
   tokens around it on the patch grid (centre included, zero outside the grid, always / 9);
   the class token is kept.
2. The keys of every block's input, ``k_l = W_k ln_1(x_l) + b_k``, are kept.
3. *Refocusing*: ``g`` = the mean of the ``L`` fixed block outputs; ``S_ij = cos(g_i, g_j)``
   between patches, entries below 0.4 set to 0 (no normalisation); ``x' = S x`` on the patches
   of the tokens entering the last block, ``g' = S g`` (class tokens kept).
4. *Layer-averaged key attention*: for ``t`` in ``{x', g'}``:
   ``A_t = 1/L sum_l softmax_j(k_l k_l^T / sqrt(d))`` restricted to patch rows and columns
   (each softmax over every token, class included), the last block's keys taken from
   ``ln_1(t)`` itself; ``out(t) = ls_1(out_proj(A_t v_t))`` with ``v_t`` the patches' values;
   ``z = (out(x') + out(g')) / 2``, no residual, no MLP; ``feat = ln_post(z) @ proj``.
5. *Global embedding*: ``ln_post`` of the class token of step 1's fixed last-block output,
   ``@ proj``, unit norm: of each window (``rfclip_global="window"``), or of the whole image at
   processing size (``"image"``: the reference code's sliding-window inference).

Query, per window (:func:`rfclip_logits`), with unit text embeddings ``t_q`` (every prompt):

* prompts are clustered by complete linkage on cosine distance, cut at
  ``rfclip_cluster_threshold`` (scipy, as the reference);
* in each cluster the prompt most similar to the global embedding ``e`` is adjusted:
  ``t <- normalise((1 - a) t + a normalise(mean of the 2 patch features most similar to t))``,
  ``a = rfclip_text_weight``;
* ``logits = (1 - b) cos(feat, t) + b cos(e, t)`` with ``b = rfclip_global_weight``.

Differences from the reference: it hard-codes the ViT-B/16 channel list whatever the model; here
the published lists go by width (768: ViT-B/16, 1024: ViT-L/14) and other widths use an
estimate (:func:`estimated_channels`, this project's: the channels most over-activated on a
fixed noise image), or ``rfclip_channels``. Its Cityscapes config reads each crop's own global
embedding (``"window"`` here). Every N x N matrix is formed in blocks of rows.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PUBLISHED_CHANNELS", "distraction_channels", "estimated_channels", "fix_distraction",
           "rfclip_tokens", "text_clusters", "rfclip_logits", "RFCLIP_ALPHA", "RFCLIP_BETA"]

#: The reference code's distraction channels by model width (ViT-B/16 and, commented out there,
#: ViT-L/14).
PUBLISHED_CHANNELS = {768: (4, 162, 189, 326, 429, 474, 633, 713),
                      1024: (250, 261, 437, 650, 720, 779, 936, 1005)}
RFCLIP_SIGMA = 5.0  # a token is a distractor above sigma / W
RFCLIP_ALPHA = 0.4  # blend of the fixed token
RFCLIP_BETA = 0.4  # similarity threshold of the refocusing
_TOPK = 2  # patches averaged into an adjusted text embedding
_BLOCK_ELEMENTS = 1 << 25
_ESTIMATES: "weakref.WeakKeyDictionary[nn.Module, tuple[int, ...]]" = weakref.WeakKeyDictionary()

RunBlock = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def distraction_channels(visual: nn.Module,
                         channels: Optional[Sequence[int]] = None) -> tuple[int, ...]:
    """The channels whose over-activation marks a distractor token: ``channels`` if given, the
    published list for the model's width, else :func:`estimated_channels`."""
    width = int(visual.conv1.weight.shape[0])
    if channels:
        chosen = tuple(int(c) for c in channels)
        if min(chosen) < 0 or max(chosen) >= width:
            from ..errors import InvalidInputError

            raise InvalidInputError(f"rfclip_channels must lie in 0..{width - 1} for this model "
                                    f"(width {width}), got {list(chosen)}.")
        return chosen
    if width in PUBLISHED_CHANNELS:
        return PUBLISHED_CHANNELS[width]
    return estimated_channels(visual)


@torch.no_grad()
def estimated_channels(visual: nn.Module, count: int = 8) -> tuple[int, ...]:
    """For widths without a published list: the ``count`` channels with the highest mean (over
    blocks) of their largest normalised weight ``w`` (step 1) over the patch tokens, on a fixed
    standard-normal image at the model's native size. Computed once per model."""
    cached = _ESTIMATES.get(visual)
    if cached is not None:
        return cached
    param = visual.conv1.weight
    native = visual.image_size
    size = tuple(int(s) for s in native) if isinstance(native, (tuple, list)) else (int(native),) * 2
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, *size, generator=g).to(device=param.device, dtype=param.dtype)
    x = visual.conv1(pixels)
    b, width = x.shape[:2]
    x = x.reshape(b, width, -1).permute(0, 2, 1)
    cls = visual.class_embedding.reshape(1, 1, -1).to(x.dtype)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
    batch_first = getattr(visual.transformer, "batch_first", True)
    score = torch.zeros(width, dtype=torch.float32, device=param.device)
    for block in visual.transformer.resblocks:
        x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        score += _weights(x[:, 1:].float()).amax(dim=(0, 1))
    chosen = tuple(sorted(int(c) for c in torch.topk(score, min(count, width)).indices))
    _ESTIMATES[visual] = chosen
    return chosen


def _weights(patches: torch.Tensor) -> torch.Tensor:
    shifted = patches - patches.amin(dim=-1, keepdim=True)
    return shifted / shifted.sum(dim=-1, keepdim=True).clamp(min=1e-8)


def fix_distraction(x: torch.Tensor, grid: tuple[int, int],
                    channels: Sequence[int]) -> torch.Tensor:
    """Step 1 on ``B x (1+N) x W`` tokens: distractor patches blended with their 3x3 mean."""
    patches = x[:, 1:]
    b, n, width = patches.shape
    idx = torch.tensor(list(channels), dtype=torch.long, device=x.device)
    mask = _weights(patches).index_select(-1, idx).amax(dim=-1) > RFCLIP_SIGMA / width  # B x N
    if not bool(mask.any()):
        return x
    fmap = patches.transpose(1, 2).reshape(b, width, *grid)
    mean = F.avg_pool2d(fmap, 3, stride=1, padding=1, count_include_pad=True)
    mean = mean.reshape(b, width, n).transpose(1, 2)
    fixed = torch.where(mask[..., None], mean, patches)
    return torch.cat([x[:, :1], (1 - RFCLIP_ALPHA) * patches + RFCLIP_ALPHA * fixed], dim=1)


def _split_keys(attn: nn.MultiheadAttention, y: torch.Tensor, value: bool = False):
    width = y.shape[-1]
    heads = attn.num_heads
    b_all = attn.in_proj_bias
    part = slice(2 * width, 3 * width) if value else slice(width, 2 * width)
    t = F.linear(y, attn.in_proj_weight[part], None if b_all is None else b_all[part])
    b, n, _ = t.shape
    return t.reshape(b, n, heads, width // heads).transpose(1, 2)  # B H (1+N) hd


def _rows(b: int, heads: int, n: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, b * heads * n))


def _refocus(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Step 3: ``x``'s patches replaced by ``S x`` (``S`` from the unit guide patches)."""
    b, n, _ = unit.shape
    out = torch.empty_like(x[:, 1:])
    step = max(1, _BLOCK_ELEMENTS // max(1, b * n))
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        s = unit[:, rows] @ unit.transpose(1, 2)
        s = torch.where(s < RFCLIP_BETA, torch.zeros_like(s), s)
        out[:, rows] = s @ x[:, 1:]
    return torch.cat([x[:, :1], out], dim=1)


def _layer_averaged(last: nn.Module, inputs: list[torch.Tensor],
                    keys: list[torch.Tensor]) -> list[torch.Tensor]:
    """Step 4 for every token tensor of ``inputs`` (``B x (1+N) x W``, before ``ln_1``), the
    earlier blocks' ``keys`` shared: patch outputs ``B x N x W`` (LayerScale included)."""
    attn: nn.MultiheadAttention = last.attn
    ys = [last.ln_1(t) for t in inputs]
    own = [_split_keys(attn, y) for y in ys]
    values = [_split_keys(attn, y, value=True)[:, :, 1:] for y in ys]
    b, heads, n1, hd = own[0].shape
    scale = hd ** -0.5
    layers = len(keys) + 1
    outs = [torch.empty_like(v) for v in values]
    step = _rows(b, heads, n1)
    for start in range(1, n1, step):
        rows = slice(start, min(n1, start + step))
        common = sum(((k[:, :, rows] * scale) @ k.transpose(-1, -2)).softmax(dim=-1)[..., 1:]
                     for k in keys) if keys else 0.0
        for k, v, out in zip(own, values, outs):
            last_kk = ((k[:, :, rows] * scale) @ k.transpose(-1, -2)).softmax(dim=-1)[..., 1:]
            out[:, :, rows.start - 1:rows.stop - 1] = ((common + last_kk) / layers) @ v
    width = inputs[0].shape[-1]
    return [last.ls_1(attn.out_proj(o.transpose(1, 2).reshape(b, n1 - 1, width))) for o in outs]


def rfclip_tokens(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    grid: tuple[int, int],
    channels: Sequence[int],
    run_block: RunBlock,
    *,
    global_only: bool = False,
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Steps 1-5 on the embedded tokens ``x`` (``B x (1+N) x W``, batch-first): the patch tokens
    ``B x N x W`` before ``ln_post`` (None with ``global_only``), the tokens entering the last
    block (for its keys) and the last block's fixed class token ``B x W`` (step 5, before
    ``ln_post``)."""
    keys: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    last = blocks[-1]
    for block in blocks[:-1]:
        if not global_only:
            keys.append(_split_keys(block.attn, block.ln_1(x)))
        x = fix_distraction(run_block(block, x), grid, channels)
        if not global_only:
            outputs.append(x)
    x_last = fix_distraction(run_block(last, x), grid, channels)
    if global_only:
        return None, x, x_last[:, 0]
    outputs.append(x_last)
    guide = torch.stack(outputs).mean(dim=0)
    unit = F.normalize(guide[:, 1:], dim=-1)
    pair = _layer_averaged(last, [_refocus(x, unit), _refocus(guide, unit)], keys)
    return (pair[0] + pair[1]) / 2, x, x_last[:, 0]


# ---- query time --------------------------------------------------------------------------------
def text_clusters(text: torch.Tensor, threshold: float) -> np.ndarray:
    """Cluster id (0..) of each of the ``Q x D`` unit prompt embeddings: complete linkage on
    cosine distance, cut at ``threshold`` (scipy's ``fcluster``, ``criterion="distance"``)."""
    q = text.shape[0]
    if q < 2:
        return np.zeros(q, dtype=np.int64)
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    t = text.detach().double().cpu().numpy()
    dist = np.clip(1.0 - t @ t.T, 0.0, 2.0)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    labels = fcluster(linkage(squareform(dist, checks=False), method="complete"),
                      t=float(threshold), criterion="distance")
    return (labels - 1).astype(np.int64)


@torch.no_grad()
def rfclip_logits(
    features: torch.Tensor,
    text: torch.Tensor,
    global_embedding: torch.Tensor,
    clusters: np.ndarray,
    text_weight: float,
    global_weight: float,
) -> torch.Tensor:
    """``B x D x h x w`` unit features, ``Q x D`` unit prompts, ``B x D`` unit global embeddings
    -> ``B x Q x h x w`` logits (see the module doc; float32)."""
    b, d, h, w = features.shape
    flat = features.float().flatten(2).transpose(1, 2)  # B N D
    text = text.to(device=features.device, dtype=torch.float32)
    glob = global_embedding.to(device=features.device, dtype=torch.float32)
    sims = glob @ text.t()  # B Q
    count = int(clusters.max()) + 1 if len(clusters) else 0
    members = [np.flatnonzero(clusters == c) for c in range(count)]
    sims_np = sims.cpu().numpy()
    out = []
    for i in range(b):
        adjusted = text
        if text_weight != 0.0:
            adjusted = text.clone()
            for idx in members:
                if idx.size == 0:
                    continue
                best = int(idx[int(np.argmax(sims_np[i, idx]))])  # the first on ties
                t = F.normalize(text[best], dim=0)
                top = torch.topk(flat[i] @ t, min(_TOPK, flat.shape[1])).indices
                mean = F.normalize(flat[i, top].mean(dim=0), dim=0)
                adjusted[best] = F.normalize((1 - text_weight) * t + text_weight * mean, dim=0)
        logits = flat[i] @ adjusted.t()  # N Q
        logits = logits * (1 - global_weight) + sims[i][None] * global_weight
        out.append(logits.t().reshape(-1, h, w))
    return torch.stack(out)
