"""Dense features (method.md section 1 and 5; paper eq. 3) against independent references.

The ViT reference in ``engine_helpers`` is written from the raw weights with explicit matmuls in
float64; the ResNet tests compute attention from ``q_proj``/``k_proj`` themselves.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_helpers import (
    REF_DTYPE,
    build_clip,
    naclip_bias,
    reference_pos_embed,
    reference_resnet_value,
    reference_vit_dense,
    reference_vit_global,
    tiny_config,
)
from napari_maskclip.engine import MODES, dense_features, wrap_model
from napari_maskclip.engine.dense import attnpool_value_features, interpolate_pos_embed, naclip_gaussian
from napari_maskclip.errors import InvalidInputError, UnsupportedModelError

ATOL = 1e-5
#: Modes whose reference is reference_vit_dense; scclip's is in test_engine_scclip.py, rfclip's
#: and resclip's (reference_rfclip, reference_resclip) in test_engine_rfclip/resclip.py.
REFERENCED_MODES = tuple(m for m in MODES if m not in ("scclip", "rfclip", "resclip"))


def _pixels(h: int, w: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=g)


# ---- ViT ----------------------------------------------------------------------------------
def test_vit_reference_reproduces_open_clip_global_embedding(tiny_vit):
    """The test's own reference is right: it gives open_clip's image embedding at the native size."""
    pixels = _pixels(32, 32)
    with torch.no_grad():
        expected = tiny_vit.visual(pixels).to(REF_DTYPE)
    torch.testing.assert_close(reference_vit_global(tiny_vit.visual, pixels), expected,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", REFERENCED_MODES)
@pytest.mark.parametrize("size", [(32, 32), (40, 56)], ids=["native-grid", "5x7-grid"])
def test_vit_dense_features_match_reference(tiny_vit, mode, size):
    pixels = _pixels(*size, seed=1)
    out = dense_features(tiny_vit.visual, pixels, mode, with_keys=True)
    ref_feat, ref_keys = reference_vit_dense(tiny_vit.visual, pixels, mode)
    gh, gw = size[0] // 8, size[1] // 8
    assert out.features.shape == (1, tiny_vit.embed_dim, gh, gw)
    torch.testing.assert_close(out.features.to(REF_DTYPE), ref_feat, atol=ATOL, rtol=0)
    assert out.keys is not None and out.keys.shape == (1, gh * gw, ref_keys.shape[-1])
    torch.testing.assert_close(out.keys.to(REF_DTYPE), ref_keys, atol=ATOL, rtol=0)


def test_vit_modes_really_differ(tiny_vit):
    """Guards the test above: a mode that silently fell back to another would still pass it."""
    pixels = _pixels(40, 56, seed=2)
    feats = {m: dense_features(tiny_vit.visual, pixels, m).features for m in MODES}
    for i, a in enumerate(MODES):
        for b in MODES[i + 1:]:
            assert (feats[a] - feats[b]).abs().max() > 1e-3, (a, b)


def test_vit_batch_equals_single_images(tiny_vit):
    pixels = _pixels(40, 40, seed=3, batch=3)
    batch = dense_features(tiny_vit.visual, pixels, "maskclip").features
    for i in range(3):
        single = dense_features(tiny_vit.visual, pixels[i:i + 1], "maskclip").features
        torch.testing.assert_close(batch[i:i + 1], single, atol=ATOL, rtol=0)


# ---- LayerScale ----------------------------------------------------------------------------
def _layerscale_vit():
    """A tiny open_clip ViT built with ``ls_init_value``, every gamma random and non-uniform."""
    cfg = tiny_config("tiny_vit")
    cfg["vision_cfg"]["ls_init_value"] = 0.1
    model = build_clip(cfg, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            for ls in (block.ls_1, block.ls_2):
                ls.gamma.copy_(0.2 + 1.8 * torch.rand(ls.gamma.shape, generator=g))
    return wrap_model(model, name="tiny-vit-layerscale")


def _layerscale_reference(visual, pixels: torch.Tensor, mode: str, tokens: bool = False) -> torch.Tensor:
    """Dense features of a LayerScale ViT from its raw weights (float64, explicit ops).

    Every block: ``x + g1 * attn(ln_1 x)``, then ``+ g2 * mlp(ln_2 x)``. Last block per mode: the
    attention branch is ``g1 * out_proj(A v)`` (maskclip: ``A`` = identity); maskclip and sclip
    keep the residual and ``g2 * mlp``, clearclip and naclip keep only the attention branch.
    """
    f64 = lambda t: t.detach().to(torch.float64)  # noqa: E731
    ln = lambda x, m: F.layer_norm(x, m.normalized_shape, f64(m.weight), f64(m.bias), m.eps)  # noqa: E731

    def mlp(block, x):
        h = x @ f64(block.mlp.c_fc.weight).T + f64(block.mlp.c_fc.bias)
        h = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))  # the tiny config's exact GELU
        return h @ f64(block.mlp.c_proj.weight).T + f64(block.mlp.c_proj.bias)

    def attention(block, y, kind, grid):
        w, b = f64(block.attn.in_proj_weight), f64(block.attn.in_proj_bias)
        width, heads = y.shape[-1], block.attn.num_heads
        q, k, v = (y @ w[i * width:(i + 1) * width].T + b[i * width:(i + 1) * width] for i in range(3))
        if kind == "value":
            mixed = v
        else:
            split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
            q, k, v = split(q), split(k), split(v)
            s = q.shape[-1] ** -0.5
            if kind == "standard":
                a = torch.softmax(q @ k.transpose(-1, -2) * s, -1)
            elif kind == "sclip":
                a = torch.softmax(q @ q.transpose(-1, -2) * s, -1) + torch.softmax(k @ k.transpose(-1, -2) * s, -1)
            elif kind == "clearclip":
                a = torch.softmax(q @ q.transpose(-1, -2) * s, -1)
            else:  # naclip
                a = torch.softmax(k @ k.transpose(-1, -2) * s + naclip_bias(grid), -1)
            mixed = (a @ v).transpose(1, 2).reshape(y.shape)
        out = mixed @ f64(block.attn.out_proj.weight).T + f64(block.attn.out_proj.bias)
        return out * f64(block.ls_1.gamma)

    p = int(visual.patch_size[0])
    x = pixels.to(torch.float64)
    bsz, c, h, w = x.shape
    grid = (h // p, w // p)
    patches = x.reshape(bsz, c, grid[0], p, grid[1], p).permute(0, 2, 4, 1, 3, 5).reshape(bsz, -1, c * p * p)
    embedded = patches @ f64(visual.conv1.weight).reshape(visual.conv1.weight.shape[0], -1).T
    cls = f64(visual.class_embedding).reshape(1, 1, -1).expand(bsz, 1, -1)
    x = ln(torch.cat([cls, embedded], 1) + reference_pos_embed(visual, grid), visual.ln_pre)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = x + attention(block, ln(x, block.ln_1), "standard", grid)
        x = x + mlp(block, ln(x, block.ln_2)) * f64(block.ls_2.gamma)
    last = blocks[-1]
    kind = {"maskclip": "value", "naive": "standard"}.get(mode, mode)
    z = attention(last, ln(x, last.ln_1), kind, grid)
    if mode in ("maskclip", "sclip", "naive"):
        z = x + z
        z = z + mlp(last, ln(z, last.ln_2)) * f64(last.ls_2.gamma)
    if tokens:
        return z
    feat = ln(z[:, 1:], visual.ln_post) @ f64(visual.proj)
    feat = feat / feat.norm(dim=-1, keepdim=True)
    return feat.transpose(1, 2).reshape(bsz, -1, *grid)


def test_layerscale_reference_reproduces_open_clip():
    """The LayerScale reference is right: its unmodified last block gives open_clip's image
    embedding from the class token (so it applies every gamma where open_clip does)."""
    loaded = _layerscale_vit()
    visual = loaded.visual
    assert float(visual.transformer.resblocks[-1].ls_1.gamma.std()) > 0.3  # non-uniform gammas
    pixels = _pixels(32, 32, seed=5)
    with torch.no_grad():
        expected = visual(pixels).to(REF_DTYPE)
    z = _layerscale_reference(visual, pixels, "naive", tokens=True)
    ln = visual.ln_post
    pooled = F.layer_norm(z[:, 0], ln.normalized_shape, ln.weight.to(REF_DTYPE), ln.bias.to(REF_DTYPE),
                          ln.eps) @ visual.proj.to(REF_DTYPE)
    torch.testing.assert_close(pooled, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", REFERENCED_MODES)
def test_layerscale_is_kept_in_every_mode(mode):
    """With non-uniform LayerScale gammas every mode keeps the attention branch's scale (and
    maskclip/sclip/naive the MLP's): features equal an explicit float64 reference."""
    loaded = _layerscale_vit()
    pixels = _pixels(40, 56, seed=6)
    out = dense_features(loaded.visual, pixels, mode).features.to(REF_DTYPE)
    ref = _layerscale_reference(loaded.visual, pixels, mode)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # The gammas matter: the same read-out with every gamma set to 1 gives other features.
    with torch.no_grad():
        for block in loaded.visual.transformer.resblocks:
            block.ls_1.gamma.fill_(1.0)
            block.ls_2.gamma.fill_(1.0)
    unscaled = dense_features(loaded.visual, pixels, mode).features.to(REF_DTYPE)
    assert float((out * unscaled).sum(dim=1).mean()) < 0.99


def test_pos_embed_interpolation_is_identity_at_native_grid(tiny_vit):
    pos = tiny_vit.visual.positional_embedding
    native = tuple(tiny_vit.visual.grid_size)
    out = interpolate_pos_embed(pos, native, native)
    assert torch.equal(out, pos)


@pytest.mark.parametrize("grid", [(5, 7), (3, 2), (9, 9)])
def test_pos_embed_resized_bicubically_keeping_class_position(tiny_vit, grid):
    visual = tiny_vit.visual
    out = interpolate_pos_embed(visual.positional_embedding, tuple(visual.grid_size), grid)
    assert out.shape == (1 + grid[0] * grid[1], visual.positional_embedding.shape[-1])
    torch.testing.assert_close(out[0], visual.positional_embedding[0], atol=0, rtol=0)
    torch.testing.assert_close(out.to(REF_DTYPE), reference_pos_embed(visual, grid), atol=1e-6, rtol=0)


def test_dense_features_are_unit_norm_and_finite(tiny_vit):
    out = dense_features(tiny_vit.visual, _pixels(24, 48, seed=4), "maskclip")
    norms = out.features.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_vit_input_not_a_multiple_of_patch_is_refused(tiny_vit):
    with pytest.raises(InvalidInputError):
        dense_features(tiny_vit.visual, _pixels(30, 32), "maskclip")


def test_unknown_mode_is_refused(tiny_vit):
    with pytest.raises(InvalidInputError):
        dense_features(tiny_vit.visual, _pixels(32, 32), "maskclip+")


def test_naclip_gaussian_matches_bruteforce():
    grid = (3, 4)
    torch.testing.assert_close(naclip_gaussian(grid).to(REF_DTYPE), naclip_bias(grid), atol=1e-6, rtol=0)


# ---- ResNet -------------------------------------------------------------------------------
def _layer4(visual, pixels: torch.Tensor) -> torch.Tensor:
    """The trunk's output as open_clip's own forward feeds it to the attention pool."""
    captured = {}
    handle = visual.attnpool.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            glob = visual(pixels)
    finally:
        handle.remove()
    return captured["x"], glob


def _one_head_resnet():
    cfg = tiny_config("tiny_resnet")
    cfg["vision_cfg"]["head_width"] = cfg["vision_cfg"]["width"] * 32  # heads = width*32 // head_width
    loaded = wrap_model(build_clip(cfg, seed=5), name="rn-1head")
    assert loaded.visual.attnpool.num_heads == 1
    return loaded


def _pool_inputs(pool, x4: torch.Tensor) -> torch.Tensor:
    """AttentionPool2d's tokens: [mean token, positions] + positional embedding (B x (1+N) x C)."""
    tokens = x4.flatten(2).transpose(1, 2).to(REF_DTYPE)
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
    return tokens + pool.positional_embedding.to(REF_DTYPE)[None]


def _pool_attention(pool, t: torch.Tensor) -> torch.Tensor:
    """Attention of the mean token's query over all tokens, per head: B x heads x (1+N)."""
    heads = pool.num_heads
    q = t[:, :1] @ pool.q_proj.weight.to(REF_DTYPE).T + pool.q_proj.bias.to(REF_DTYPE)
    k = t @ pool.k_proj.weight.to(REF_DTYPE).T + pool.k_proj.bias.to(REF_DTYPE)
    b, n, c = k.shape
    hd = c // heads
    qh = q.reshape(b, 1, heads, hd).permute(0, 2, 1, 3)
    kh = k.reshape(b, n, heads, hd).permute(0, 2, 1, 3)
    return torch.softmax((qh @ kh.transpose(-1, -2))[:, :, 0] * hd ** -0.5, dim=-1)


@pytest.mark.parametrize("size", [(64, 64), (96, 160)], ids=["native", "3x5-grid"])
def test_resnet_dense_is_value_path_per_position(tiny_resnet, size):
    visual = tiny_resnet.visual
    pixels = _pixels(*size, seed=6)
    out = dense_features(visual, pixels, "maskclip", with_keys=True)
    captured = {}
    handle = visual.layer4.register_forward_hook(lambda m, a, o: captured.setdefault("x", o))
    try:
        with torch.no_grad():
            visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels)))))
    finally:
        handle.remove()
    x4 = captured["x"]
    tokens = x4.flatten(2).transpose(1, 2)
    ref = reference_resnet_value(visual.attnpool, tokens)
    ref = ref / ref.norm(dim=-1, keepdim=True)
    gh, gw = size[0] // 32, size[1] // 32
    ref = ref.transpose(1, 2).reshape(1, -1, gh, gw)
    torch.testing.assert_close(out.features.to(REF_DTYPE), ref, atol=ATOL, rtol=0)
    pool = visual.attnpool
    keys = tokens.to(REF_DTYPE) @ pool.k_proj.weight.to(REF_DTYPE).T + pool.k_proj.bias.to(REF_DTYPE)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out.keys.to(REF_DTYPE), keys, atol=ATOL, rtol=0)


def test_attnpool_value_features_matches_explicit_matmuls(tiny_resnet):
    pool = tiny_resnet.visual.attnpool
    tokens = torch.randn(2, 5, pool.v_proj.in_features, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(attnpool_value_features(pool, tokens).to(REF_DTYPE),
                               reference_resnet_value(pool, tokens), atol=ATOL, rtol=0)


def test_resnet_eq3_one_head_global_is_attention_weighted_sum_of_dense_features():
    """Paper eq. 3 with a 1-head pool: AttnPool = sum_i softmax(q k_i / sqrt(C)) F(v_i) exactly.

    open_clip's pool prepends the mean token and adds positional embeddings before q/k/v, so
    the sum runs over those 1+N tokens.
    """
    loaded = _one_head_resnet()
    visual, pool = loaded.visual, loaded.visual.attnpool
    x4, glob = _layer4(visual, _pixels(64, 64, seed=8))
    t = _pool_inputs(pool, x4)
    a = _pool_attention(pool, t)[:, 0]  # B x (1+N)
    dense = attnpool_value_features(pool, t.float()).to(REF_DTYPE)  # B x (1+N) x D
    recon = (a[..., None] * dense).sum(dim=1)
    torch.testing.assert_close(recon, glob.to(REF_DTYPE), atol=ATOL, rtol=0)


def test_resnet_eq3_without_positional_embedding_uses_the_engines_dense_features():
    """With a zero positional embedding, the global embedding is a convex combination of exactly
    the per-position features the engine reads out (the mean token's feature is their mean)."""
    loaded = _one_head_resnet()
    visual, pool = loaded.visual, loaded.visual.attnpool
    with torch.no_grad():
        pool.positional_embedding.zero_()
    pixels = _pixels(64, 64, seed=9)
    x4, glob = _layer4(visual, pixels)
    a = _pool_attention(pool, _pool_inputs(pool, x4))[:, 0]  # B x (1+N)
    n = a.shape[-1] - 1
    weights = a[:, 1:] + a[:, :1] / n  # mean token's weight spread evenly
    raw = attnpool_value_features(pool, x4.flatten(2).transpose(1, 2)).to(REF_DTYPE)  # B x N x D
    torch.testing.assert_close((weights[..., None] * raw).sum(1), glob.to(REF_DTYPE), atol=ATOL, rtol=0)
    # ...and the engine's dense output is that same feature, normalised, on the layer4 grid.
    out = dense_features(visual, pixels, "maskclip").features  # 1 x D x 2 x 2
    unit = raw / raw.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out.flatten(2).transpose(1, 2).to(REF_DTYPE), unit, atol=ATOL, rtol=0)


def test_resnet_eq3_multi_head_per_head_contributions(tiny_resnet):
    """Several heads: global = b_c + sum_h sum_i a_hi W_c[:, h] v_i[h] (per-head eq. 3)."""
    visual, pool = tiny_resnet.visual, tiny_resnet.visual.attnpool
    heads = pool.num_heads
    assert heads > 1
    x4, glob = _layer4(visual, _pixels(64, 64, seed=10))
    t = _pool_inputs(pool, x4)
    a = _pool_attention(pool, t)  # B x H x (1+N)
    v = t @ pool.v_proj.weight.to(REF_DTYPE).T + pool.v_proj.bias.to(REF_DTYPE)  # B x (1+N) x C
    wc, bc = pool.c_proj.weight.to(REF_DTYPE), pool.c_proj.bias.to(REF_DTYPE)
    hd = v.shape[-1] // heads
    recon = bc.expand(v.shape[0], -1).clone()
    for h in range(heads):
        cols = slice(h * hd, (h + 1) * hd)
        per_pos = v[..., cols] @ wc[:, cols].T  # B x (1+N) x D: head h's share of F(v_i)
        recon += (a[:, h, :, None] * per_pos).sum(dim=1)
    torch.testing.assert_close(recon, glob.to(REF_DTYPE), atol=ATOL, rtol=0)
    # The heads' shares add up to the engine's whole-pool value features.
    full = attnpool_value_features(pool, t.float()).to(REF_DTYPE)
    shares = sum(v[..., h * hd:(h + 1) * hd] @ wc[:, h * hd:(h + 1) * hd].T for h in range(heads)) + bc
    torch.testing.assert_close(shares, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["sclip", "clearclip", "naclip", "naive"])
def test_resnet_refuses_vit_only_modes(tiny_resnet, mode):
    with pytest.raises(UnsupportedModelError):
        dense_features(tiny_resnet.visual, _pixels(64, 64), mode)
