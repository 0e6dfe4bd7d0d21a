"""ResCLIP (mode ``resclip``) against the float64 reference of engine_helpers, written from the
authors' code's steps: blocks with full attention matrices, PAMR with loops, ``torch.mode`` for
the patch labels and a loop version of ``generate_attention_sfr``."""

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
    reference_resclip,
    reference_sfr,
    tiny_config,
)
from napari_maskclip.engine import Segmenter, dense_features
from napari_maskclip.engine.resclip import patch_labels, resclip_features, resclip_layers, sfr_attention
from napari_maskclip.engine.settings import SegmentSettings
from napari_maskclip.errors import InvalidInputError

ATOL = 1e-5


def _vit(layers: int = 2, layerscale: bool = False, seed: int = 1):
    cfg = tiny_config("tiny_vit")
    cfg["vision_cfg"]["layers"] = layers
    if layerscale:
        cfg["vision_cfg"]["ls_init_value"] = 0.1
    model = build_clip(cfg, seed=seed)
    if layerscale:
        g = torch.Generator().manual_seed(seed + 10)
        with torch.no_grad():
            for block in model.visual.transformer.resblocks:
                for ls in (block.ls_1, block.ls_2):
                    ls.gamma.copy_(0.2 + 1.8 * torch.rand(ls.gamma.shape, generator=g))
    return model


def test_rcs_layers_are_the_official_ones_at_twelve_layers():
    assert resclip_layers(12) == (5, 6, 7, 8)  # blocks 6..9
    assert resclip_layers(2) == (0,) and resclip_layers(4) == (1,)


@pytest.mark.parametrize("base,layers,layerscale,size,seed", [
    ("naclip", 2, False, (24, 40), 3),
    ("clearclip", 4, True, (24, 32), 9),
    ("sclip", 2, True, (16, 40), 2),
], ids=["naclip-3x5", "clearclip-layerscale-3x4", "sclip-layerscale-2x5"])
def test_resclip_matches_reference(base, layers, layerscale, size, seed):
    visual = _vit(layers, layerscale).visual
    # Seeds whose temporary labels hold three prompts (so the feedback has regions to shape).
    pixels = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
    text = F.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    options = {"base": base, "rcs_weights": (2.0, 0.4)}
    out = dense_features(visual, pixels, "resclip", mode_options=options)
    final = resclip_features(visual, out.features, out.state, text, 8, base=base,
                             rcs_weights=(2.0, 0.4), sfr_weights=(1.8, 0.7), scale=40.0,
                             threshold=0.3)
    ref, ref_rcs, labels = reference_resclip(visual, pixels, text, base=base, threshold=0.3,
                                             rcs_layers=resclip_layers(layers))
    assert len(torch.unique(labels[0])) > 1  # the feedback had several labels to work with
    torch.testing.assert_close(out.features.to(REF_DTYPE), ref_rcs, atol=ATOL, rtol=0)
    torch.testing.assert_close(final.to(REF_DTYPE), ref, atol=ATOL, rtol=0)
    assert (final - out.features).abs().max() > 1e-3  # the feedback changed the features


def test_sfr_matches_reference_and_decays_broken_paths():
    # A U-shaped label 1: its two arms are one label but the straight path between them crosses 0.
    labels = torch.tensor([[1, 0, 0, 1],
                           [1, 0, 2, 1],
                           [1, 1, 1, 1]])
    got = sfr_attention(labels)
    ref = reference_sfr(labels)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    plain = sfr_attention(labels, delete_same_entity=False)
    torch.testing.assert_close(plain, reference_sfr(labels, delete_same_entity=False), atol=1e-12, rtol=0)
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got.sum(dim=1), torch.ones(12, dtype=torch.float64), atol=1e-7, rtol=0)
    # Many labels at random (most paths cross another label) and large regions (most do not).
    g = torch.Generator().manual_seed(0)
    for grid in (torch.randint(0, 4, (5, 7), generator=g),
                 (torch.arange(6)[:, None] // 3 + 2 * (torch.arange(8)[None] > 4)).long()):
        torch.testing.assert_close(sfr_attention(grid), reference_sfr(grid), atol=1e-12, rtol=0)


def test_patch_label_is_the_most_frequent_pixel_label_lowest_on_ties():
    """Each patch takes its pixels' most frequent label, the lowest among ties (CPU torch.mode's
    rule); pixels below the threshold count as prompt 0."""
    from napari_maskclip.engine.pamr import pamr

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 4, 6, generator=g)  # 2 prompts; 2-px patches: 4 pixels each
    guide = torch.rand(3, 8, 12, generator=g)
    for threshold in (0.0, 0.9):
        labels = patch_labels(scores, guide, 2, (4, 6), scale=40.0, threshold=threshold)
        up = F.interpolate(scores[None], size=(8, 12), mode="bilinear", align_corners=False)
        probs = torch.softmax(pamr(guide[None], up, iterations=10, dilations=(8, 16))[0] * 40, dim=0)
        best = probs.argmax(dim=0)
        best[probs.max(dim=0).values < threshold] = 0
        cells = best.unfold(0, 2, 2).unfold(1, 2, 2).reshape(4, 6, 4)
        assert torch.equal(labels, torch.mode(cells, dim=-1).values)
        ties = ((cells == 0).sum(-1) == 2)
        if threshold == 0.0:
            assert bool(ties.any()) and bool((labels[ties] == 0).all())  # ties were resolved low


def test_segmenter_resclip_requery_changes_features_without_an_encoder_pass(tiny_vit):
    """ResCLIP's feedback reads the class names: other names change its features, yet a
    re-query only reruns the last block (the encoder's patch embedding is not called)."""
    image = blocky_rgb(32, 48, seed=4, block=8)
    seg = Segmenter(tiny_vit, text_cache=None, templates="single", denoise=False,
                    precision="fp32", mode="resclip", resclip_temp_threshold=0.0)
    features = seg.encode(image, window=32, stride=16)
    assert set(features.windows[0].state) == {"last_in", "rcs_in", "pixels"}
    with EncoderCalls(tiny_vit.visual) as calls:
        a = seg.segment(features, "red, green, blue")
        b = seg.segment(features, "red, green, blue", resclip_sfr_weights=(1.8, 0.0))
        c = seg.segment(features, "cat, dog, tree")
        assert calls.count == 0
    assert not np.allclose(a.probabilities, b.probabilities, atol=1e-4)
    assert a.settings["mode"] == "resclip" and a.settings["resclip_base"] == "naclip"
    assert c.probabilities.shape == a.probabilities.shape
    # The same query through the teacher's path (the crop read whole) equals the engine.
    whole = seg(image[:32, :32], "red, green, blue")
    from napari_maskclip.classes import parse_classes
    from napari_maskclip.student.teacher import Teacher

    teacher = Teacher(tiny_vit, parse_classes("red, green, blue"), parse_classes("background"),
                      seg.settings, text_cache=None)
    crop = torch.from_numpy(image[:32, :32].astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    labels = teacher.pseudo_labels(crop)[0].numpy()
    expected = seg(image[:32, :32], "red, green, blue", background="background").labels
    assert np.array_equal(labels, expected.astype(np.int64))
    assert whole.labels.shape == (32, 32)


def test_resclip_settings_are_checked(tiny_resnet):
    from napari_maskclip.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="ViT"):
        Segmenter(tiny_resnet, text_cache=None, mode="resclip")
    for bad in ({"resclip_base": "maskclip"}, {"resclip_rcs_weights": (2.0,)},
                {"resclip_sfr_weights": (0.0, 0.5)}, {"resclip_temp_threshold": -0.1}):
        with pytest.raises(InvalidInputError):
            SegmentSettings(mode="resclip", **bad).validate()
    s = SegmentSettings(mode="resclip").replace(resclip_rcs_weights=[2.0, 0.3])
    assert s.resclip_rcs_weights == (2.0, 0.3) and s.validate() is s
