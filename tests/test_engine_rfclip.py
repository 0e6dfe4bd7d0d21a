"""RF-CLIP (mode ``rfclip``) against the float64 reference of engine_helpers, written from the
authors' code's steps (explicit loops for the distraction fix, full attention matrices), and its
query-time text refocusing against a float64 reference of ``hierarchical_prompt``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine_helpers import (
    REF_DTYPE,
    EncoderCalls,
    blocky_rgb,
    build_clip,
    reference_rfclip,
    reference_rfclip_logits,
    tiny_config,
)
from napari_maskclip.engine import Segmenter, dense_features
from napari_maskclip.engine.rfclip import (PUBLISHED_CHANNELS, distraction_channels, estimated_channels,
                                           rfclip_logits, text_clusters)
from napari_maskclip.errors import InvalidInputError

ATOL = 1e-5
CHANNELS = (7, 20, 30)


def _vit(layers: int = 2, layerscale: bool = False, seed: int = 1):
    """A tiny ViT whose positional embedding over-activates the distraction channels at a few
    patches, so that the fix has tokens to work on."""
    cfg = tiny_config("tiny_vit")
    cfg["vision_cfg"]["layers"] = layers
    if layerscale:
        cfg["vision_cfg"]["ls_init_value"] = 0.1
    model = build_clip(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        if layerscale:
            for block in model.visual.transformer.resblocks:
                for ls in (block.ls_1, block.ls_2):
                    ls.gamma.copy_(0.2 + 1.8 * torch.rand(ls.gamma.shape, generator=g))
        model.visual.positional_embedding[1 + 3, CHANNELS[0]] += 40.0
        model.visual.positional_embedding[1 + 9, CHANNELS[1]] += 40.0
    return model


@pytest.mark.parametrize("layers,layerscale,size", [(2, False, (40, 56)), (4, True, (24, 40)),
                                                   (2, True, (32, 32))],
                         ids=["5x7", "layerscale-3x5", "layerscale-native"])
def test_rfclip_matches_reference(layers, layerscale, size):
    visual = _vit(layers, layerscale).visual
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(layers))
    out = dense_features(visual, pixels, "rfclip", mode_options={"channels": CHANNELS})
    ref, glob = reference_rfclip(visual, pixels, CHANNELS)
    assert reference_rfclip.fixed_tokens > 0  # the distraction fix was exercised
    assert out.features.shape == ref.shape == (2, 32, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(out.features.to(REF_DTYPE), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.state["global"].to(REF_DTYPE), glob, atol=ATOL, rtol=0)


def test_rfclip_fix_and_channels_matter():
    """Guards the test above: other channels (no fix) give other features, and rfclip is not
    naclip."""
    visual = _vit().visual
    pixels = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    fixed = dense_features(visual, pixels, "rfclip", mode_options={"channels": CHANNELS}).features
    other = dense_features(visual, pixels, "rfclip", mode_options={"channels": (0,)}).features
    naclip = dense_features(visual, pixels, "naclip").features
    assert (fixed - other).abs().max() > 1e-3 and (fixed - naclip).abs().max() > 1e-3


def test_distraction_channels_published_by_width_else_estimated_once():
    visual = _vit().visual
    assert PUBLISHED_CHANNELS[768] == (4, 162, 189, 326, 429, 474, 633, 713)
    assert distraction_channels(visual, (1, 2)) == (1, 2)
    with pytest.raises(InvalidInputError, match="rfclip_channels"):
        distraction_channels(visual, (48,))
    first = estimated_channels(visual)
    assert len(first) == 8 and all(0 <= c < 48 for c in first)
    assert CHANNELS[0] in first and CHANNELS[1] in first  # the over-activated ones are found
    assert distraction_channels(visual) == first == estimated_channels(visual)


def test_text_clusters_cut_complete_linkage_at_the_threshold():
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(2, 16, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.cat([base[:1] + 0.05 * torch.randn(3, 16, generator=g, dtype=torch.float64),
                                  base[1:] + 0.05 * torch.randn(2, 16, generator=g, dtype=torch.float64)]), dim=-1)
    clusters = text_clusters(text, 0.1)
    assert len(set(clusters[:3])) == 1 and len(set(clusters[3:])) == 1 and clusters[0] != clusters[3]
    assert sorted(set(clusters.tolist())) == [0, 1]
    assert len(set(text_clusters(text, 0.0).tolist())) == 5  # nothing within distance 0
    # Complete linkage: the largest pairwise distance inside a cluster stays at most the cut.
    dist = 1 - (text @ text.T).numpy()
    for c in set(clusters.tolist()):
        members = np.flatnonzero(clusters == c)
        assert dist[np.ix_(members, members)].max() <= 0.1


@pytest.mark.parametrize("text_weight,global_weight", [(0.04, 0.25), (0.5, 0.0), (0.0, 0.4)])
def test_rfclip_logits_match_reference(text_weight, global_weight):
    g = torch.Generator().manual_seed(1)
    features = F.normalize(torch.randn(2, 16, 3, 5, generator=g), dim=1)
    text = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    glob = F.normalize(torch.randn(2, 16, generator=g), dim=-1)
    clusters = np.array([0, 1, 0, 2, 1, 3])
    out = rfclip_logits(features, text, glob, clusters, text_weight, global_weight)
    ref = reference_rfclip_logits(features, text, glob, clusters, text_weight, global_weight)
    torch.testing.assert_close(out.to(REF_DTYPE), ref, atol=ATOL, rtol=0)
    plain = torch.einsum("bdhw,qd->bqhw", features, text)
    assert (out - plain).abs().max() > 1e-3  # the text side changed the cosines


def test_segmenter_rfclip_image_global_is_one_more_encoder_pass(tiny_vit):
    """rfclip_global="image": every window takes the global embedding of the whole image at
    processing size (one extra encoder pass); whole-image reads are the same either way."""
    image = blocky_rgb(48, 64, seed=2, block=8)
    seg = Segmenter(tiny_vit, text_cache=None, templates="single", denoise=False,
                    precision="fp32", mode="rfclip")
    estimated_channels(tiny_vit.visual)  # its one encoder pass, once per model, done here
    with EncoderCalls(tiny_vit.visual) as calls:
        own = seg.encode(image, window=32, stride=16)
        assert calls.count == len(own.windows) == 6
        whole = seg.encode(image, window=32, stride=16, rfclip_global="image")
        assert calls.count == 2 * 6 + 1
    pixels = seg._pixels(image.astype(np.float32) / 255.0, (48, 64))
    expected = dense_features(tiny_vit.visual, pixels, "rfclip").state["global"][0]
    for w in whole.windows:
        torch.testing.assert_close(w.state["global"], expected, atol=1e-6, rtol=0)
    assert (own.windows[0].state["global"] - expected).abs().max() > 1e-4
    a = seg.segment(own, "red, green, blue")
    b = seg.segment(whole, "red, green, blue")
    assert not np.allclose(a.probabilities, b.probabilities, atol=1e-4)
    assert b.settings["rfclip_global"] == "image" and b.settings["mode"] == "rfclip"
    one = seg(image, "red, green", rfclip_global="image")
    two = seg(image, "red, green")
    np.testing.assert_allclose(one.probabilities, two.probabilities, atol=1e-6)


def test_segmenter_rfclip_logits_follow_the_query_settings(tiny_vit):
    """The text side is query-time: new weights re-read cached features, no encoder pass."""
    image = blocky_rgb(32, 40, seed=3, block=8)
    seg = Segmenter(tiny_vit, text_cache=None, templates="single", denoise=False,
                    precision="fp32", mode="rfclip")
    features = seg.encode(image)
    with EncoderCalls(tiny_vit.visual) as calls:
        a = seg.segment(features, "red, green, blue")
        b = seg.segment(features, "red, green, blue", rfclip_global_weight=0.0, rfclip_text_weight=0.0)
        assert calls.count == 0
    text = seg.text.embed_texts(["red", "green", "blue"], ("a photo of a {}.",), precision="fp32")
    cos = torch.einsum("dhw,qd->qhw", features.windows[0].features, text.float())
    up = F.interpolate(cos[None], size=(32, 40), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(b.probabilities, torch.softmax(100 * up, dim=0).numpy(), atol=1e-5)
    assert not np.allclose(a.probabilities, b.probabilities, atol=1e-4)


def test_rfclip_is_vit_only_and_settings_are_checked(tiny_resnet):
    from napari_maskclip.engine.settings import SegmentSettings
    from napari_maskclip.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="ViT"):
        Segmenter(tiny_resnet, text_cache=None, mode="rfclip")
    for bad in ({"rfclip_global": "crop"}, {"rfclip_global_weight": 1.5},
                {"rfclip_channels": (-1,)}, {"rfclip_cluster_threshold": 3.0}):
        with pytest.raises(InvalidInputError):
            SegmentSettings(mode="rfclip", **bad).validate()
