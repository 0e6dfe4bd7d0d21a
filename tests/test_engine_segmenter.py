"""The Segmenter end to end: whole image and sliding windows against the float64 reference,
background, label dtype, progress and cancellation, feature re-use, large images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine_helpers import (
    COARSE_VIT,
    REF_DTYPE,
    EncoderCalls,
    assert_labels,
    blocky_rgb,
    build_clip,
    class_probs,
    random_rgb,
    reference_logits,
    reference_resnet_value,
    reference_window_logits,
    text_embeddings,
    upsample_crop,
    window_starts,
)
from napari_maskclip.engine import SegmentationResult, Segmenter, wrap_model
from napari_maskclip.errors import InvalidInputError
from napari_maskclip.progress import Progress

SINGLE = ["a photo of a {}."]
NAMES = ["cat", "dog", "tree"]


@pytest.fixture
def seg(tiny_vit):
    return Segmenter(tiny_vit, templates="single", denoise=False, text_cache=None)


def _ref_probs(loaded, image, names=NAMES, scale=100.0, mode="maskclip"):
    text = text_embeddings(loaded.model, loaded.tokenizer, names, SINGLE)
    logits, _, _ = reference_logits(loaded, image / 255.0, text, mode)
    return class_probs(logits, [[i] for i in range(len(names))], scale)


def _assert_matches(result: SegmentationResult, probs: torch.Tensor):
    np.testing.assert_allclose(result.probabilities, probs.numpy(), atol=1e-5, rtol=0)
    assert_labels(result.labels, probs)


# ---- whole image --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["maskclip", "naclip"])
@pytest.mark.parametrize("size", [(40, 48), (37, 50)], ids=["multiple-of-patch", "padded"])
def test_whole_image_matches_reference(seg, tiny_vit, mode, size):
    image = blocky_rgb(*size, seed=1, block=8)
    result = seg(image, NAMES, mode=mode, logit_scale=20.0)
    assert result.labels.shape == size and result.labels.dtype == np.uint8
    assert result.probabilities.shape == (3, *size) and result.probabilities.dtype == np.float32
    assert result.settings["inference"] == "whole"
    _assert_matches(result, _ref_probs(tiny_vit, image, scale=20.0, mode=mode))


def test_resnet_whole_image_matches_reference(tiny_resnet):
    seg = Segmenter(tiny_resnet, templates="single", denoise=False, text_cache=None)
    image = blocky_rgb(80, 100, seed=2)
    captured = []
    handle = tiny_resnet.visual.layer4.register_forward_hook(lambda m, a, o: captured.append(o))
    try:
        result = seg(image, NAMES, logit_scale=20.0)
    finally:
        handle.remove()
    (x4,) = captured  # the open_clip trunk's output (the part MaskCLIP does not change)
    feat = reference_resnet_value(tiny_resnet.visual.attnpool, x4.flatten(2).transpose(1, 2))[0]
    feat = feat / feat.norm(dim=-1, keepdim=True)
    text = text_embeddings(tiny_resnet.model, tiny_resnet.tokenizer, NAMES, SINGLE)
    gh, gw = x4.shape[-2:]
    assert (gh, gw) == (math.ceil(80 / 32), math.ceil(100 / 32))
    cells = (feat @ text.T).T.reshape(3, gh, gw)
    probs = class_probs(upsample_crop(cells, 32, 80, 100), [[0], [1], [2]], 20.0)
    _assert_matches(result, probs)


def test_probabilities_sum_to_one_over_classes(seg):
    result = seg(random_rgb(32, 40), NAMES)
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)


# ---- sliding windows ----------------------------------------------------------------------
@pytest.mark.parametrize("window,stride", [(64, 32), (48, 48)])
def test_window_covering_the_image_equals_whole_image(seg, window, stride):
    image = blocky_rgb(40, 48, seed=3)
    whole = seg(image, NAMES)
    windowed = seg(image, NAMES, window=window, stride=stride)
    np.testing.assert_allclose(windowed.probabilities, whole.probabilities, atol=1e-6, rtol=0)
    assert np.array_equal(windowed.labels, whole.labels)


@pytest.mark.parametrize("size,window,stride", [
    ((64, 96), 48, 24),
    ((60, 90), 44, 20),   # crops not a multiple of the patch: padded per window
    ((40, 100), 48, 32),  # one crop along the short axis
])
def test_sliding_windows_match_reference(seg, tiny_vit, size, window, stride):
    image = blocky_rgb(*size, seed=4, block=8)
    with EncoderCalls(tiny_vit.visual) as calls:
        result = seg(image, NAMES, window=window, stride=stride, logit_scale=20.0)
    n_windows = len(window_starts(size[0], window, stride)) * len(window_starts(size[1], window, stride))
    assert calls.count == n_windows  # window_batch=1: one pass per crop
    assert result.settings["inference"] == "sliding"
    text = text_embeddings(tiny_vit.model, tiny_vit.tokenizer, NAMES, SINGLE)
    logits = reference_window_logits(tiny_vit, image / 255.0, text, window, stride)
    _assert_matches(result, class_probs(logits, [[0], [1], [2]], 20.0))


def test_window_batch_changes_passes_not_results(seg, tiny_vit):
    image = blocky_rgb(64, 96, seed=5)
    one = seg(image, NAMES, window=48, stride=24)
    seg.features_cache.clear()
    with EncoderCalls(tiny_vit.visual) as calls:
        four = seg(image, NAMES, window=48, stride=24, window_batch=4)
    assert calls.count == math.ceil(6 / 4)
    np.testing.assert_allclose(four.probabilities, one.probabilities, atol=1e-5, rtol=0)


def test_large_image_switches_to_sliding_windows(seg, tiny_vit):
    image = blocky_rgb(100, 120, seed=6)
    with EncoderCalls(tiny_vit.visual) as calls:
        result = seg(image, NAMES, max_whole_pixels=64 * 64, auto_window=64)
    assert result.settings["inference"] == "sliding"
    assert result.settings["window_used"] == 64
    stride = result.settings["stride_used"]
    assert 0 < stride <= 64
    assert calls.count == len(window_starts(100, 64, stride)) * len(window_starts(120, 64, stride))


@pytest.mark.slow
def test_4096_square_image_in_sliding_windows():
    """A 4096 x 4096 image runs window by window with bounded work (a 32-px-patch toy ViT)."""
    loaded = wrap_model(build_clip(COARSE_VIT, seed=0), name="coarse")
    seg = Segmenter(loaded, templates="single", denoise=False, text_cache=None)
    small = np.random.default_rng(7).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(small, 128, axis=0), 128, axis=1)
    progress: list[Progress] = []
    gen = seg.run_iter(image, "cat, dog", window=1024, stride=1024, window_batch=4)
    with EncoderCalls(loaded.visual) as calls:
        while True:
            try:
                progress.append(next(gen))
            except StopIteration as stop:
                result = stop.value
                break
    assert result.labels.shape == (4096, 4096)
    assert result.probabilities.shape == (2, 4096, 4096)
    assert result.settings["inference"] == "sliding"
    assert calls.count == 16 // 4
    assert max(c.shape[-1] for c in calls.inputs) == 1024  # never the whole image at once
    encode = [p for p in progress if p.stage == "encode"]
    assert encode[-1].done == encode[-1].total == 16
    rows = slice(0, 4096, 97)
    expected = result.probabilities[:, rows, rows].argmax(0) + 1
    assert np.array_equal(result.labels[rows, rows], expected)


# ---- background, label dtype ---------------------------------------------------------------
def test_named_background_classes_become_label_zero(seg, tiny_vit):
    image = blocky_rgb(40, 48, seed=8)
    result = seg(image, "cat, dog", background="tree; sky", logit_scale=20.0)
    names = ["cat", "dog", "tree", "sky"]
    text = text_embeddings(tiny_vit.model, tiny_vit.tokenizer, names, SINGLE)
    logits, _, _ = reference_logits(tiny_vit, image / 255.0, text)
    probs = class_probs(logits, [[0], [1], [2, 3]], 20.0)
    assert result.class_names == ["cat", "dog"]
    assert [b.text for b in result.background] == ["tree; sky"]
    np.testing.assert_allclose(result.probabilities, probs[:2].numpy(), atol=1e-5, rtol=0)
    expected = np.array([1, 2, 0])[probs.argmax(0).numpy()]
    assert_labels(result.labels, probs, values=[1, 2, 0])
    assert (expected == 0).any() and (expected > 0).any(), "pick a seed where both occur"


def test_background_by_probability_threshold(seg, tiny_vit):
    image = blocky_rgb(40, 48, seed=9, block=8)
    probs = _ref_probs(tiny_vit, image, scale=5.0)
    best = probs.max(0).values
    threshold = float(best.median())
    result = seg(image, NAMES, logit_scale=5.0, background_threshold=threshold)
    expected = probs.argmax(0).numpy() + 1
    expected[best.numpy() < threshold] = 0
    near = np.abs(best.numpy() - threshold) < 1e-5
    assert_labels(result.labels, probs, expected=expected, undecided=near)
    assert 0 < (expected == 0).mean() < 1


def test_background_name_duplicating_a_class_is_refused(seg):
    with pytest.raises(InvalidInputError):
        seg(random_rgb(32, 32), "cat, dog", background="Dog")


@pytest.mark.parametrize("n_classes,dtype", [(255, np.uint8), (300, np.uint16)])
def test_label_dtype_grows_beyond_255_classes(seg, n_classes, dtype):
    names = [f"thing {i}" for i in range(n_classes)]
    result = seg(random_rgb(16, 24, seed=10), names, logit_scale=1000.0)
    assert result.labels.dtype == dtype
    assert result.probabilities.shape == (n_classes, 16, 24)
    assert np.array_equal(result.labels, result.probabilities.argmax(0) + 1)
    if n_classes > 255:
        assert int(result.labels.max()) > 255, "no label above 255 to prove the wider dtype"


# ---- progress and cancellation ------------------------------------------------------------
def test_progress_reports_windows_done_of_total(seg):
    image = blocky_rgb(64, 96, seed=11)
    steps = []
    gen = seg.run_iter(image, NAMES, window=48, stride=24)
    try:
        while True:
            steps.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    assert isinstance(result, SegmentationResult)
    assert all(isinstance(s, Progress) for s in steps)
    for stage in ("encode", "segment"):
        mine = [s for s in steps if s.stage == stage]
        assert mine, stage
        assert all(s.total == 6 for s in mine)
        done = [s.done for s in mine]
        assert done == sorted(done) and done[-1] == 6 and done[0] < 6


def test_closing_encode_mid_way_caches_nothing_and_stops_the_encoder(seg, tiny_vit):
    image = blocky_rgb(64, 96, seed=12)
    with EncoderCalls(tiny_vit.visual) as calls:
        gen = seg.encode_iter(image, window=48, stride=24)
        first = next(gen)
        assert first.done == 0
        next(gen)  # one window encoded
        assert calls.count == 1
        gen.close()
        assert calls.count == 1
        assert len(seg.features_cache) == 0
        features = seg.encode(image, window=48, stride=24)  # starts over: all 6 windows
        assert calls.count == 1 + 6
    assert len(features.windows) == 6


def test_closing_a_run_mid_way_returns_nothing_and_later_runs_work(seg, tiny_vit):
    image = blocky_rgb(64, 96, seed=13)
    gen = seg.run_iter(image, NAMES, window=48, stride=24)
    for _ in range(3):
        next(gen)
    gen.close()
    with pytest.raises(StopIteration):
        next(gen)
    with EncoderCalls(tiny_vit.visual) as calls:
        result = seg(image, NAMES, window=48, stride=24)
    assert calls.count == 6
    assert result.labels.shape == (64, 96)


# ---- re-query without the image encoder ---------------------------------------------------
def test_new_class_names_do_not_run_the_image_encoder(seg, tiny_vit):
    image = blocky_rgb(40, 48, seed=14)
    with EncoderCalls(tiny_vit.visual) as calls:
        features = seg.encode(image)
        assert calls.count == 1
        seg.segment(features, "cat, dog")
        seg.segment(features, "sofa, floor, lamp")
        seg.segment(features, "sofa", background="wall", logit_scale=40.0, denoise=True,
                    templates=("a drawing of a {}.",), background_threshold=0.2)
        seg(image, "car, road")  # same image again: cached features
        seg(image.copy(), "car; automobile, road")  # equal content, another array
        assert calls.count == 1
        assert seg.image_encoder_calls == 1
        changed = image.copy()
        changed[0, 0, 0] ^= 1
        seg(changed, "car, road")
        assert calls.count == 2
        seg(image, "car, road", mode="sclip")
        assert calls.count == 3
        seg(image, "car, road", short_side=64)
        assert calls.count == 4
        seg(image, "car, road", window=32, stride=16)
        assert calls.count > 4
    assert seg.image_encoder_calls == calls.count


def test_requery_on_resnet_does_not_run_the_image_encoder(tiny_resnet):
    seg = Segmenter(tiny_resnet, templates="single", denoise=False, text_cache=None)
    image = blocky_rgb(64, 96, seed=15)
    with EncoderCalls(tiny_resnet.visual) as calls:
        seg(image, "cat, dog")
        seg(image, "tree, sky, road")
        assert calls.count == 1
        seg(image[:, ::-1], "tree")
        assert calls.count == 2


def test_key_smoothing_reuses_features_that_kept_the_keys(seg, tiny_vit):
    image = blocky_rgb(40, 48, seed=16)
    with EncoderCalls(tiny_vit.visual) as calls:
        seg(image, "cat, dog")
        seg(image, "cat, dog", key_smoothing=True)  # needs keys the first pass did not keep
        assert calls.count == 2
        seg(image, "cat, dog", key_smoothing=True)
        seg(image, "tree, dog")  # the entry with keys serves plain queries too
        assert calls.count == 2


def test_features_of_another_model_are_refused(seg):
    other = Segmenter(wrap_model(build_clip(COARSE_VIT, seed=1)), templates="single", text_cache=None)
    features = other.encode(blocky_rgb(64, 64))
    with pytest.raises(InvalidInputError):
        seg.segment(features, "cat, dog")


def test_result_records_the_settings_the_features_were_encoded_with(seg):
    """Provenance: a query on features encoded in SCLIP mode must not claim another mode."""
    features = seg.encode(blocky_rgb(40, 48, seed=17), mode="sclip", short_side=64)
    result = seg.segment(features, "cat, dog")
    assert result.settings["mode"] == "sclip"
    assert result.settings["short_side"] == 64


# ---- resizing -----------------------------------------------------------------------------
@pytest.mark.parametrize("short_side", [24, 64])
def test_short_side_resize_returns_outputs_at_the_original_size(seg, tiny_vit, short_side):
    image = blocky_rgb(40, 60, seed=18)
    with EncoderCalls(tiny_vit.visual) as calls:
        features = seg.encode(image, short_side=short_side)
    proc = (short_side, round(60 * short_side / 40))
    assert tuple(features.proc_shape) == proc
    (pixels,) = calls.inputs
    assert tuple(pixels.shape[-2:]) == tuple(8 * math.ceil(s / 8) for s in proc)
    result = seg.segment(features, NAMES, logit_scale=20.0)
    assert result.labels.shape == (40, 60) and result.probabilities.shape == (3, 40, 60)
    assert result.settings["processing_shape"] == list(proc)
    # Cosines at processing size, resized bilinearly to the image size, then the softmax.
    text = seg.text.embed_texts(NAMES, SINGLE).to(REF_DTYPE)
    cells = torch.einsum("dhw,qd->qhw", features.windows[0].features.to(REF_DTYPE), text)
    logits = upsample_crop(cells, 8, *proc)
    logits = F.interpolate(logits[None], size=(40, 60), mode="bilinear", align_corners=False)[0]
    _assert_matches(result, class_probs(logits, [[0], [1], [2]], 20.0))


def test_feature_cache_is_bounded(tiny_vit):
    seg = Segmenter(tiny_vit, templates="single", denoise=False, text_cache=None, feature_cache_items=2)
    images = [blocky_rgb(32, 32, seed=30 + i) for i in range(3)]
    with EncoderCalls(tiny_vit.visual) as calls:
        for image in images:
            seg.encode(image)
        assert len(seg.features_cache) == 2
        seg.encode(images[2])  # still cached
        assert calls.count == 3
        seg.encode(images[0])  # evicted: encoded again
        assert calls.count == 4


def test_cached_encode_reports_itself_done(seg):
    image = blocky_rgb(64, 96, seed=19)
    seg.encode(image, window=48, stride=24)
    steps = list(_drain(seg.encode_iter(image, window=48, stride=24)))
    assert steps and steps[-1].done == steps[-1].total == 6


def _drain(gen):
    while True:
        try:
            yield next(gen)
        except StopIteration:
            return


def test_classes_table_describes_the_result(seg):
    result = seg(blocky_rgb(32, 40, seed=20), "cat, dog; puppy", background="sky")
    table = result.classes_table()
    assert [c["index"] for c in table["classes"]] == [1, 2]
    assert [c["name"] for c in table["classes"]] == ["cat", "dog"]
    assert table["classes"][1]["synonyms"] == ["dog", "puppy"]
    assert table["background"]["names"] == ["sky"]
    assert len(result.colors) == 2 and all(len(c) == 4 for c in result.colors)
    assert table["settings"]["model_identity"] == seg.loaded.identity
    import json

    assert json.loads(json.dumps(table)) == table  # written as *_classes.json by the CLI


def test_resnet_sliding_windows_with_key_smoothing(tiny_resnet):
    seg = Segmenter(tiny_resnet, templates="single", denoise=False, text_cache=None)
    image = blocky_rgb(96, 160, seed=21)
    with EncoderCalls(tiny_resnet.visual) as calls:
        result = seg(image, NAMES, window=64, stride=32, key_smoothing=True, logit_scale=10.0)
    n_windows = len(window_starts(96, 64, 32)) * len(window_starts(160, 64, 32))
    assert calls.count == n_windows
    assert result.labels.shape == (96, 160) and result.settings["inference"] == "sliding"
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(result.labels, result.probabilities.argmax(0) + 1)
