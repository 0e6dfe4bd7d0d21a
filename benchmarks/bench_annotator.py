"""Image-series annotator benchmark: waiting time at Next, and (section ``al``) active learning.

Sections are functions returning a dict of figures; the last line printed is one JSON object, the
merge of their dicts.

* :func:`next_section`: seconds from Next to the next image's labels ready, median of ``--runs``
  images of ``--size`` px synthetic scenes (:mod:`napari_maskclip.synthetic`), model ``--model``
  (the shipped ``demo`` MaskCLIP by default, with its recommended settings). Next = save the image
  on screen into the dataset (the series' exporter) + get the next image's labels.
  ``next_seconds``: with the prefetcher; the "person" spends ``--edit-seconds`` on each image
  before Next (meanwhile the next image is read and labelled in the background).
  ``next_seconds_no_prefetch``: read + predict start at Next. Both include the save
  (``save_seconds``: its median alone). The napari layer update is not included (GUI; see the
  series page's own measurement). Wall times grow with the machine's load (printed); the
  ``*_idle_estimate`` figures add up CPU times instead (save + what the prediction has left after
  the edit time), what one idle core would take.

    python benchmarks/bench_annotator.py [--sections next] [--runs 10] [--size 256]
        [--edit-seconds 1.0] [--model demo] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _scenes_folder(folder: Path, n: int, size: int, seed: int) -> Path:
    """``n`` synthetic ``size`` px scenes as PNG files in ``folder``."""
    from PIL import Image

    from napari_maskclip.synthetic import make_scene

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.fromarray(make_scene(seed + k, size=(size, size)).image).save(folder / f"scene{k:03d}.png")
    return folder


# ---- Next: waiting time with and without the prefetcher ---------------------------------------
def _next_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=10, help="next: Next presses timed (median)")
    parser.add_argument("--size", type=int, default=256, help="next: scene side in pixels")
    parser.add_argument("--edit-seconds", type=float, default=1.0,
                        help="next: time the person spends on an image before Next (prefetch run)")
    parser.add_argument("--model", default="demo", help="next: MaskCLIP model (default: demo)")
    parser.add_argument("--classes", default="circle, square, triangle", help="next: class names")


def next_section(args: argparse.Namespace) -> dict[str, Any]:
    from napari_maskclip.series import SeriesSession, list_images
    from napari_maskclip.series.predictor import SeriesPredictor
    from napari_maskclip.series.prefetch import Prefetcher

    start = time.perf_counter()
    predictor = SeriesPredictor.teacher(args.model, args.classes)
    load_s = time.perf_counter() - start
    n = args.runs
    with tempfile.TemporaryDirectory(prefix="bench-annotator-") as tmp:
        tmp = Path(tmp)
        # Different scenes for each run: no feature cache hit between them (+1: the first is shown).
        warm = _scenes_folder(tmp / "warm", 2, args.size, 900)
        with_folder = _scenes_folder(tmp / "with", n + 1, args.size, 1000)
        without_folder = _scenes_folder(tmp / "without", n + 1, args.size, 5000)
        warm_session = SeriesSession.open(list_images(warm), tmp / "ds-warm", args.classes)
        for i in range(2):  # warm up: first run costs (text encoding, allocator), first save
            p = predictor.predict(warm_session.read_image(i))
            warm_session.save(i, warm_session.read_image(i), p.labels, probabilities=p.probabilities)

        # With the prefetcher: image k+1 is prepared while the person edits image k.
        session = SeriesSession.open(list_images(with_folder), tmp / "ds-with", args.classes)
        with_times, save_times, save_cpu, predict_times, predict_cpu = [], [], [], [], []
        with Prefetcher(session, predictor) as prefetch:
            shown = prefetch.result(0)
            for k in range(n):
                prefetch.request(k + 1)
                time.sleep(args.edit_seconds)  # the person edits image k
                t0, c0 = time.perf_counter(), time.thread_time()
                session.save(k, shown.image, shown.labels, probabilities=shown.probabilities)
                t1, c1 = time.perf_counter(), time.thread_time()
                shown = prefetch.result(k + 1)
                with_times.append(time.perf_counter() - t0)
                save_times.append(t1 - t0)
                save_cpu.append(c1 - c0)
                predict_times.append(shown.seconds)
                predict_cpu.append(shown.cpu_seconds)

        # Without: reading and labelling start at Next.
        session = SeriesSession.open(list_images(without_folder), tmp / "ds-without", args.classes)
        image = session.read_image(0)
        shown = predictor.predict(image)
        without_times = []
        for k in range(n):
            t0 = time.perf_counter()
            session.save(k, image, shown.labels, probabilities=shown.probabilities)
            image = session.read_image(k + 1)
            shown = predictor.predict(image)
            without_times.append(time.perf_counter() - t0)

    save_c, predict_c = statistics.median(save_cpu), statistics.median(predict_cpu)
    figures = {
        "next_seconds": statistics.median(with_times),
        "next_seconds_no_prefetch": statistics.median(without_times),
        "next_seconds_max": max(with_times),
        "save_seconds": statistics.median(save_times),
        "predict_seconds": statistics.median(predict_times),
        "save_cpu_seconds": save_c,
        "predict_cpu_seconds": predict_c,
        # What an idle single core would take: CPU time, not wall time (a shared machine's wall
        # times grow with its load); with prefetch only the prediction left after the edit.
        "next_seconds_idle_estimate": save_c + max(0.0, predict_c - args.edit_seconds),
        "next_seconds_no_prefetch_idle_estimate": save_c + predict_c,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "next_runs": n, "next_size": args.size, "next_edit_seconds": args.edit_seconds,
        "next_model": args.model, "model_load_seconds": load_s,
    }
    print(f"Next -> labels ready, {args.model} on {args.size}x{args.size} scenes, median of {n}:")
    print(f"  with prefetch ({args.edit_seconds:g} s on each image): "
          f"{figures['next_seconds']:.3f} s (max {figures['next_seconds_max']:.3f} s)")
    print(f"  without prefetch:                  {figures['next_seconds_no_prefetch']:.3f} s")
    print(f"  of which: save {figures['save_seconds']:.3f} s; one prediction "
          f"{figures['predict_seconds']:.3f} s (in the background with prefetch)")
    print(f"  CPU time: save {save_c:.3f} s, prediction {predict_c:.3f} s; on an idle core about "
          f"{figures['next_seconds_idle_estimate']:.3f} s with prefetch, "
          f"{figures['next_seconds_no_prefetch_idle_estimate']:.3f} s without "
          f"(load average now {figures['load_average']})")
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "next": next_section,
}
#: Each section's command-line options.
SECTION_ARGS: list[Callable[[argparse.ArgumentParser], None]] = [
    _next_args,
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    for add in SECTION_ARGS:
        add(parser)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    figures: dict[str, Any] = {}
    for name in args.sections.split(","):
        figures.update(SECTIONS[name.strip()](args))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
