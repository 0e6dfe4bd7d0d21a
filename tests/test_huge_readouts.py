"""Huge images (:func:`segment_large`) with the text-aware modes: each tile's windows read as the
single-process engine reads them (labels identical), and what needs the whole image refused."""

from __future__ import annotations

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")

from napari_maskclip.engine import Segmenter, load_clip  # noqa: E402
from napari_maskclip.engine.settings import SegmentSettings  # noqa: E402
from napari_maskclip.errors import InvalidInputError  # noqa: E402
from napari_maskclip.huge import segment_large  # noqa: E402
from napari_maskclip.progress import run_to_completion  # noqa: E402
from napari_maskclip.synthetic import make_scene  # noqa: E402

CLASSES = "red circle, green square, blue triangle"


@pytest.mark.parametrize("mode", ["rfclip", "resclip"])
def test_text_aware_modes_tile_like_the_whole_image_run(tmp_path, mode):
    scene = make_scene(seed=3, size=(130, 110), n_objects=(3, 4)).image
    settings = SegmentSettings(mode=mode, window=64, templates="single")
    seg = Segmenter(load_clip("demo", None, device="cpu", precision="fp32"), settings=settings)
    reference = seg(scene, CLASSES)
    assert len(np.unique(reference.labels)) >= 2
    source = tmp_path / "big.zarr"
    z = zarr.open_array(str(source), mode="w", shape=scene.shape, chunks=(50, 40, 3), dtype=scene.dtype)
    z[:] = scene
    out = tmp_path / "out.zarr"
    run_to_completion(segment_large(source, out, classes=CLASSES, model="demo", device="cpu",
                                    precision="fp32", settings=settings, chunk=64))
    root = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(root["labels"][:], reference.labels)
    np.testing.assert_allclose(root["confidence"][:].astype(np.float32), reference.probabilities,
                               atol=1e-3, rtol=0)


@pytest.mark.parametrize("changes,message", [({"mode": "rfclip", "rfclip_global": "image"}, "window"),
                                             ({"tlp": True}, "TLP")])
def test_whole_image_needs_are_refused(tmp_path, changes, message):
    with pytest.raises(InvalidInputError, match=message):
        run_to_completion(segment_large(tmp_path / "in.zarr", tmp_path / "out.zarr",
                                        classes=CLASSES, model="demo",
                                        settings=SegmentSettings(window=64, **changes)))
