"""napari's Save for Labels layers (``_writer.write_labels_dataset``), driven with real layer state.

Layers are built without a viewer (no Qt needed); the viewer lookup is replaced by a list of
layers, which is all the writer asks of a viewer.
"""

from __future__ import annotations

import numpy as np
import pytest

napari_layers = pytest.importorskip("napari.layers")

from napari_maskclip.plugin import writer as _writer  # noqa: E402
from napari_maskclip.errors import DatasetError, InvalidInputError  # noqa: E402
from napari_maskclip.export import read_dataset  # noqa: E402


def _plugin_labels(labels, source):
    meta = {
        "role": "labels", "source_id": str(source.unique_id), "source_name": source.name,
        "class_names": ["cat", "dog"], "class_texts": ["cat", "dog; puppy"],
        "background": "background; floor",
        "settings": {"model": "demo", "pretrained": None, "mode": "maskclip"},
    }
    return napari_layers.Labels(labels, name=f"{source.name} [maskclip]",
                                metadata={"napari_maskclip": meta},
                                features={"index": [0, 1, 2], "name": ["background", "cat", "dog"]})


def _save(layer, path):
    data, meta, kind = layer.as_layer_data_tuple()
    assert kind == "labels"
    return _writer.write_labels_dataset(str(path), data, meta)


def test_save_writes_a_full_sample_with_image_and_confidence(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    image = napari_layers.Image(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), rgb=True, name="kitchen")
    labels = rng.integers(0, 3, (20, 24)).astype(np.uint8)
    layer = _plugin_labels(labels, image)
    probs = rng.random((2, 20, 24)).astype(np.float32)
    conf = [napari_layers.Image(probs[k], name=f"kitchen [maskclip] {n}",
                                metadata={"napari_maskclip": {"role": "confidence", "class_name": n,
                                                              "source_id": str(image.unique_id)}})
            for k, n in enumerate(["cat", "dog"])]
    monkeypatch.setattr(_writer, "_viewer_layers", lambda: [image, *conf, layer])

    written = _save(layer, tmp_path / "ds")
    assert str(tmp_path / "ds" / "dataset.json") in written
    ds = read_dataset(tmp_path / "ds")
    sample = ds["kitchen"]
    np.testing.assert_array_equal(sample.read_image(), image.data)
    np.testing.assert_array_equal(sample.read_mask(), labels)
    np.testing.assert_allclose(sample.read_confidence(), probs, atol=1e-3)
    assert ds.class_names == ["background", "cat", "dog"]
    assert ds.classes.classes[1].synonyms == ("dog", "puppy")
    assert [b.text for b in ds.classes.background] == ["background; floor"]
    assert sample.provenance["model"] == "demo" and sample.provenance["settings"]["mode"] == "maskclip"
    assert sample.info["source"]["labels_layer"] == "kitchen [maskclip]"
    assert sample.read_edited() is None  # the layer did not say which pixels were painted


def test_without_a_viewer_the_sample_is_mask_only(tmp_path, monkeypatch):
    image = napari_layers.Image(np.zeros((6, 7), np.uint8), name="img")
    layer = _plugin_labels(np.ones((6, 7), np.uint8), image)
    monkeypatch.setattr(_writer, "_viewer_layers", lambda: [])
    _save(layer, tmp_path)
    sample = read_dataset(tmp_path)["img"]
    assert sample.image_path is None and sample.info["image"] is None
    np.testing.assert_array_equal(sample.read_mask(), np.ones((6, 7)))


def test_plain_labels_layer_named_by_its_features(tmp_path, monkeypatch):
    monkeypatch.setattr(_writer, "_viewer_layers", lambda: [])
    layer = napari_layers.Labels(np.array([[0, 1], [2, 2]], np.uint8), name="my labels",
                                 features={"index": [0, 1, 2], "name": ["sky", "tree", "road"]})
    _save(layer, tmp_path)
    ds = read_dataset(tmp_path)
    assert ds.names == ["my_labels"] and ds.class_names == ["sky", "tree", "road"]


def test_labels_without_class_names_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(_writer, "_viewer_layers", lambda: [])
    layer = napari_layers.Labels(np.ones((3, 3), np.uint8), name="anonymous")
    with pytest.raises(DatasetError, match="which class each label is"):
        _save(layer, tmp_path)
    assert not (tmp_path / "dataset.json").exists()


def test_saving_again_never_replaces_the_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(_writer, "_viewer_layers", lambda: [])
    image = napari_layers.Image(np.zeros((4, 4), np.uint8), name="img")
    _save(_plugin_labels(np.ones((4, 4), np.uint8), image), tmp_path)
    with pytest.raises(DatasetError, match="already has sample"):
        _save(_plugin_labels(np.full((4, 4), 2, np.uint8), image), tmp_path)
    np.testing.assert_array_equal(read_dataset(tmp_path)["img"].read_mask(), np.ones((4, 4)))


def test_a_file_name_is_not_a_dataset_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(_writer, "_viewer_layers", lambda: [])
    image = napari_layers.Image(np.zeros((4, 4), np.uint8), name="img")
    with pytest.raises(InvalidInputError, match="folder"):
        _save(_plugin_labels(np.ones((4, 4), np.uint8), image), tmp_path / "labels.tif")


def test_edited_mask_from_the_widget_metadata_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(_writer, "_viewer_layers", lambda: [])
    image = napari_layers.Image(np.zeros((4, 5), np.uint8), name="img")
    layer = _plugin_labels(np.ones((4, 5), np.uint8), image)
    edited = np.zeros((4, 5), bool)
    edited[1, 2] = True
    layer.metadata["napari_maskclip"]["edited"] = edited
    _save(layer, tmp_path)
    np.testing.assert_array_equal(read_dataset(tmp_path)["img"].read_edited(), edited)


def test_napari_save_layers_reaches_the_writer_through_the_manifest(tmp_path):
    """The contract with napari.yaml: napari's own Save machinery finds and runs this writer."""
    napari = pytest.importorskip("napari")
    import npe2

    npe2.PluginManager.instance().discover()  # what napari does at start-up
    layer = napari_layers.Labels(np.array([[0, 1], [2, 2]], np.uint8), name="lab",
                                 features={"index": [0, 1, 2], "name": ["bg", "a", "b"]})
    written = napari.save_layers(str(tmp_path / "ds"), [layer], plugin="napari-maskclip")
    assert str(tmp_path / "ds" / "dataset.json") in written
    ds = read_dataset(tmp_path / "ds")
    assert ds.names == ["lab"] and ds.class_names == ["bg", "a", "b"]
    np.testing.assert_array_equal(ds["lab"].read_mask(), layer.data)
