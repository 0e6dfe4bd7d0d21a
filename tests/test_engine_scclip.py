"""SC-CLIP (mode ``scclip``) against a float64 reference written from the official code's steps.

The reference works on one image with full N x N matrices, explicit loops for the anomaly fix
and open_clip's raw weights (engine_helpers), and never calls engine/scclip.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_helpers import (
    REF_DTYPE,
    _heads,
    _layer_norm,
    _out_proj,
    _unheads,
    _w,
    build_clip,
    qkv,
    reference_block,
    reference_embed,
    tiny_config,
)
from napari_maskclip.engine import dense_features, wrap_model
from napari_maskclip.engine.scclip import lof_outliers, scclip_layers

BETA, RES_CLS = 0.4, 0.3


def _intermediates(visual, pixels):
    """Outputs of blocks 1..L-1 (float64, batch-first, class token first)."""
    tokens, (gh, gw) = reference_embed(visual, pixels)
    out = []
    for block in visual.transformer.resblocks[:-1]:
        tokens = reference_block(block, tokens)
        out.append(tokens)
    return out, (gh, gw)


def reference_lof(x, k=30, contamination=0.05):
    k = min(k, x.shape[0] - 1)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    vals, idx = torch.topk(d, k + 1, largest=False)
    vals, idx = vals[:, 1:], idx[:, 1:]
    reach = torch.maximum(vals, vals[:, -1:].expand_as(vals))
    lrd = k / reach.mean(dim=1)
    lof = (lrd[idx] / lrd[:, None]).mean(dim=1)
    return lof > torch.quantile(lof, 1 - contamination)


def reference_fix(tokens, outliers, grid):
    gh, gw = grid
    out = tokens.clone()
    for i in torch.nonzero(outliers).flatten().tolist():
        y, x = divmod(i, gw)
        nb = [(y + dy) * gw + (x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
              if (dy, dx) != (0, 0) and 0 <= y + dy < gh and 0 <= x + dx < gw]
        nb = [j for j in nb if not outliers[j]]
        if nb:
            out[i] = tokens[nb].mean(dim=0)
    return out


def reference_agg(x, s):
    s = torch.where(s < BETA, torch.zeros_like(s), s)
    return (s / (s.sum(dim=-1, keepdim=True) + 1e-6)) @ x


def reference_attn(block, t, mid):
    heads = block.attn.num_heads
    q, k, v = (_heads(z[None], heads) for z in qkv(block, _layer_norm(t, block.ln_1)))
    m = (mid - mid.mean()) * 3.0
    m[m < 0] = float("-inf")
    a = (torch.softmax(m, dim=-1)[None, None]
         + torch.softmax(k @ k.transpose(-1, -2) * k.shape[-1] ** -0.5, dim=-1)) / 2
    return _out_proj(block, _unheads(a @ v))[0]


def reference_scclip(visual, pixels, layers):
    pre, post, start, end = layers
    inter, grid = _intermediates(visual, pixels)
    last = visual.transformer.resblocks[-1]
    feats = []
    for b in range(pixels.shape[0]):
        x_in = inter[-1][b]
        outl = reference_lof(x_in[1:])
        fp = reference_fix(inter[pre][b, 1:], outl, grid)
        fp = fp / fp.norm(dim=-1, keepdim=True)
        mid = fp @ fp.T
        x = reference_agg(reference_fix(x_in[1:], outl, grid), mid)
        x = reference_attn(last, x, mid) + RES_CLS * x_in[:1]
        fq = inter[post][b, 1:]
        fq = fq / fq.norm(dim=-1, keepdim=True)
        after = fq @ fq.T
        x = reference_agg(x, after)
        r = sum(inter[i][b] for i in range(start, end))
        r2 = reference_attn(last, r[1:], mid) + RES_CLS * r[:1]
        x = x + reference_agg(r2, after)
        f = _layer_norm(x, visual.ln_post) @ _w(visual.proj)
        feats.append((f / f.norm(dim=-1, keepdim=True)).T.reshape(-1, *grid))
    return torch.stack(feats), outl


def _vit(layers: int, seed: int = 3):
    cfg = tiny_config("tiny_vit")
    cfg["vision_cfg"]["layers"] = layers
    return wrap_model(build_clip(cfg, seed=seed), name=f"vit-{layers}")


def test_layer_indices_are_the_official_ones_at_twelve_layers():
    assert scclip_layers(12) == (8, 3, 3, 10)
    pre, post, start, end = scclip_layers(4)
    assert 0 <= post <= pre <= 2 and 0 <= start < end <= 3


@pytest.mark.parametrize("layers,size", [(12, (64, 48)), (4, (48, 72)), (2, (40, 56))])
def test_scclip_matches_reference(layers, size):
    loaded = _vit(layers)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(layers))
    out = dense_features(loaded.visual, pixels, "scclip").features
    ref, outliers = reference_scclip(loaded.visual, pixels, scclip_layers(layers))
    assert bool(outliers.any())  # the anomaly fix was exercised
    assert out.shape == ref.shape
    torch.testing.assert_close(out.to(REF_DTYPE), ref, atol=2e-5, rtol=0)


def test_lof_outliers_match_reference_and_are_five_percent():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0), dtype=REF_DTYPE)
    x[[3, 77]] *= 6  # two clear anomalies
    got = lof_outliers(x.float())
    assert torch.equal(got, reference_lof(x))
    assert bool(got[3]) and bool(got[77]) and int(got.sum()) == 10


def test_scclip_differs_from_other_modes_and_is_unit_norm():
    loaded = _vit(4)
    pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(9))
    sc = dense_features(loaded.visual, pixels, "scclip").features
    na = dense_features(loaded.visual, pixels, "naclip").features
    assert (sc - na).abs().max() > 1e-3
    torch.testing.assert_close(sc.norm(dim=1), torch.ones_like(sc.norm(dim=1)), atol=1e-5, rtol=0)
