"""What the plugin stores on layers, as typed records: round trips, lenient reading of layers made
by scripts or older versions, and the record a run leaves (written by the layers code, read by
the export planner)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_maskclip.plugin.records import (
    META_KEY,
    ConfidenceRecord,
    RunRecord,
    SampleSuggestion,
    SourceLayout,
    role_of,
)


def full_record() -> RunRecord:
    return RunRecord(
        class_names=["cat", "dog"], class_texts=["cat", "dog; puppy"], background="sky",
        settings={"model": "ViT-B-16", "mode": "maskclip"}, model="cfg.json", pretrained="w.pt",
        source_id="id-1", source_name="img", source_path="/data/img.png",
        source_layout=SourceLayout((3, 4, 20, 30), channel_axis=1, channels=(0, 2, 3)),
        run_id="run-1", managed=False, fingerprints={"0": "abc"},
        predicted={"0": {"shape": [20, 30], "dtype": "|u1", "zlib": b"x"}},
        extra={"note": "kept"},
    )


def test_run_record_round_trips_through_layer_metadata():
    record = full_record()
    metadata = {"other plugin": 1, **record.to_metadata()}
    assert metadata[META_KEY]["note"] == "kept"  # unknown keys stay in the entry
    back = RunRecord.from_metadata(metadata)
    assert back == record
    assert back.source_layout.stack_layout().loop_axes == (0,)
    assert RunRecord.from_metadata({"other plugin": 1}) is None
    assert RunRecord.from_metadata(None) is None


def test_reading_is_lenient_with_layers_made_elsewhere():
    edited = np.zeros((2, 2), bool)
    raw = {META_KEY: {
        "class_names": ["a", 3], "class_texts": "a, b", "background": 5,
        "settings": {"model": "demo", "pretrained": None}, "source_layout": {"data_shape": "x"},
        "fingerprints": [1, 2], "predicted": None, "managed": "yes", "edited": edited,
    }}
    record = RunRecord.from_metadata(raw)
    assert record.class_names == [] and record.class_texts is None and record.background is None
    assert record.source_layout is None and record.fingerprints == {} and record.predicted == {}
    assert record.managed is True and record.edited is edited and record.role is None
    # Older records name the model only in the settings; a recorded None stays None.
    assert record.model == "demo"
    student = RunRecord.from_metadata({META_KEY: {"model": None, "settings": {"model": "student"}}})
    assert student.model is None


def test_with_run_takes_every_run_field_none_included():
    old = full_record().replace(labelled_by="student", student_checkpoint="s.safetensors")
    run = RunRecord(class_texts=["bird"], settings={"mode": "sclip"}, model="ViT-B-32")
    new = old.with_run(run)
    assert (new.class_texts, new.model, new.pretrained) == (["bird"], "ViT-B-32", None)
    assert new.labelled_by is None and new.student_checkpoint is None  # a CLIP run now
    assert (new.fingerprints, new.run_id, new.source_path) == (old.fingerprints, "run-1",
                                                                old.source_path)


def test_confidence_records_and_suggestions():
    run = full_record()
    conf = ConfidenceRecord.of_run("dog", run)
    assert ConfidenceRecord.from_metadata(conf.to_metadata()) == conf
    assert (conf.source_id, conf.run_id) == ("id-1", "run-1")
    assert ConfidenceRecord.from_metadata(run.to_metadata()) is None  # a labels record
    # A run's record carries every class's map; a one-class layer (older, or a script's) none.
    maps = np.arange(2 * 6, dtype=np.float32).reshape(2, 2, 3)
    full = ConfidenceRecord.of_run("dog", run.replace(class_names=["cat", "dog"]), maps)
    back = ConfidenceRecord.from_metadata(full.to_metadata())
    assert back.class_names == ("cat", "dog") and back.maps is maps
    assert list(back.maps_by_class()) == ["cat", "dog"]
    assert conf.maps_by_class("data") == {"dog": "data"}
    bad = full.to_metadata()
    bad["napari_maskclip"]["maps"] = maps[:1]  # fewer maps than classes: not trusted
    assert ConfidenceRecord.from_metadata(bad).maps is None

    class Layer:
        def __init__(self, metadata):
            self.metadata = metadata

    assert role_of(Layer(conf.to_metadata())) == "confidence"
    assert role_of(Layer(run.replace(role="labels").to_metadata())) == "labels"
    assert role_of(Layer({})) is None
    hint = SampleSuggestion("red circle", "background", model="demo", description="scene")
    assert SampleSuggestion.from_metadata(hint.to_metadata()) == hint
    assert role_of(Layer(hint.to_metadata())) is None
    assert SampleSuggestion.from_metadata({META_KEY: {"suggested_classes": ""}}) is None


def test_the_record_a_run_leaves_is_what_the_export_reads():
    napari_components = pytest.importorskip("napari.components")
    from napari_maskclip.plugin.export_plan import plan_layer_export
    from napari_maskclip.plugin.layers import Geometry, apply_result
    from test_widget_layers import make_result

    viewer = napari_components.ViewerModel()
    image = viewer.add_image(np.zeros((20, 30), np.uint8), name="img")
    run = RunRecord(class_texts=["cat", "dog; puppy"], background="sky",
                    settings={"mode": "maskclip"}, model="cfg.json", pretrained="w.pt",
                    source_layout=SourceLayout((20, 30)))
    report = apply_result(viewer, make_result((20, 30), ["cat", "dog"]),
                          source_id=str(image.unique_id), source_name="img",
                          geometry=Geometry(scale=(1, 1), translate=(0, 0)), run=run)
    layer = report.labels_layer
    record = RunRecord.from_metadata(layer.metadata)
    assert record.class_names == ["cat", "dog"] and record.role == "labels" and record.managed
    assert record.with_run(run) == record and set(record.fingerprints) == {""}
    confidence = ConfidenceRecord.from_metadata(report.confidence_layer.metadata)
    assert confidence.run_id == record.run_id and confidence.class_names == ("cat", "dog")
    plan = plan_layer_export(layer_name=layer.name, metadata=layer.metadata,
                             features=layer.features, data=layer.data, layers=list(viewer.layers))
    assert plan.classes == ["cat", "dog; puppy"] and plan.background == "sky"
    assert plan.provenance["model"] == "cfg.json" and plan.provenance["pretrained"] == "w.pt"
    assert plan.image is not None and plan.probabilities is not None and plan.predicted
