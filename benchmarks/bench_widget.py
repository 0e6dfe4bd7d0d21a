"""Widget benchmark: the MaskCLIP dock's first run against the engine doing the same work.

Both sides run in fresh processes with a fresh config folder (no cached class embeddings), on a
SIZE x SIZE RGB image, ViT-B-16's real architecture with random weights built from open_clip's
config (no download), on the CPU, with the widget's default settings (the engine side is given
exactly the settings the widget built):

* ``engine_s``: ``Segmenter(model, "random")`` (model build) + ``encode`` + ``segment`` (text
  encoder and read-out), the engine imported beforehand;
* ``first_run_s``: in a shown napari viewer with the dock, from pressing Run to the end of the
  run (labels and confidence layers added); the first run also imports the engine (torch,
  open_clip), which the napari process has not loaded yet.

``--model demo``: the shipped demo model on the demo's 256x192 shapes scene (its 12 classes and
background name, and the settings the widget presets for it), what ``./run.sh demo`` runs first;
``--size`` is then ignored.

``ratio = first_run_s / engine_s``. A per-phase breakdown of the widget run is printed (import,
model build, encode, text and read-out, main thread: layers), and ``--profile FILE`` writes a
cProfile of the widget run's worker thread and main thread (``python -m pstats FILE``).

Run under a display (``xvfb-run -a``)::

    QT_QPA_PLATFORM=xcb xvfb-run -a python benchmarks/bench_widget.py [--size 1024] [--threads N]
    QT_QPA_PLATFORM=xcb xvfb-run -a python benchmarks/bench_widget.py --model demo

The last line is one JSON object with ``first_run_s``, ``engine_s`` and ``ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CLASSES = "cat, dog, person, car, tree, sky, road, building, grass, water"
MODEL = "ViT-B-16"
DEMO = "demo"


def _case(model: str, size: int):
    """(image, classes, background, weights) of the benchmark's case."""
    if model == DEMO:
        from napari_maskclip.demo.scene import demo_classes, demo_scene

        classes, background = demo_classes()
        return demo_scene().image, classes, background, None
    return _image(size), CLASSES, "", "random"


def _image(size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8)
    return np.kron(small, np.ones((32, 32, 1), dtype=np.uint8))  # flat blocks: some structure


def run_engine(model: str, size: int, settings: dict) -> dict:
    """Model build + encode + text and read-out, as a script would call the engine."""
    from napari_maskclip.engine import Segmenter, SegmentSettings

    image, classes, background, weights = _case(model, size)
    chosen = SegmentSettings().replace(**settings)
    cpu = time.process_time()
    start = time.perf_counter()
    seg = Segmenter(model, weights, device="cpu")
    built = time.perf_counter()
    features = seg.encode(image, settings=chosen)
    encoded = time.perf_counter()
    result = seg.segment(features, classes, background=background or None, settings=chosen)
    done = time.perf_counter()
    assert result.labels.shape == image.shape[:2]
    return {"engine_s": done - start, "build_s": built - start, "encode_s": encoded - built,
            "text_readout_s": done - encoded, "cpu_s": time.process_time() - cpu}


def run_widget(model: str, size: int, profile: str | None, preloaded: bool = False) -> dict:
    """The dock's first run in a shown viewer; returns its time, phases and settings."""
    import napari
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_maskclip.plugin import models
    from napari_maskclip.plugin._qt import segment_panel
    from napari_maskclip.plugin._qt.segment_panel import MaskClipWidget

    image, classes, background, weights = _case(model, size)
    viewer = napari.Viewer(show=True)
    viewer.add_image(image, name="photo", rgb=True)
    widget = MaskClipWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MaskCLIP")
    if model == DEMO:
        widget.use_model(DEMO)  # with its preset, as the Shapes scene sample sets it
    else:
        widget.model.model.setCurrentText(model)
        widget.model.pretrained.setCurrentText(weights)
    widget.model.device.setCurrentText("cpu")
    widget.classes.text.setPlainText(classes)
    widget.classes.background.setEditText(background)
    for _ in range(20):
        QApplication.processEvents()
    preload_s = None
    if preloaded:  # as when a person types the class names first: the dock's import is done
        begin = time.perf_counter()
        thread = models.preload_engine()
        while thread.is_alive():
            QApplication.processEvents()
            thread.join(0.02)
        preload_s = time.perf_counter() - begin

    marks: dict[str, float] = {}
    ran_with: dict = {}  # the settings the run was given (a model may add its own, e.g. demo)
    profilers = []
    original_job = segment_panel.segmentation_job
    original_apply = segment_panel.apply_result
    original_import = models._import_engine

    def import_engine():
        begin = time.perf_counter()
        try:
            engine = original_import()
            engine.Segmenter  # noqa: B018 - the engine is lazy: this imports torch
            import open_clip  # noqa: F401  (imported by every CLIP loader)

            return engine
        finally:
            marks.setdefault("import_s", time.perf_counter() - begin)

    def job(pool, choice, request, *args, **kwargs):  # the worker thread: time (and profile) it
        if request.settings is not None:
            ran_with.update(request.settings.to_dict())
        if profile:
            import cProfile

            prof = cProfile.Profile(time.thread_time)  # CPU time of this thread
            profilers.append(prof)
            prof.enable()
        marks["worker_start"] = time.perf_counter()
        thread_cpu = time.thread_time()
        gen = original_job(pool, choice, request, *args, **kwargs)
        try:
            while True:
                step = next(gen)
                stage = step.stage
                if stage == "load" and "load_start" not in marks:
                    marks["load_start"] = time.perf_counter()
                elif stage != "load" and "load_end" not in marks:
                    marks["load_end"] = time.perf_counter()
                if "encod" in step.message.lower() and "text_start" not in marks:
                    marks.setdefault("encode_seen", time.perf_counter())
                if ("text" in step.message.lower() or "class" in step.message.lower()) \
                        and "text_start" not in marks:
                    marks["text_start"] = time.perf_counter()
                yield step
        except StopIteration as stop:
            marks["worker_end"] = time.perf_counter()
            marks["worker_thread_cpu_s"] = time.thread_time() - thread_cpu
            if profile:
                profilers[0].disable()
            return stop.value

    def apply(*args, **kwargs):
        marks["apply_start"] = time.perf_counter()
        report = original_apply(*args, **kwargs)
        marks["apply_end"] = time.perf_counter()
        return report

    segment_panel.segmentation_job = job
    segment_panel.apply_result = apply
    models._import_engine = import_engine
    main_prof = None
    if profile:
        import cProfile

        main_prof = cProfile.Profile(time.thread_time)
        main_prof.enable()
    loop = QEventLoop()
    outcome: list[str] = []
    widget.run_finished.connect(lambda how: (outcome.append(how), loop.quit()))
    QTimer.singleShot(30 * 60 * 1000, loop.quit)
    cpu, main_cpu = time.process_time(), time.thread_time()
    start = time.perf_counter()
    widget.run()
    loop.exec()
    end = time.perf_counter()
    cpu, main_cpu = time.process_time() - cpu, time.thread_time() - main_cpu
    QApplication.processEvents()  # the first draw of the new layers
    drawn = time.perf_counter()
    if main_prof is not None:
        main_prof.disable()
        import pstats

        stats = pstats.Stats(main_prof)
        for prof in profilers:
            stats.add(prof)
        stats.dump_stats(profile)
    if outcome != ["done"]:
        raise SystemExit(f"widget run ended with {outcome}: {widget.status.text()}")
    settings = widget.settings.overrides()
    if "window_batch" in ran_with:  # not a control: what the widget chose for the model
        settings["window_batch"] = ran_with["window_batch"]
    worker_end = marks.get("worker_end", end)
    phases = {
        "start_to_worker_s": marks["worker_start"] - start,
        "engine_import_s": marks.get("import_s", 0.0),
        "build_s": marks.get("load_end", worker_end) - marks["worker_start"]
        - marks.get("import_s", 0.0),
        "segment_in_worker_s": worker_end - marks.get("load_end", worker_end),
        "worker_to_main_s": marks["apply_start"] - worker_end,
        "layers_s": marks["apply_end"] - marks["apply_start"],
        "after_layers_s": end - marks["apply_end"],
        "first_draw_s": drawn - end,
        "preload_wait_s": preload_s,
        "main_thread_cpu_s": main_cpu,
        "worker_thread_cpu_s": marks.get("worker_thread_cpu_s", 0.0),
    }
    names = [layer.name for layer in viewer.layers]
    status = widget.status.text()
    viewer.close()
    return {"first_run_s": end - start, "cpu_s": cpu, "phases": phases, "settings": settings,
            "status": status, "layers": names}


def _child(part: str, args: argparse.Namespace, config: str, extra: list[str]) -> dict:
    # A fresh config and cache folder: no class embeddings cached on disk from an earlier run.
    env = dict(os.environ, NAPARI_MASKCLIP_CONFIG_DIR=config,
               NAPARI_MASKCLIP_CACHE_DIR=os.path.join(config, "cache"),
               OMP_NUM_THREADS=str(args.threads), NAPARI_MASKCLIP_OFFLINE="1")
    cmd = [sys.executable, __file__, "--part", part, "--size", str(args.size),
           "--threads", str(args.threads), "--model", args.model, *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{part} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--profile", default=None, help="write a cProfile of the widget run here")
    parser.add_argument("--model", choices=[MODEL, DEMO], default=MODEL,
                        help="ViT-B-16 with random weights on a SIZE x SIZE image, or the demo "
                        "model on the demo's shapes scene")
    parser.add_argument("--preloaded", action="store_true",
                        help="press Run once the dock's background import of torch and open_clip "
                        "is done (as after typing the class names), not at once")
    parser.add_argument("--part", choices=["engine", "widget"], help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        if args.part == "engine":
            import torch  # the widget process imports it in its first run (timed there)

            torch.set_num_threads(args.threads)
            print(json.dumps(run_engine(args.model, args.size, json.loads(args.settings))))
        else:
            print(json.dumps(run_widget(args.model, args.size, args.profile, args.preloaded)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--profile", args.profile] if args.profile else []
        extra += ["--preloaded"] if args.preloaded else []
        widget = _child("widget", args, os.path.join(tmp, "w"), extra)
        engine = _child("engine", args, os.path.join(tmp, "e"),
                        ["--settings", json.dumps(widget["settings"])])
    if args.model == DEMO:
        print(f"the demo's 256x192 shapes scene, the demo model, {args.threads} thread(s), 12 "
              f"classes, widget settings: {widget['settings']}")
    else:
        print(f"image {args.size}x{args.size}, {MODEL} (random weights), {args.threads} "
              f"thread(s), 10 classes, widget settings: {widget['settings']}")
    print(f"engine: {engine['engine_s']:.2f} s (model build {engine['build_s']:.2f}, encode "
          f"{engine['encode_s']:.2f}, text + read-out {engine['text_readout_s']:.2f}); "
          f"CPU time {engine['cpu_s']:.2f} s")
    print(f"widget first run: {widget['first_run_s']:.2f} s; CPU time {widget['cpu_s']:.2f} s "
          "(all threads; on a busy machine compare these too)")
    for name, value in widget["phases"].items():
        if value is not None:
            print(f"  {name:<22} {value:8.2f} s")
    print(f"  status: {widget['status']}")
    print(f"  layers: {widget['layers']}")
    ratio = widget["first_run_s"] / engine["engine_s"]
    print(json.dumps({"model": args.model, "size": args.size, "threads": args.threads,
                      "first_run_s": round(widget["first_run_s"], 3),
                      "engine_s": round(engine["engine_s"], 3), "ratio": round(ratio, 3),
                      "cpu_ratio": round(widget["cpu_s"] / engine["cpu_s"], 3),
                      "engine": engine, "widget_phases": widget["phases"]}))


if __name__ == "__main__":
    main()
