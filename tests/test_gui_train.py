"""The Train panel: a tiny student trained in a worker on an exported dataset, with live progress;
Cancel leaves a resumable checkpoint; resume continues; bad input is a notification."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qtpy.QtCore import Qt

import open_clip  # noqa: F401  (Triton before any canvas: see plugin/models.py _import_engine)

from napari_maskclip.plugin._qt.train_panel import TrainWidget, loss_sparkline
from napari_maskclip.export import export_sample
from napari_maskclip.student import read_checkpoint_meta

from test_student_train import COLOURS, shapes_data
from test_widget import RGB, _config_dir, make_widget, notifications, run_and_wait  # noqa: F401

from hang_guard import HANG_GUARD_MS as TIMEOUT_MS  # noqa: E402  (a hang guard, not a duration)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def dataset(tmp_path, tiny_vit_files):
    """Four exported shapes images, half of each edited; the teacher recorded as the tiny ViT."""
    config, ckpt = tiny_vit_files
    provenance = {"model": str(config), "pretrained": str(ckpt),
                  "settings": {"templates": "single", "denoise": False}}
    edited = np.zeros((40, 40), dtype=bool)
    edited[:20] = True
    folder = tmp_path / "ds"
    for i, sample in enumerate(shapes_data(4, size=40).samples):
        export_sample(folder, f"img{i}", sample.image, sample.labels.astype(np.uint8),
                      list(COLOURS), edited=edited, provenance=provenance)
    return folder


@pytest.fixture
def panel(make_napari_viewer, dataset, tmp_path):
    widget = TrainWidget(make_napari_viewer())
    widget.set_datasets([str(dataset)])
    widget.output.setText(str(tmp_path / "student.safetensors"))
    widget.backbone.setCurrentText("tiny")
    widget.backbone_weights.setCurrentText("random")
    widget.crop.setValue(32)
    widget.batch.setValue(2)
    widget.device.setCurrentText("cpu")
    return widget


def train_and_wait(qtbot, panel: TrainWidget, setup=None) -> str:
    with qtbot.waitSignal(panel.train_finished, timeout=TIMEOUT_MS) as blocker:
        worker = panel.start()
        if setup is not None and worker is not None:
            setup(worker)
    qtbot.waitUntil(lambda: not panel.running, timeout=TIMEOUT_MS)
    return blocker.args[0]


def test_trains_in_a_worker_with_live_progress_then_offers_the_student(panel, qtbot, tmp_path,
                                                                      make_widget):
    panel.iterations.setValue(4)
    seen = []
    assert train_and_wait(qtbot, panel, lambda w: w.yielded.connect(seen.append)) == "done", \
        panel.status.text()
    path = tmp_path / "student.safetensors"
    meta = read_checkpoint_meta(path)
    assert meta["iteration"] == 4 and meta["complete"]
    assert meta["settings"]["backbone"] == "tiny" and meta["settings"]["crop_size"] == 32
    assert meta["teacher"]["model"].endswith("tiny_vit.json")  # recorded in the dataset
    steps = [s for s in seen if s.stage == "train" and "loss" in s.info]
    assert [s.done for s in steps][-1] == 4 and len(panel.losses) == len(steps)
    assert panel.live.text().startswith("iteration 4/4, loss ")
    assert panel.plot.text() == loss_sparkline(panel.losses) and panel.plot.text()
    assert "Trained to iteration 4" in panel.status.text()
    assert panel.use_button.isVisibleTo(panel)

    viewer, main = make_widget((RGB, {"name": "img", "rgb": True}))
    panel.attach(main)
    assert panel.use_student() is main
    assert main.model.model.currentText() == "student: student.safetensors"
    assert main.classes.classes_text() == ", ".join(COLOURS)
    assert run_and_wait(qtbot, main) == "done", main.status.text()
    assert viewer.layers["img [maskclip]"].features["name"].tolist() == ["background", *COLOURS]


def test_cancel_keeps_a_resumable_checkpoint_and_resume_continues(panel, qtbot, tmp_path):
    panel.iterations.setValue(500)
    stopped = {}

    def cancel_on_first_iteration(worker):
        def on_step(step):  # in the worker thread: cancels right after this iteration's report
            if step.stage == "train" and "loss" in step.info and not stopped:
                stopped["at"] = step.done
                panel.runner.request_cancel()
        worker.yielded.connect(on_step, Qt.DirectConnection)

    assert train_and_wait(qtbot, panel, cancel_on_first_iteration) == "cancelled"
    path = tmp_path / "student.safetensors"
    saved = read_checkpoint_meta(path)
    assert saved["iteration"] == stopped["at"] < 500 and not saved["complete"]
    assert f"holds iteration {stopped['at']}" in panel.status.text()
    assert "resume" in panel.status.text()

    # Starting again without 'resume' would replace it: refused.
    assert train_and_wait(qtbot, panel) == "error"
    assert "exists already" in panel.status.text()

    panel.resume.setChecked(True)
    assert not panel.backbone.isEnabled() and panel.iterations.isEnabled()
    panel.iterations.setValue(stopped["at"] + 3)
    assert train_and_wait(qtbot, panel) == "done", panel.status.text()
    meta = read_checkpoint_meta(path)
    assert meta["iteration"] == stopped["at"] + 3 and meta["complete"]
    assert [h["iteration"] for h in meta["history"]] == list(range(1, stopped["at"] + 4))


def test_bad_input_is_a_notification(panel, qtbot, tmp_path, notifications):
    panel.set_datasets([])
    assert train_and_wait(qtbot, panel) == "error"
    assert any("Add at least one dataset folder" in str(n.message) for n in notifications)
    panel.set_datasets([str(tmp_path / "nowhere")])
    assert train_and_wait(qtbot, panel) == "error"
    assert any("Dataset folder not found" in str(n.message) for n in notifications)
    assert panel.worker is None  # refused before any thread started

    # An unreadable checkpoint to resume: the core's message, from the worker.
    panel.set_datasets([str(tmp_path / "ds")])
    (tmp_path / "student.safetensors").write_bytes(b"garbage")
    panel.resume.setChecked(True)
    assert train_and_wait(qtbot, panel) == "error"
    assert any("not a napari-maskclip student checkpoint" in str(n.message) for n in notifications)
    assert panel.start_button.isEnabled()


def test_end_to_end_run_export_train_predict_from_the_widget(make_widget, qtbot, tmp_path):
    """The whole loop from the panels: MaskCLIP labels, an edit, Export, Train (the teacher is
    the model recorded by the export), then the student as the model."""
    from test_gui_export import export_and_wait

    viewer, main = make_widget((RGB, {"name": "photo", "rgb": True}))
    main.classes.text.setPlainText("cat, dog")
    assert run_and_wait(qtbot, main) == "done", main.status.text()
    viewer.layers["photo [maskclip]"].paint((20, 20), 2)
    export = main.open_export()
    export.folder.setText(str(tmp_path / "ds"))
    assert export_and_wait(qtbot, export) == "done", export.status.text()

    panel = main.open_train()
    assert panel.dataset_folders() == [str(tmp_path / "ds")]  # the last export, filled in
    panel.output.setText(str(tmp_path / "s.safetensors"))
    panel.iterations.setValue(3)
    panel.backbone.setCurrentText("tiny")
    panel.backbone_weights.setCurrentText("random")
    panel.crop.setValue(32)
    panel.batch.setValue(2)
    panel.device.setCurrentText("cpu")
    assert train_and_wait(qtbot, panel) == "done", panel.status.text()
    teacher = read_checkpoint_meta(tmp_path / "s.safetensors")["teacher"]
    assert teacher["model"].endswith("tiny_vit.json")  # as recorded by the export
    assert panel.use_student() is main
    assert run_and_wait(qtbot, main) == "done", main.status.text()
    layer = main.last_report.labels_layer
    assert layer.features["name"].tolist() == ["background", "cat", "dog"]
    assert "predicted by the student" in main.status.text()


def test_train_tab_lists_the_dataset_exported_last(make_widget, tmp_path):
    """Issue 20: the Train page reached by its tab (not only by its button) starts from the
    dataset exported last, when it lists none."""
    from napari_maskclip.plugin._qt.docks import PAGE_TRAIN, PAGES
    from napari_maskclip.plugin.preferences import update_preferences

    viewer, widget = make_widget((RGB, {"name": "img", "rgb": True}))
    assert widget.train_page.dataset_folders() == []
    exported = str(tmp_path / "exported")
    update_preferences(lambda prefs: setattr(prefs, "last_dataset", exported))  # as Export does
    widget.pages.setCurrentIndex(PAGES.index(PAGE_TRAIN))  # a click on the tab
    assert widget.train_page.dataset_folders() == [exported]
    widget.train_page.set_datasets(["/mine"])
    widget.pages.setCurrentIndex(0)
    widget.pages.setCurrentIndex(PAGES.index(PAGE_TRAIN))
    assert widget.train_page.dataset_folders() == ["/mine"]  # a listed folder stays
