"""The reference code's conventions (settings pos_embed_resize, partial_patches, resize_antialias):
each against an independent computation (numpy resampling written out in engine_helpers), on a
tiny random ViT; the defaults stay this project's conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_helpers import (
    EncoderCalls,
    random_rgb,
    reference_pos_embed_scale_factor,
    reference_vit_dense,
    resample,
)
from napari_maskclip.engine import Segmenter
from napari_maskclip.engine.dense import dense_features, interpolate_pos_embed
from napari_maskclip.engine.presets import PRESETS
from napari_maskclip.engine.settings import SegmentSettings
from napari_maskclip.errors import InvalidInputError


def _pos(visual) -> torch.Tensor:
    return visual.positional_embedding.detach()


def test_numpy_bicubic_reference_reproduces_a_resize_to_a_size(tiny_vit):
    """The written-out resampling is right where the engine's default is (size-based)."""
    visual = tiny_vit.visual
    out = interpolate_pos_embed(_pos(visual), tuple(visual.grid_size), (5, 7))
    pos = _pos(visual).double().numpy()
    grid = pos[1:].reshape(4, 4, -1).transpose(2, 0, 1)
    ref = resample(grid, (5, 7), (4 / 5, 4 / 7), "bicubic").transpose(1, 2, 0).reshape(-1, pos.shape[-1])
    np.testing.assert_allclose(out[1:].double().numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("pixels", [(40, 56), (48, 48), (32, 36), (72, 40)])
def test_scale_factor_pos_embed_matches_the_reference_convention(tiny_vit, pixels):
    visual = tiny_vit.visual
    p = int(visual.patch_size[0])
    grid = (pixels[0] // p, pixels[1] // p)
    out = interpolate_pos_embed(_pos(visual), tuple(visual.grid_size), grid,
                                method="scale_factor", pixels=pixels)
    ref = reference_pos_embed_scale_factor(visual, pixels)
    np.testing.assert_allclose(out.double().numpy(), ref.numpy(), atol=1e-5)
    exact = interpolate_pos_embed(_pos(visual), tuple(visual.grid_size), grid)
    assert (out - exact).abs().max() > 1e-3  # the two conventions really differ


def test_scale_factor_keeps_the_native_grid_only_for_square_inputs(tiny_vit):
    visual = tiny_vit.visual
    native = tuple(visual.grid_size)
    same = interpolate_pos_embed(_pos(visual), native, native, method="scale_factor",
                                 pixels=(32, 32))
    assert torch.equal(same, _pos(visual))
    # 32x36 px: the native 4x4 grid, but not square: the reference resizes by 4.1/4 anyway.
    moved = interpolate_pos_embed(_pos(visual), native, native, method="scale_factor",
                                  pixels=(32, 36))
    assert (moved - _pos(visual)).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["maskclip", "naclip", "clearclip"])
def test_dense_features_with_reference_conventions(tiny_vit, mode):
    """A 44x52 input: the patch conv leaves the partial patch out (40x48 read), the positional
    embedding is resized by the scale factor; as the reference computes it from raw weights."""
    visual = tiny_vit.visual
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 44, 52)
    out = dense_features(visual, pixels, mode, pos_embed_resize="scale_factor",
                         partial_patches="drop")
    ref, _ = reference_vit_dense(visual, pixels[:, :, :40, :48], mode,
                                 pos=reference_pos_embed_scale_factor(visual, (44, 52)))
    assert out.features.shape == (1, ref.shape[1], 5, 6)
    np.testing.assert_allclose(out.features.double().numpy(), ref.numpy(), atol=2e-5)
    with pytest.raises(InvalidInputError, match="multiple of the patch"):
        dense_features(visual, pixels, mode)  # this project's convention: pad first


def _segmenter(tiny_vit, **settings) -> Segmenter:
    return Segmenter(tiny_vit, text_cache=None,
                     settings=SegmentSettings(denoise=False, templates="single", precision="fp32",
                                              logit_scale=40.0, **settings))


def test_partial_patches_drop_stretches_the_cells_over_the_window(tiny_vit):
    """Whole 44x52 image: features of its 40x48 top-left part (5x6 cells), cosine scores
    bilinearly stretched over 44x52 (as the reference's forward_feature), then softmax."""
    seg = _segmenter(tiny_vit, partial_patches="drop", pos_embed_resize="scale_factor")
    image = random_rgb(44, 52, seed=3)
    result = seg(image, "red, blue")
    loaded = seg.loaded
    unit = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    pixels = ((unit - mean) / std)[:, :, :40, :48]
    feat, _ = reference_vit_dense(tiny_vit.visual, pixels, "maskclip",
                                  pos=reference_pos_embed_scale_factor(tiny_vit.visual, (44, 52)))
    text = seg.text.embed_texts(["red", "blue"], ["a photo of a {}."], precision="fp32")
    text = torch.nn.functional.normalize(text.double(), dim=-1)
    cos = torch.einsum("dhw,qd->qhw", feat[0], text).numpy()  # 2 x 5 x 6
    scores = resample(cos, (44, 52), (5 / 44, 6 / 52), "bilinear")
    probs = np.exp(40 * scores) / np.exp(40 * scores).sum(axis=0, keepdims=True)
    np.testing.assert_allclose(result.probabilities, probs, atol=2e-4)
    padded = _segmenter(tiny_vit)(image, "red, blue")  # this project's default: pad
    assert np.abs(padded.probabilities - result.probabilities).max() > 1e-3
    assert result.settings["partial_patches"] == "drop"
    assert result.settings["pos_embed_resize"] == "scale_factor"


@pytest.mark.parametrize("antialias", [True, False])
def test_resize_antialias_off_is_plain_bilinear(tiny_vit, antialias):
    """short side 40 on a 64x80 image: without antialiasing the network sees exactly the
    half-pixel bilinear resize (mmseg's cv2 resize, before its 8-bit rounding)."""
    seg = _segmenter(tiny_vit, short_side=40, resize_antialias=antialias)
    image = random_rgb(64, 80, seed=5)
    with EncoderCalls(tiny_vit.visual) as calls:
        result = seg(image, "red, blue")
    seen = calls.inputs[0][0, :, :40, :50].double().numpy()
    unit = (image.astype(np.float64) / 255.0).transpose(2, 0, 1)
    plain = resample(unit, (40, 50), (64 / 40, 80 / 50), "bilinear")
    mean = np.asarray(seg.loaded.mean).reshape(3, 1, 1)
    std = np.asarray(seg.loaded.std).reshape(3, 1, 1)
    error = np.abs(seen - (plain - mean) / std).max()
    if antialias:
        assert error > 1e-2  # this project's default: antialiased
    else:
        assert error < 1e-4  # float32 rounding; antialiasing differs by > 1e-2
    assert result.settings["resize_antialias"] is antialias


def test_defaults_are_this_projects_conventions_and_presets_set_the_references():
    s = SegmentSettings()
    assert (s.pos_embed_resize, s.partial_patches, s.resize_antialias) == ("grid", "pad", True)
    for name in ("sclip", "clearclip", "naclip", "scclip"):
        p = SegmentSettings.from_preset(name)
        assert (p.pos_embed_resize, p.partial_patches, p.resize_antialias) == (
            "scale_factor", "drop", False), name
    assert PRESETS["maskclip"]["resize_antialias"] is False
    with pytest.raises(InvalidInputError, match="pos_embed_resize"):
        SegmentSettings(pos_embed_resize="size").validate()
    with pytest.raises(InvalidInputError, match="partial_patches"):
        SegmentSettings(partial_patches="crop").validate()


def test_reference_conventions_are_refused_on_a_resnet(tiny_resnet):
    from napari_maskclip.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="ViT"):
        Segmenter(tiny_resnet, text_cache=None, partial_patches="drop")


# ---- CorrCLIP's restriction of the last block's attention to within-region patches -----------
def _restricted_reference(visual, pixels: torch.Tensor, mode: str, regions: np.ndarray) -> torch.Tensor:
    """The last block's attention with patch i allowed only patches j of its region (the class
    token unrestricted both ways), written out with a boolean mask in float64."""
    from engine_helpers import (REF_DTYPE, _heads, _layer_norm, _mlp, _out_proj, _unheads,
                                naclip_bias, qkv, reference_vit_tokens)

    x, grid = reference_vit_tokens(visual, pixels)
    last = visual.transformer.resblocks[-1]
    y = _layer_norm(x, last.ln_1)
    q, k, v = (_heads(t, last.attn.num_heads) for t in qkv(last, y))
    scale = q.shape[-1] ** -0.5
    ids = np.concatenate([[-1], regions.reshape(-1)])
    allowed = torch.from_numpy((ids[:, None] == ids[None, :]) | (ids[:, None] == -1)
                               | (ids[None, :] == -1))
    mask = torch.zeros(allowed.shape, dtype=REF_DTYPE).masked_fill(~allowed, float("-inf"))

    def soft(a, b, extra=0.0):
        return torch.softmax(a @ b.transpose(-1, -2) * scale + extra + mask, dim=-1)

    if mode == "clearclip":
        z = _out_proj(last, _unheads(soft(q, q) @ v))
    elif mode == "naclip":
        z = _out_proj(last, _unheads(soft(k, k, naclip_bias(grid)) @ v))
    else:  # sclip: residual and MLP kept
        z = x + _out_proj(last, _unheads((soft(q, q) + soft(k, k)) @ v))
        z = z + _mlp(last, _layer_norm(z, last.ln_2))
    feat = _layer_norm(z[:, 1:], visual.ln_post) @ visual.proj.detach().double()
    feat = feat / feat.norm(dim=-1, keepdim=True)
    return feat.transpose(1, 2).reshape(1, -1, *grid)


@pytest.mark.parametrize("mode", ["sclip", "clearclip", "naclip"])
def test_attention_restricted_to_regions_matches_the_reference(tiny_vit, mode):
    visual = tiny_vit.visual
    torch.manual_seed(2)
    pixels = torch.randn(1, 3, 40, 48)
    regions = np.zeros((5, 6), dtype=np.int64)
    regions[:, 3:] = 1
    regions[3:, :2] = 2
    out = dense_features(visual, pixels, mode, token_regions=torch.from_numpy(regions)[None])
    ref = _restricted_reference(visual, pixels, mode, regions)
    np.testing.assert_allclose(out.features.double().numpy(), ref.numpy(), atol=2e-5)
    free = dense_features(visual, pixels, mode)
    assert (free.features - out.features).abs().max() > 1e-3  # the restriction changes them
    one = dense_features(visual, pixels, mode, token_regions=torch.zeros(1, 5, 6, dtype=torch.long))
    torch.testing.assert_close(one.features, free.features)  # one region: no restriction


def test_attention_regions_setting_encodes_superpixels_at_patch_centres(tiny_vit):
    """The Segmenter restricts each window's attention to the superpixels of that window (as the
    model sees it), sampled at patch centres; the default encodes as before."""
    from napari_maskclip.engine.regions import patch_regions, superpixels

    image = random_rgb(40, 48, seed=4)
    seg = _segmenter(tiny_vit, mode="clearclip", attention_regions="felzenszwalb")
    features = seg.encode(image)
    labels = superpixels(image.astype(np.float32) / 255.0, "felzenszwalb",
                         **seg.settings.region_params("felzenszwalb"))
    regions = patch_regions(labels, (5, 6), 8)
    assert regions.shape == (5, 6) and len(np.unique(regions)) > 1
    loaded = seg.loaded
    unit = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    pixels = (unit - torch.tensor(loaded.mean).view(1, 3, 1, 1)) / torch.tensor(loaded.std).view(1, 3, 1, 1)
    expected = dense_features(tiny_vit.visual, pixels, "clearclip",
                              token_regions=torch.from_numpy(regions)[None].long())
    torch.testing.assert_close(features.windows[0].features, expected.features[0], atol=1e-5, rtol=0)
    plain = _segmenter(tiny_vit, mode="clearclip").encode(image)
    assert (plain.windows[0].features - features.windows[0].features).abs().max() > 1e-3
    with pytest.raises(InvalidInputError, match="mode"):
        SegmentSettings(mode="maskclip", attention_regions="slic").validate()


def test_request_digest_ignores_late_fields_at_their_defaults():
    """Results written before the conventions existed stay 'finished' for a rerun with the same
    options; a non-default convention is part of the request (so it is not skipped)."""
    from napari_maskclip.engine.settings import LATE_FIELDS, SegmentSettings

    plain = SegmentSettings()
    before = {k: v for k, v in plain.to_dict().items() if k not in LATE_FIELDS}
    assert plain.request_dict() == before
    changed = SegmentSettings(pos_embed_resize="scale_factor", resize_antialias=False)
    assert changed.request_dict()["pos_embed_resize"] == "scale_factor"
    assert changed.request_dict()["resize_antialias"] is False
    assert "partial_patches" not in changed.request_dict()
    assert set(LATE_FIELDS) <= set(plain.to_dict())
