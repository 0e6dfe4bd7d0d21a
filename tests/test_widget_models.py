"""The widget's model choices and the pool that keeps loaded models (and their caches) alive."""

from __future__ import annotations

import subprocess
import sys

import pytest

from napari_maskclip.plugin.models import ModelChoice, SegmenterPool
from napari_maskclip.errors import ModelLoadError
from napari_maskclip.progress import run_to_completion

from hang_guard import HANG_GUARD_S


def test_choice_from_fields(tmp_path):
    ckpt = tmp_path / "weights.safetensors"
    ckpt.write_bytes(b"x")
    assert ModelChoice.from_fields(" ViT-B-16 ", "openai", "").device == "auto"
    assert ModelChoice.from_fields("ViT-B-16", "openai", "cpu").may_download
    local = ModelChoice.from_fields("ViT-B-16", str(ckpt), "cpu")
    assert not local.may_download and local.describe() == "ViT-B-16 (weights.safetensors)"
    assert not ModelChoice.from_fields("ViT-B-16", "random", "cpu").may_download
    demo = ModelChoice.from_fields("demo", "openai", "cpu")
    assert demo.pretrained is None and not demo.may_download
    with pytest.raises(ModelLoadError, match="No model given"):
        ModelChoice.from_fields("  ", "openai", "cpu")


def test_pool_reuses_models_and_evicts_the_oldest(tiny_vit_files, tiny_resnet_files):
    pool = SegmenterPool(max_models=1)
    vit = ModelChoice(str(tiny_vit_files[0]), str(tiny_vit_files[1]), "cpu")
    steps = []
    first = run_to_completion(pool.get_iter(vit), steps.append)
    assert [s.stage for s in steps] == ["load", "load"]
    assert run_to_completion(pool.get_iter(vit)) is first  # no reload, caches kept
    assert pool.cached(vit) is first
    resnet = ModelChoice(str(tiny_resnet_files[0]), str(tiny_resnet_files[1]), "cpu")
    other = run_to_completion(pool.get_iter(resnet))
    assert other is not first and len(pool) == 1 and pool.cached(vit) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard is Linux-only")
@pytest.mark.slow
def test_engine_import_hides_triton_inside_napari():
    code = (
        "import sys, vispy\n"  # stands for a running napari canvas
        "from napari_maskclip.plugin.models import _import_engine\n"
        "engine = _import_engine()\n"
        "engine.Segmenter\n"
        "from torch.utils._triton import has_triton_package\n"
        "print(sys.modules.get('triton', 'absent'), has_triton_package())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "False"]


def test_a_retrained_student_is_never_served_stale(tmp_path):
    """The pool key of a student includes its file's time and size: a new checkpoint at the same
    path is a new choice (loaded again), the same file the same choice (reused)."""
    import os

    path = tmp_path / "student.safetensors"
    path.write_bytes(b"first")
    first = ModelChoice.student(str(path), "cpu")
    assert first.is_student and not first.may_download
    assert first.describe() == "student student.safetensors"
    assert ModelChoice.student(str(path), "cpu") == first
    path.write_bytes(b"second, longer")
    os.utime(path, ns=(first.stamp[0] + 10**9, first.stamp[0] + 10**9))
    assert ModelChoice.student(str(path), "cpu") != first
    with pytest.raises(ModelLoadError, match="not found"):
        ModelChoice.student(str(tmp_path / "missing.safetensors"))


# ---- the first run's time (issue 20: the demo's first Run took 147 s on a loaded machine) -------
def test_a_small_model_runs_on_one_thread_and_gives_the_count_back():
    import torch
    from torch import nn

    from napari_maskclip.engine.threads import SMALL_MODEL_PARAMETERS, small_model_threads

    small = nn.Linear(64, 64)
    large = nn.Linear(SMALL_MODEL_PARAMETERS // 1000 + 1, 1000, device="meta")  # no memory
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with small_model_threads(small):
            assert torch.get_num_threads() == 1
            with small_model_threads(small):  # nested (or a second job): still one
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with small_model_threads(large):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), small_model_threads(small):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_demo_run_batches_its_windows_on_one_thread(make_napari_viewer, qtbot, monkeypatch):
    """The widget runs the demo model 32 windows per encoder pass (the scene's 117 windows in 4
    passes, not 117) and on one intra-op thread, whatever the process has."""
    import torch

    from napari_maskclip.demo import WINDOW_BATCH
    from napari_maskclip.demo.scene import demo_classes, demo_scene
    from napari_maskclip.plugin import jobs
    from napari_maskclip.plugin._qt.segment_panel import MaskClipWidget

    threads_seen: list[int] = []
    original = jobs.segment_stack_iter

    def recording_iter(segmenter, request):
        gen = original(segmenter, request)
        while True:
            threads_seen.append(torch.get_num_threads())
            try:
                step = next(gen)
            except StopIteration as stop:
                return stop.value
            yield step

    monkeypatch.setattr(jobs, "segment_stack_iter", recording_iter)
    viewer = make_napari_viewer()
    viewer.add_image(demo_scene().image, rgb=True, name="scene")
    widget = MaskClipWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.use_model("demo")
    widget.model.device.setCurrentText("cpu")
    classes, background = demo_classes()
    widget.classes.text.setPlainText(classes)
    widget.classes.background.setEditText(background)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with qtbot.waitSignal(widget.run_finished, timeout=120_000) as blocker:
            widget.run()
        qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert blocker.args == ["done"], widget.status.text()
    assert widget._pending.request.settings.window_batch == WINDOW_BATCH
    segmenter = widget.pool.cached(widget.model.choice())
    windows = 13 * 9  # 64 px windows, stride 16, on 256x192
    assert segmenter.image_encoder_calls == -(-windows // WINDOW_BATCH)
    assert threads_seen and set(threads_seen) == {1}
    assert threads_after == 2  # given back


def test_the_dock_imports_torch_in_the_background_once_shown(make_napari_viewer, qtbot,
                                                            monkeypatch):
    """Once the dock shows, torch and open_clip are imported on a background thread (the first
    run then finds them loaded); opening it twice starts no second import."""
    import threading

    from napari_maskclip.plugin import models
    from napari_maskclip.plugin._qt.segment_panel import MaskClipWidget

    started: list[str] = []
    monkeypatch.setattr(models, "_preload", None)
    monkeypatch.setattr(models, "_preload_modules",
                        lambda: started.append(threading.current_thread().name))
    viewer = make_napari_viewer(show=True)
    widget = MaskClipWidget(viewer)
    assert models._preload is None  # made, not shown: nothing imported
    viewer.window.add_dock_widget(widget)
    qtbot.waitUntil(lambda: models._preload is not None, timeout=10_000)
    models._preload.join(10)
    assert started == ["maskclip-preload"]
    assert models.preload_engine() is models._preload and started == ["maskclip-preload"]
