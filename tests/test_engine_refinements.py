"""PAMR and region voting as query-time options of the Segmenter and the student's teacher.

References: whole-image float64 logits from engine_helpers, the brute-force PAMR of
test_engine_pamr, and per-region means written here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_helpers import (EncoderCalls, assert_labels, blocky_rgb, class_probs, reference_logits,
                            reference_pamr, text_embeddings)
from napari_maskclip.engine import Segmenter
from napari_maskclip.engine import segmenter as segmenter_module
from napari_maskclip.errors import InvalidInputError

CLASSES = ["red", "green", "blue"]


def _segmenter(tiny_vit, **settings):
    return Segmenter(tiny_vit, text_cache=None, templates="single", denoise=False, **settings)


def _reference_probs(tiny_vit, image, pamr_iters=0):
    text = text_embeddings(tiny_vit.model, tiny_vit.tokenizer, CLASSES, ["a photo of a {}."])
    logits, _, _ = reference_logits(tiny_vit, image.astype(np.float64) / 255.0, text)
    if pamr_iters:
        guide = (image.astype(np.float32) / 255.0).astype(np.float16).astype(np.float64)
        logits = torch.from_numpy(reference_pamr(guide.transpose(2, 0, 1), logits.numpy(), pamr_iters, (1, 2)))
    return class_probs(logits, [[0], [1], [2]], 100.0)


def test_pamr_labels_match_reference_and_requery_needs_no_encoder(tiny_vit):
    image = blocky_rgb(24, 32, seed=1, block=8)
    seg = _segmenter(tiny_vit)
    with EncoderCalls(tiny_vit.visual) as calls:
        features = seg.encode(image)
        plain = seg.segment(features, CLASSES)
        refined = seg.segment(features, CLASSES, pamr=True, pamr_iterations=3, pamr_dilations=(1, 2))
        assert calls.count == 1  # PAMR is a query-time option
    ref = _reference_probs(tiny_vit, image, pamr_iters=3)
    np.testing.assert_allclose(refined.probabilities, ref.numpy(), atol=1e-3)
    assert_labels(refined.labels, ref)
    assert not np.allclose(plain.probabilities, refined.probabilities, atol=1e-3)
    assert refined.settings["pamr"] is True and refined.settings["pamr_iterations"] == 3
    assert refined.settings["pamr_dilations"] == [1, 2]


def test_pamr_in_row_blocks_with_halo_equals_one_block(tiny_vit, monkeypatch):
    image = blocky_rgb(72, 40, seed=2, block=8)
    # Resized, so rows are resampled per block; halo 3 x 2 = 6 rows, blocks of max(7, 4 x 6) rows.
    seg = _segmenter(tiny_vit, pamr=True, pamr_iterations=3, pamr_dilations=(1, 2), short_side=24)
    features = seg.encode(image)
    whole = seg.segment(features, CLASSES)
    monkeypatch.setattr(segmenter_module, "_REFINE_ROWS", 7)
    monkeypatch.setattr(segmenter_module, "_PAMR_WHOLE_PIXELS", 0)
    blocks = seg.segment(features, CLASSES)
    np.testing.assert_allclose(blocks.probabilities, whole.probabilities, atol=1e-5)
    assert np.mean(blocks.labels == whole.labels) > 0.999
    # The default (official) dilations 8 and 16: a 160-px halo, blocks of 640 rows.
    default = _segmenter(tiny_vit, pamr=True)
    monkeypatch.setattr(segmenter_module, "_REFINE_ROWS", 256)
    one = default.segment(default.encode(image), CLASSES)
    assert one.settings["pamr_dilations"] == [8, 16]


def test_region_voting_with_a_label_image(tiny_vit, monkeypatch):
    image = blocky_rgb(24, 32, seed=3, block=8)
    regions = np.zeros((24, 32), np.int32)
    regions[:12, :16] = 5
    regions[12:, 8:] = 9  # the rest is 0: no region, pixels keep their own probabilities
    seg = _segmenter(tiny_vit)
    monkeypatch.setattr(segmenter_module, "_REFINE_ROWS", 5)  # the two passes cross blocks
    result = seg(image, CLASSES, regions=regions)
    ref = _reference_probs(tiny_vit, image).numpy()
    for r in (5, 9):
        sel = regions == r
        mean = ref[:, sel].mean(axis=1)
        np.testing.assert_allclose(result.probabilities[:, sel], np.repeat(mean[:, None], sel.sum(), 1), atol=1e-4)
        assert len(np.unique(result.labels[sel])) == 1
        assert result.labels[sel][0] == mean.argmax() + 1
    np.testing.assert_allclose(result.probabilities[:, regions == 0], ref[:, regions == 0], atol=1e-4)
    assert result.settings["regions"] == "labels"


def test_superpixel_voting_is_cached_and_recorded(tiny_vit, monkeypatch):
    image = blocky_rgb(32, 32, seed=4, block=16)
    seg = _segmenter(tiny_vit)
    features = seg.encode(image)
    calls = []
    original = segmenter_module.superpixels
    monkeypatch.setattr(segmenter_module, "superpixels",
                        lambda *a, **k: calls.append(k) or original(*a, **k))
    a = seg.segment(features, CLASSES, regions="slic", slic_segments=4, slic_compactness=5.0)
    b = seg.segment(features, CLASSES, regions="slic", slic_segments=4, slic_compactness=5.0)
    assert len(calls) == 1 and calls[0] == {"n_segments": 4, "compactness": 5.0}
    assert np.array_equal(a.labels, b.labels)
    assert a.settings["regions"] == "slic" and a.settings["slic_segments"] == 4
    # The four 16-px blocks are the superpixels: one label per block.
    for y in (0, 16):
        for x in (0, 16):
            assert len(np.unique(a.labels[y:y + 16, x:x + 16])) == 1
    fz = seg.segment(features, CLASSES, regions="felzenszwalb", felzenszwalb_min_size=10)
    assert fz.settings["felzenszwalb_min_size"] == 10 and len(calls) == 2


def test_region_and_pamr_settings_are_validated(tiny_vit):
    seg = _segmenter(tiny_vit)
    features = seg.encode(blocky_rgb(16, 16))
    with pytest.raises(InvalidInputError, match="label image"):
        seg.segment(features, CLASSES, regions="labels")
    with pytest.raises(InvalidInputError, match="same size"):
        seg.segment(features, CLASSES, regions=np.ones((8, 8), int))
    with pytest.raises(InvalidInputError, match="Unknown regions"):
        seg.segment(features, CLASSES, regions="watershed")
    with pytest.raises(InvalidInputError, match="pamr_dilations"):
        seg.segment(features, CLASSES, pamr=True, pamr_dilations=(0,))


@pytest.mark.parametrize("refinement", [{"pamr": True, "pamr_iterations": 4},
                                        {"regions": "slic", "slic_segments": 6},
                                        {"pamr": True, "regions": "felzenszwalb", "felzenszwalb_min_size": 20},
                                        {"mode": "naclip", "attention_regions": "felzenszwalb",
                                         "felzenszwalb_min_size": 20},
                                        {"mode": "sclip", "pos_embed_resize": "scale_factor",
                                         "partial_patches": "drop"},
                                        {"mode": "rfclip"},
                                        {"mode": "resclip", "resclip_temp_threshold": 0.0},
                                        {"tlp": True, "tlp_grid": 10, "regions": "slic",
                                         "region_vote": "majority", "slic_segments": 6}],
                         ids=["pamr", "slic", "pamr+felzenszwalb", "attention-regions",
                              "reference-conventions", "rfclip", "resclip", "tlp+majority"])
def test_teacher_reads_crops_with_the_same_refinements(tiny_vit, refinement):
    from napari_maskclip.student.teacher import Teacher
    from napari_maskclip.classes import parse_classes

    crops = [blocky_rgb(40, 48, seed=s, block=8) for s in (5, 6)]
    batch = torch.stack([torch.from_numpy(c.astype(np.float32) / 255.0).permute(2, 0, 1) for c in crops])
    seg = _segmenter(tiny_vit, precision="fp32", **refinement)
    teacher = Teacher(tiny_vit, parse_classes(CLASSES), parse_classes("background"), seg.settings,
                      text_cache=None)
    assert teacher.record()["settings"]["pamr"] == refinement.get("pamr", False)
    assert teacher.record()["settings"]["regions"] == refinement.get("regions")
    for i, crop in enumerate(crops):
        expected = seg(crop, CLASSES, background="background").labels.astype(np.int64)
        alone = teacher.pseudo_labels(batch[i:i + 1])[0].numpy()
        assert np.array_equal(alone, expected), i


def test_teacher_refuses_a_label_image_for_regions(tiny_vit):
    from napari_maskclip.engine.settings import SegmentSettings
    from napari_maskclip.student.teacher import Teacher
    from napari_maskclip.classes import parse_classes

    with pytest.raises(InvalidInputError, match="slic"):
        Teacher(tiny_vit, parse_classes(CLASSES), [], SegmentSettings(regions="labels"), text_cache=None)


def test_resized_guide_is_the_processing_image_restored(tiny_vit, monkeypatch):
    """refine_guide="resized" (the successors' presets): PAMR reads the image resized to the
    processing size and back, as the reference code's interpolate(inputs, ori_shape)."""
    import torch.nn.functional as F

    image = blocky_rgb(36, 52, seed=7, block=4)
    seg = _segmenter(tiny_vit, precision="fp32", pamr=True, pamr_iterations=3,
                     pamr_dilations=(1, 2), short_side=24)
    features = seg.encode(image)
    original = seg.segment(features, CLASSES)
    resized = seg.segment(features, CLASSES, refine_guide="resized")
    assert resized.settings["refine_guide"] == "resized"
    assert not np.allclose(original.probabilities, resized.probabilities, atol=1e-4)
    x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    proc = F.interpolate(x, size=features.proc_shape, mode="bilinear", align_corners=False,
                         antialias=True)
    back = F.interpolate(proc, size=(36, 52), mode="bilinear", align_corners=False)[0]
    (guide,) = features.guides.values()
    np.testing.assert_allclose(guide, back.permute(1, 2, 0).numpy(), atol=1e-6)
    seen = []
    original_pamr = segmenter_module.pamr
    monkeypatch.setattr(segmenter_module, "pamr",
                        lambda g, s, **k: seen.append(g.clone()) or original_pamr(g, s, **k))
    again = seg.segment(features, CLASSES, refine_guide="resized")
    np.testing.assert_allclose(seen[0][0].permute(1, 2, 0).numpy(), guide, atol=0)
    np.testing.assert_array_equal(again.labels, resized.labels)
