"""Edited pixels and export plans without a viewer: the compressed record of what MaskCLIP wrote,
edited = current != recorded, stacks with a kept channel axis, NaN confidence for slices the run
did not compute, and which slices napari's Save exports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

napari_layers = pytest.importorskip("napari.layers")

from napari_maskclip.plugin import writer as _writer  # noqa: E402
from napari_maskclip.plugin.edits import (  # noqa: E402
    decode_plane,
    edited_plane,
    encode_plane,
    record_planes,
)
from napari_maskclip.plugin.export_plan import SLICES_ALL, plan_layer_export  # noqa: E402
from napari_maskclip.errors import InvalidInputError  # noqa: E402
from napari_maskclip.export import read_dataset  # noqa: E402
from napari_maskclip.progress import run_to_completion  # noqa: E402
from napari_maskclip.stacks import slice_key  # noqa: E402

from hang_guard import HANG_GUARD_S  # noqa: E402

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_record_round_trip_is_exact_and_compact(dtype):
    labels = np.kron(RNG.integers(0, 5, (16, 16)), np.ones((16, 16))).astype(dtype)
    entry = encode_plane(labels)
    back = decode_plane(entry)
    assert back.dtype == labels.dtype and back.flags.writeable
    np.testing.assert_array_equal(back, labels)
    assert len(entry["zlib"]) < 0.2 * labels.nbytes


def test_edited_is_what_differs_from_the_record():
    written = RNG.integers(0, 3, (2, 8, 9)).astype(np.uint8)
    record = record_planes(written, [(0,)])  # only slice 0 was written by MaskCLIP
    assert set(record) == {"0"} and slice_key((1, slice(None))) == "1"
    now = written.copy()
    now[0, 2, 3] = (now[0, 2, 3] + 1) % 3        # a real edit
    now[0, 5, 5] = written[0, 5, 5]              # painted back to MaskCLIP's value: unedited
    expected0 = np.zeros((8, 9), bool)
    expected0[2, 3] = True
    np.testing.assert_array_equal(edited_plane(now[0], "0", record), expected0)
    # A slice MaskCLIP never wrote was all 0: every painted (non-zero) pixel is edited.
    np.testing.assert_array_equal(edited_plane(now[1], "1", record), now[1] != 0)


def _managed_labels(data, source, record, class_texts=("cat", "dog"), run_id="r1", layout=None):
    meta = {"role": "labels", "source_id": str(source.unique_id), "source_name": source.name,
            "class_names": [t.split(";")[0] for t in class_texts], "class_texts": list(class_texts),
            "background": "background", "settings": {"model": "m"}, "run_id": run_id,
            "predicted": record}
    if layout is not None:
        meta["source_layout"] = layout
    return napari_layers.Labels(data, name=f"{source.name} [maskclip]",
                                metadata={"napari_maskclip": meta})


def _confidence(source, data, name, run_id="r1"):
    return napari_layers.Image(data, name=f"{source.name} [maskclip] {name}", metadata={
        "napari_maskclip": {"role": "confidence", "class_name": name,
                            "source_id": str(source.unique_id), "run_id": run_id}})


def _run_confidence(source, maps, names, shown=0, run_id="r1"):
    """The run's one confidence layer: every class's map in its record, one shown."""
    return napari_layers.Image(maps[shown], name=f"{source.name} [maskclip] confidence", metadata={
        "napari_maskclip": {"role": "confidence", "class_name": names[shown],
                            "source_id": str(source.unique_id), "run_id": run_id,
                            "class_names": list(names), "maps": maps}})


def _export(layer, layers, folder, **options):
    plan = plan_layer_export(layer_name=layer.name, metadata=layer.metadata,
                             features=layer.features, data=layer.data, layers=layers)
    return plan, run_to_completion(plan.export_iter(folder, **options))


@pytest.mark.parametrize("style", ["run layer", "one layer per class"])
def test_channel_stack_exports_one_sample_per_slice_with_the_channels_maskclip_saw(tmp_path, style):
    """Z x C x H x W source, channel axis 1, channels 0 and 2 and 3 -> labels Z x 1 x H x W.

    The maps come from the run's one confidence layer (every class's map, whichever it shows)
    or from one-class layers (older versions, scripts)."""
    pixels = RNG.integers(0, 4000, (3, 4, 10, 12)).astype(np.uint16)
    source = napari_layers.Image(pixels, name="cells")
    labels = RNG.integers(0, 3, (3, 1, 10, 12)).astype(np.uint8)
    labels[1] = 0
    record = record_planes(labels, [(0, 0), (2, 0)])  # slices 0 and 2 were segmented
    labels[2, 0, 4, 4] = 2 if labels[2, 0, 4, 4] != 2 else 1
    layout = {"data_shape": [3, 4, 10, 12], "rgb": False, "channel_axis": 1, "channels": [0, 2, 3]}
    layer = _managed_labels(labels, source, record, layout=layout)
    probs = RNG.random((2, 3, 1, 10, 12)).astype(np.float32)
    if style == "run layer":
        conf = [_run_confidence(source, probs, ["cat", "dog"], shown=1)]
        stale = _run_confidence(source, np.zeros_like(probs), ["cat", "dog"], run_id="other")
    else:
        conf = [_confidence(source, probs[k], n) for k, n in enumerate(["cat", "dog"])]
        stale = _confidence(source, np.zeros((3, 1, 10, 12), np.float32), "cat", run_id="other")

    plan, report = _export(layer, [source, stale, *conf, layer], tmp_path / "ds")
    ds = read_dataset(tmp_path / "ds")
    assert ds.names == ["cells_z0000", "cells_z0002"]  # slice 1: neither segmented nor painted
    for z in (0, 2):
        sample = ds[f"cells_z{z:04d}"]
        np.testing.assert_array_equal(sample.read_image(), np.moveaxis(pixels[z, [0, 2, 3]], 0, -1))
        np.testing.assert_array_equal(sample.read_mask(), labels[z, 0])
        np.testing.assert_allclose(sample.read_confidence(), probs[:, z, 0], atol=1e-3)
    assert ds["cells_z0002"].read_edited().sum() == 1 and not ds["cells_z0000"].read_edited().any()

    # Painting the untouched slice makes it a sample; its confidence is NaN (not queried).
    labels[1, 0, :2, :2] = 1
    _export(layer, [source, *conf, layer], tmp_path / "ds2")
    sample = read_dataset(tmp_path / "ds2")["cells_z0001"]
    assert np.isnan(sample.read_confidence()).all()
    np.testing.assert_array_equal(sample.read_edited(), labels[1, 0] != 0)
    # "all" exports every slice.
    _export(layer, [source, *conf, layer], tmp_path / "ds3", selection=SLICES_ALL)
    assert len(read_dataset(tmp_path / "ds3").names) == 3


def test_slices_are_read_one_at_a_time_from_lazy_sources(tmp_path):
    da = pytest.importorskip("dask.array")
    pixels = RNG.integers(0, 255, (4, 8, 8, 3)).astype(np.uint8)
    reads = []

    def tracked(block, block_info=None):
        reads.append(block_info[0]["chunk-location"][0] if block_info else None)
        return block

    lazy = da.from_array(pixels, chunks=(1, 8, 8, 3)).map_blocks(tracked, dtype=np.uint8)
    source = napari_layers.Image(lazy, rgb=True, name="lazy")
    labels = RNG.integers(0, 3, (4, 8, 8)).astype(np.uint8)
    labels[[0, 2]] = 0  # only slices 1 and 3 were segmented
    layer = _managed_labels(labels, source, record_planes(labels, [(1,), (3,)]),
                            layout={"data_shape": [4, 8, 8, 3], "rgb": True, "channel_axis": None,
                                    "channels": None})
    reads.clear()
    _export(layer, [source, layer], tmp_path / "ds")
    assert read_dataset(tmp_path / "ds").names == ["lazy_z0001", "lazy_z0003"]
    assert sorted(r for r in reads if r is not None) == [1, 3]  # never the whole stack
    third = read_dataset(tmp_path / "ds")["lazy_z0003"]
    np.testing.assert_array_equal(third.read_image(), pixels[3])


def test_confidence_threshold_needs_the_runs_maps(tmp_path):
    source = napari_layers.Image(np.zeros((6, 6), np.uint8), name="img")
    labels = np.ones((6, 6), np.uint8)
    layer = _managed_labels(labels, source, record_planes(labels, [()]))
    other_run = _confidence(source, np.ones((6, 6), np.float32), "cat", run_id="old")
    plan = plan_layer_export(layer_name=layer.name, metadata=layer.metadata, features=None,
                             data=layer.data, layers=[source, other_run, layer])
    assert plan.probabilities is None and any("confidence maps" in n for n in plan.notes)
    with pytest.raises(InvalidInputError, match="confidence threshold needs"):
        run_to_completion(plan.export_iter(tmp_path / "ds", min_confidence=0.5))
    assert not (tmp_path / "ds").exists()


def test_label_values_beyond_the_classes_are_refused_before_writing(tmp_path):
    source = napari_layers.Image(np.zeros((3, 6, 6), np.uint8), name="img")
    labels = np.ones((3, 6, 6), np.uint8)
    layer = _managed_labels(labels, source, record_planes(labels, [(0,), (1,), (2,)]))
    labels[2, 1, 1] = 7
    with pytest.raises(InvalidInputError, match="Label value 7 in img_z0002"):
        _export(layer, [source, layer], tmp_path / "ds")
    assert not (tmp_path / "ds" / "dataset.json").exists()


def test_napari_save_of_a_stack_skips_untouched_slices(tmp_path, monkeypatch):
    source = napari_layers.Image(np.zeros((4, 5, 5), np.uint8), name="vol")
    labels = np.zeros((4, 5, 5), np.uint8)
    labels[0] = 1
    layer = _managed_labels(labels, source, record_planes(labels, [(0,)]))
    labels[3, 2, 2] = 2  # painted by hand
    monkeypatch.setattr(_writer, "_viewer_layers", lambda: [source, layer])
    data, meta, _ = layer.as_layer_data_tuple()
    _writer.write_labels_dataset(str(tmp_path / "ds"), data, meta)
    ds = read_dataset(tmp_path / "ds")
    assert ds.names == ["vol_z0000", "vol_z0003"]
    expected = np.zeros((5, 5), bool)
    expected[2, 2] = True
    np.testing.assert_array_equal(ds["vol_z0003"].read_edited(), expected)


def test_panel_modules_import_no_torch():
    code = ("import sys\nimport napari_maskclip.plugin.writer, "
            "napari_maskclip.plugin._qt.export_panel, napari_maskclip.plugin._qt.train_panel, "
            "napari_maskclip.plugin.edits\n"
            "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
