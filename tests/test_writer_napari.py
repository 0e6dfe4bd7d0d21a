"""Save from a real viewer: the writer finds the source image and confidence layers in it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_maskclip.export import read_dataset  # noqa: E402


def test_save_from_a_viewer_exports_the_source_image(make_napari_viewer, tmp_path):
    import npe2

    npe2.PluginManager.instance().discover()
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    image = viewer.add_image(pixels, rgb=True, name="photo")
    labels = rng.integers(0, 3, (16, 20)).astype(np.uint8)
    layer = viewer.add_labels(labels, name="photo [maskclip]", metadata={"napari_maskclip": {
        "role": "labels", "source_id": str(image.unique_id), "source_name": "photo",
        "class_texts": ["cat", "dog"], "background": "background"}})
    # What File > Save Selected Layers does with the Labels layer selected.
    viewer.layers.selection = {layer}
    written = viewer.layers.save(str(tmp_path / "ds"), selected=True, plugin="napari-maskclip")
    assert written
    sample = read_dataset(tmp_path / "ds")["photo"]
    np.testing.assert_array_equal(sample.read_image(), pixels)
    np.testing.assert_array_equal(sample.read_mask(), labels)
