"""Memory of huge images: it grows with the window and the outputs, not with the image.

Images past the whole-image limit are converted window by window (only the window being encoded
is in float), the window scores are summed a band of rows at a time, images whose features would
not fit are streamed (features dropped after each window), and ``segment`` writes confidence maps
too large to hold block by block. Every one of these gives bit for bit the same result as the
whole-image path; the peak-RSS figure for a 16000 x 16000 image is in benchmarks/bench_engine.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import tifffile

from napari_maskclip.engine import Segmenter
from napari_maskclip.engine.stitch import ROW_BLOCK, RowStitcher
from napari_maskclip.engine.windows import window_boxes


def _gray(size: int, seed: int = 0) -> np.ndarray:
    """A smooth uint16 gray image (percentile scaling: the path with the most temporaries)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 4000, (size // 32 + 1, size // 32 + 1)).astype(np.float32)
    return np.kron(small, np.ones((32, 32), np.float32))[:size, :size].astype(np.uint16)


def _numpy_peak(fn) -> int:
    """Peak bytes numpy allocated while ``fn`` ran (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype, sizes, window", [
    (np.uint8, (512, 1024), 64),      # divided by 255
    (np.uint16, (2048, 4096), 256),   # robust percentiles, from a subsample of ~1M pixels
])
def test_window_preparation_memory_does_not_grow_with_the_image(tiny_vit, dtype, sizes, window):
    """Encoding 4x the pixels with the same window: numpy's peak stays that of a window (and of
    the percentiles' fixed-size subsample), not of a float copy of the image."""
    peaks = {}
    for size in sizes:
        image = _gray(size).astype(dtype)
        seg = Segmenter(tiny_vit, templates="single", window=window, stride=window,
                        text_cache=None, feature_cache_items=1)
        peaks[size] = _numpy_peak(lambda: seg.encode(image))
    whole_float = sizes[1] ** 2 * 3 * 4  # one float32 RGB copy of the big image
    assert peaks[sizes[1]] < whole_float / 8, peaks
    assert peaks[sizes[1]] < 1.5 * peaks[sizes[0]] + (1 << 20), peaks


_RSS_CHILD = r"""
import json, resource, sys
import numpy as np, torch
torch.set_num_threads(1)
from napari_maskclip.engine import Segmenter, load_clip
config, ckpt = sys.argv[1:3]
loaded = load_clip(config, ckpt, device="cpu")
def gray(size):  # smooth uint16, made without a full-size temporary
    small = np.random.default_rng(size).integers(0, 4000, (size // 32, size // 32)).astype(np.uint16)
    return np.repeat(np.repeat(small, 32, axis=0), 32, axis=1)
peaks = {}
for size in (1024, 3072):  # small first: ru_maxrss only grows
    seg = Segmenter(loaded, templates="single", window=128, stride=128, text_cache=None)
    seg.stream_bytes = 0  # as for a huge image: features are not kept for a re-query
    seg(gray(size), "cat, dog, tree", background="sky", probabilities=False)
    peaks[size] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(peaks))
"""


def test_peak_rss_grows_with_the_outputs_not_with_float_copies(tiny_vit_files):
    """3072^2 vs 1024^2, labels only, streamed: the peak grows by the image and its labels (3
    bytes per pixel here), the small per-window cosines and a band of rows, not by float copies
    of the image (12 bytes per pixel each) or full-size score maps (4 bytes per pixel and
    prompt)."""
    config, ckpt = tiny_vit_files
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(config), str(ckpt)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    peaks = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    extra_pixels = 3072 ** 2 - 1024 ** 2
    growth = peaks[3072] - peaks[1024]
    # uint16 image + uint8 labels = 3 bytes per pixel; 5 more cover the cosines (4 prompts x 4
    # bytes per 8x8 cell), the band (4 x ~400 rows x the width), the percentiles' subsample and
    # the allocator. (Before the window-by-window preparation, the band stitching and the
    # streaming this grew by over 40 bytes per pixel.)
    assert growth < 8 * extra_pixels, (growth / extra_pixels, peaks)


def test_stitching_holds_a_band_of_rows(tiny_vit):
    """The stitcher's buffer stays about a window plus a block tall, whatever the image height."""
    height, width, window, stride = 2000, 300, 128, 64
    plan = {"inference": "sliding", "window": window, "stride": stride}
    stitch = RowStitcher(2, (height, width), (height, width), plan)
    tallest, blocks = 0, []
    for box in window_boxes(height, width, window, stride):
        up = np.ones((2, box.height, box.width), np.float32)
        import torch

        blocks += [(y0, y1) for y0, y1, _ in stitch.add(box, torch.from_numpy(up))]
        tallest = max(tallest, stitch.band_rows)
    blocks += [(y0, y1) for y0, y1, _ in stitch.close()]
    assert tallest <= window + stride + ROW_BLOCK
    assert blocks == [(y, min(height, y + ROW_BLOCK)) for y in range(0, height, ROW_BLOCK)]


@pytest.mark.parametrize("settings", [
    dict(window=48, stride=16),
    dict(window=40, stride=20, key_smoothing=True),
    dict(short_side=70, window=40, stride=20),
    dict(max_whole_pixels=4000),
])
def test_streamed_images_match_the_cached_path_bit_for_bit(tiny_vit, settings):
    image = np.random.default_rng(0).integers(0, 256, (150, 203, 3), dtype=np.uint8)
    classes, background = "cat, dog; puppy, tree", "sky; floor"
    cached = Segmenter(tiny_vit, templates="single", text_cache=None, **settings)
    streamed = Segmenter(tiny_vit, templates="single", text_cache=None, **settings)
    streamed.stream_bytes = 0
    a = cached(image, classes, background=background)
    b = streamed(image, classes, background=background)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.probabilities, b.probabilities)
    assert len(streamed.features_cache) == 0 and len(cached.features_cache) == 1
    # Labels only, and maps handed out block by block: the same labels and maps.
    assert streamed(image, classes, background=background, probabilities=False).probabilities is None
    blocks = []
    c = streamed(image, classes, background=background,
                 probabilities=lambda y0, y1, block: blocks.append((y0, block)))
    assert c.probabilities is None and np.array_equal(c.labels, a.labels)
    assert np.array_equal(np.concatenate([b for _, b in blocks], axis=1), a.probabilities)


def test_segment_streams_large_confidence_maps_into_the_same_tiff(tmp_path, tiny_vit_files,
                                                                   monkeypatch):
    import imageio.v3 as iio

    import napari_maskclip.batch as batch
    from napari_maskclip.cli import main

    image = tmp_path / "a.png"
    iio.imwrite(image, np.random.default_rng(0).integers(0, 256, (300, 170, 3), dtype=np.uint8))
    config, ckpt = tiny_vit_files
    args = ["segment", str(image), "--classes", "cat, dog, tree", "--quiet", "--model",
            str(config), "--pretrained", str(ckpt), "--templates", "single", "--window", "64"]
    assert main(args + ["--out", str(tmp_path / "held")]) == 0
    monkeypatch.setattr(batch, "CONFIDENCE_IN_MEMORY", 0)
    assert main(args + ["--out", str(tmp_path / "streamed")]) == 0
    held = tifffile.imread(tmp_path / "held" / "a_confidence.tif")
    streamed = tifffile.imread(tmp_path / "streamed" / "a_confidence.tif")
    assert streamed.shape == (3, 300, 170) and np.array_equal(held, streamed)
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == [
        "a_classes.json", "a_confidence.tif", "a_labels.png"]  # the temporary raw file is gone
