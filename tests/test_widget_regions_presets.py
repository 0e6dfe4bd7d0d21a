"""Settings page: a Labels layer as region-voting regions, and the paper-preset choice.

Driven like a user in a real (offscreen) napari viewer with the tiny random ViT (see
test_widget.py): the regions box lists the viewer's Labels layers and follows adds, renames and
removals; a chosen layer is a query-time refinement (no image-encoder pass) recorded with the
run; a preset sets the visible fields, and changing one afterwards is recorded as such.
"""

from __future__ import annotations

import numpy as np
import pytest

import open_clip  # noqa: F401,E402  (torch's stack before any canvas; see test_widget.py)

from napari_maskclip.engine.settings import SegmentSettings
from napari_maskclip.plugin._qt.sections import LAYER_PREFIX, NO_PRESET, NO_REGIONS
from napari_maskclip.plugin.records import META_KEY

from test_widget import _config_dir, make_widget, notifications, run_and_wait  # noqa: F401

RGB = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)


def _quadrants(h: int = 40, w: int = 48) -> np.ndarray:
    regions = np.zeros((h, w), dtype=np.int32)
    regions[: h // 2, : w // 2] = 1
    regions[: h // 2, w // 2:] = 2
    regions[h // 2:, : w // 2] = 3
    regions[h // 2:, w // 2:] = 4
    return regions


def _region_items(widget) -> list[str]:
    combo = widget.settings.regions
    return [combo.itemText(i) for i in range(combo.count())]


def _result_record(viewer) -> dict:
    layers = [layer for layer in viewer.layers
              if layer.metadata.get(META_KEY, {}).get("role") == "labels"]
    assert layers
    return layers[-1].metadata[META_KEY]["settings"]


def test_labels_layers_are_listed_as_regions_and_follow_the_viewer(make_widget, qtbot):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    assert _region_items(widget) == [NO_REGIONS, "felzenszwalb", "slic"]
    sam = viewer.add_labels(_quadrants(), name="sam masks")
    assert LAYER_PREFIX + "sam masks" in _region_items(widget)
    widget.settings.regions.setCurrentText(LAYER_PREFIX + "sam masks")
    assert widget.settings.region_layer() is sam
    sam.name = "cellpose"  # renamed: listed under its new name, still chosen
    assert LAYER_PREFIX + "cellpose" in _region_items(widget)
    assert LAYER_PREFIX + "sam masks" not in _region_items(widget)
    assert widget.settings.region_layer() is sam
    assert widget.settings.regions.currentText() == LAYER_PREFIX + "cellpose"
    viewer.layers.remove(sam)  # removed: no regions, never a stale layer
    assert widget.settings.region_layer() is None
    assert widget.settings.regions.currentText() == NO_REGIONS
    assert widget.settings.overrides()["regions"] is None


def test_plugin_results_are_offered_as_regions_only_when_asked(make_widget, qtbot):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog")
    assert run_and_wait(qtbot, widget) == "done"
    result = [layer for layer in viewer.layers
              if layer.metadata.get(META_KEY, {}).get("role") == "labels"][0]
    assert LAYER_PREFIX + result.name not in _region_items(widget)
    assert widget.settings.region_results.isVisibleTo(widget)
    widget.settings.region_results.setChecked(True)
    assert LAYER_PREFIX + result.name in _region_items(widget)


def test_a_labels_layer_as_regions_is_a_requery_voted_per_region_and_recorded(make_widget, qtbot):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog, sofa")
    widget.settings.precision.setCurrentText("fp32")
    assert run_and_wait(qtbot, widget) == "done"
    plain = np.asarray(viewer.layers["img [maskclip]"].data).copy()
    segmenter = widget.pool.cached(widget.model.choice())
    calls = segmenter.image_encoder_calls
    regions = _quadrants()
    viewer.add_labels(regions, name="sam masks")
    widget.settings.regions.setCurrentText(LAYER_PREFIX + "sam masks")
    assert run_and_wait(qtbot, widget) == "done"
    assert segmenter.image_encoder_calls == calls  # query-time: no image-encoder pass
    assert "no image-encoder pass" in widget.status.text()
    voted = np.asarray(viewer.layers["img [maskclip]"].data)
    for region in range(1, 5):
        assert np.unique(voted[regions == region]).size == 1  # one label per region
    assert not np.array_equal(voted, plain)
    record = _result_record(viewer)
    assert record["regions"] == "labels"
    layer_record = record["regions_layer"]
    assert layer_record["name"] == "sam masks" and layer_record["shape"] == [40, 48]
    assert layer_record["replayable"] is False and "cannot be replayed" in layer_record["note"]


def test_a_labels_layer_of_another_size_is_refused_with_a_message(make_widget, qtbot,
                                                                   notifications):  # noqa: F811
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog")
    viewer.add_labels(np.ones((20, 30), dtype=np.int32), name="small masks")
    widget.settings.regions.setCurrentText(LAYER_PREFIX + "small masks")
    assert "'small masks' has shape 20x30" in widget.status.text()  # said at once
    assert widget.run() is None  # refused before any worker starts
    assert any("image's slices are 40x48" in str(n.message) for n in notifications)
    assert len(widget.pool) == 0


def _choose_preset(section, name: str) -> None:
    combo = section.preset
    index = combo.findText(name)
    assert index >= 0, name
    combo.setCurrentIndex(index)
    combo.activated.emit(index)  # as a user's pick


def test_a_preset_sets_the_fields_visibly_and_a_change_is_recorded_as_such(qtbot):
    from napari_maskclip.plugin._qt.sections import SettingsSection

    section = SettingsSection()
    qtbot.addWidget(section)
    _choose_preset(section, "naclip")
    s = section
    assert s.mode.currentText() == "naclip" and s.templates.currentText() == "openai80"
    assert s.temperature.value() == 40.0 and s.short_side.value() == 336
    assert s.inference.currentText() == "sliding window"
    assert (s.window.value(), s.stride.value()) == (224, 112)
    assert s.pamr.isChecked() and not s.denoise.isChecked()
    assert s.segment_settings() == SegmentSettings.from_preset("naclip")
    assert s.preset.currentText() == "naclip" and "NACLIP" in s.preset_info.text()
    assert s.provenance() == {}
    s.temperature.setValue(60.0)  # a field changed afterwards
    assert s.preset.currentText() == "naclip, changed"
    settings = s.segment_settings()
    assert settings.preset is None and settings.logit_scale == 60.0
    assert settings.pos_embed_resize == "scale_factor"  # the preset's hidden values stay
    assert s.provenance() == {"preset_base": "naclip", "preset_changed": ["logit_scale"]}
    assert "Changed from naclip" in s.preset_info.text()
    assert "temperature." in s.preset_info.text()  # the field as the widget labels it
    s.temperature.setValue(40.0)  # back to the paper's value: the preset again
    assert s.preset.currentText() == "naclip" and s.segment_settings().preset == "naclip"
    _choose_preset(section, NO_PRESET)
    assert s.preset.currentText() == NO_PRESET and s.segment_settings().preset is None
    assert s.segment_settings().pos_embed_resize == "grid"  # the engine's conventions again
    assert s.mode.currentText() == "naclip"  # the fields stay as they are


@pytest.mark.parametrize("name", ["maskclip", "sclip", "clearclip", "scclip", "rfclip", "resclip"])
def test_every_preset_gives_its_papers_settings(qtbot, name):
    from napari_maskclip.plugin._qt.sections import SettingsSection

    section = SettingsSection()
    qtbot.addWidget(section)
    section.choose_preset(name)
    assert section.segment_settings() == SegmentSettings.from_preset(name)
    assert section.preset.currentText() == name and section.provenance() == {}


def test_a_run_records_the_preset_and_its_changes(make_widget, qtbot):
    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    widget.classes.text.setPlainText("cat, dog")
    _choose_preset(widget.settings, "sclip")
    assert run_and_wait(qtbot, widget) == "done"
    record = _result_record(viewer)
    assert record["preset"] == "sclip" and record["mode"] == "sclip"
    assert record["pos_embed_resize"] == "scale_factor" and record["partial_patches"] == "drop"
    assert "preset_changed" not in record
    widget.settings.templates.setCurrentText("single")
    assert run_and_wait(qtbot, widget) == "done"
    record = _result_record(viewer)
    assert record["preset"] is None and record["preset_base"] == "sclip"
    assert record["preset_changed"] == ["templates"]


def test_tlp_box_and_the_2025_presets_hidden_values(qtbot):
    """TLP sits beside PAMR (query-time); the RF-CLIP/ResCLIP presets' values without a control
    of their own stay in effect while the preset is chosen."""
    from napari_maskclip.plugin._qt.sections import SettingsSection

    section = SettingsSection()
    qtbot.addWidget(section)
    assert not section.segment_settings().tlp
    section.tlp.setChecked(True)
    assert section.segment_settings().tlp
    _choose_preset(section, "resclip")
    s = section.segment_settings()
    assert s.mode == "resclip" and s.resclip_sfr_weights == (1.8, 0.7)
    assert s.refine_guide == "resized" and s.tlp is True
    section.tlp.setChecked(False)
    _choose_preset(section, "rfclip")
    assert section.segment_settings() == SegmentSettings.from_preset("rfclip")
    assert "resized image" in section.preset_info.text()
    section.set_student_mode(True)
    assert not section.tlp.isEnabled()
