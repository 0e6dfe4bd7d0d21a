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

* :func:`al_section`: an active-learning simulation on synthetic scenes with exact masks
  (:mod:`napari_maskclip.synthetic`, at the demo model's scale). A pool of ``--al-pool`` scenes
  is a series folder; a simulated person labels ``--al-per-round`` images per round perfectly
  (labels = the exact mask, every pixel edited) through the series session, for
  ``--al-rounds`` rounds; after each round the student is retrained as the series page does it
  (:func:`napari_maskclip.series.retrain.retrain_iter`: warm start from the student in use,
  ``--al-iterations`` iterations, promoted only when it beats the model in use on the held-out
  human pixels). Two ways to pick the images of a round: ``order`` (folder order) and
  ``hardest`` (the remaining images by the margin uncertainty of the model in use - the demo
  MaskCLIP before the first student -, most uncertain first). Figures: the mIoU of the newest
  student of each round on ``--al-eval`` held-out scenes (all pixels, exact masks);
  ``al_miou_hardest`` / ``al_miou_order`` are those after the last round, ``al_rounds_*`` the
  per-round lists, ``al_inuse_*`` the same for the model in use (the promoted one), and
  ``al_teacher_miou`` the demo MaskCLIP's own. Everything is seeded; ``--al-repeats`` runs
  the whole simulation on that many pools and reports the mean (and each run).

    python benchmarks/bench_annotator.py [--sections al] [--al-rounds 3] [--al-per-round 20]
        [--al-pool 100] [--al-eval 100] [--al-iterations 300] [--al-repeats 1] [--quick]
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


# ---- active learning: hardest first against folder order ---------------------------------------
#: Scene streams of this section (the demo model trains on other seeds).
AL_POOL_SEED = 20261129
AL_EVAL_SEED = 20261130


def _al_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--al-rounds", type=int, default=3, help="al: labelling rounds")
    parser.add_argument("--al-per-round", type=int, default=20, help="al: images labelled per round")
    parser.add_argument("--al-pool", type=int, default=100, help="al: scenes in the image folder")
    parser.add_argument("--al-eval", type=int, default=100, help="al: held-out scenes scored")
    parser.add_argument("--al-iterations", type=int, default=300,
                        help="al: student iterations per retrain")
    parser.add_argument("--al-batch", type=int, default=8, help="al: student crops per step")
    parser.add_argument("--al-lr", type=float, default=0.05, help="al: student learning rate")
    parser.add_argument("--al-repeats", type=int, default=1, help="al: pools simulated (mean)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")


def _scene_kwargs() -> dict[str, Any]:
    """Scenes as the demo model saw them in training (size, objects, clutter...)."""
    from napari_maskclip.demo import demo_model_files

    vocab = json.loads(demo_model_files().vocab.read_text())
    data = vocab.get("data", {})
    size = int(vocab.get("image_size", 64))
    kwargs: dict[str, Any] = {"size": (size, size), "n_objects": tuple(data.get("n_objects", (1, 3)))}
    for key in ("radius_frac", "clutter_prob", "max_rotation"):
        if key in data:
            kwargs[key] = tuple(data[key]) if isinstance(data[key], list) else data[key]
    return kwargs


def _scenes(seed: int, n: int) -> list[Any]:
    from napari_maskclip.synthetic import make_batch

    kwargs = _scene_kwargs()
    size, n_objects = kwargs.pop("size"), kwargs.pop("n_objects")
    out: list[Any] = []
    for start in range(0, n, 64):
        out += make_batch([seed, start], min(64, n - start), size, n_objects, **kwargs)
    return out


def _held_out_miou(predict: Callable[[Any], Any], scenes: list[Any], n_classes: int) -> float:
    import numpy as np

    from napari_maskclip.evaluate import confusion_matrix, scores_from_confusion

    cm = np.zeros((n_classes, n_classes + 1), dtype=np.int64)
    for scene in scenes:
        cm += confusion_matrix(np.asarray(predict(scene.image)), scene.mask, n_classes,
                               ignore_index=None)
    return float(scores_from_confusion(cm).miou)


def _simulate(strategy: str, pool_folder: Path, masks: list[Any], eval_scenes: list[Any],
              teacher: Any, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One labelling run: rounds of picking, perfect labelling, retraining; per-round figures."""
    import numpy as np

    from napari_maskclip.progress import run_to_completion
    from napari_maskclip.series import SeriesSession, list_images
    from napari_maskclip.series.predictor import SeriesPredictor
    from napari_maskclip.series.retrain import retrain_iter
    from napari_maskclip.series.uncertainty import hardest_first, score_iter
    from napari_maskclip.student import StudentSegmenter, TrainSettings
    from napari_maskclip.synthetic import CLASS_NAMES

    classes = list(CLASS_NAMES)
    n_classes = len(classes) + 1
    images = list_images(pool_folder)
    session = SeriesSession.open(images, work / f"ds-{strategy}", classes, background="background")
    checkpoint = work / f"student-{strategy}.safetensors"
    in_use = teacher  # a SeriesPredictor: the demo MaskCLIP until a student is promoted
    settings = TrainSettings(
        backbone="tiny", backbone_weights="random", batch_size=args.al_batch,
        crop_size=_scene_kwargs()["size"][0], scale_min=1.0, scale_max=1.0, flip=True,
        lr=args.al_lr, self_train_fraction=1.0, normalize_features=True, seed=0,
    )
    rounds, in_use_rounds, promoted, score_s, train_s = [], [], [], 0.0, 0.0
    for _ in range(args.al_rounds):
        remaining = [i for i in range(len(session)) if not session.is_saved(i)]
        if strategy == "hardest":
            start = time.perf_counter()
            scores = run_to_completion(score_iter(session, in_use, remaining))
            score_s += time.perf_counter() - start
            remaining = hardest_first(remaining, scores)
        for i in remaining[: args.al_per_round]:
            image = session.read_image(i)
            # The person fixes every pixel: the labels are the exact mask, all of it edited.
            session.save(i, image, masks[i], edited=np.ones(masks[i].shape, bool),
                         provenance={"model": "demo"})
        start = time.perf_counter()
        current = None
        if not checkpoint.exists():
            def current(image, predictor=in_use):
                return predictor.predict(image).labels
        outcome = run_to_completion(retrain_iter(
            session.dataset_dir, checkpoint if checkpoint.exists() else None, checkpoint,
            iterations=args.al_iterations, settings=settings, teacher=teacher.segmenter,
            current=current, device="cpu", precision="fp32", text_cache=None,
        ))
        train_s += time.perf_counter() - start
        newest = outcome.result.segmenter("cpu", "fp32")
        rounds.append(_held_out_miou(lambda im: newest(im).labels, eval_scenes, n_classes))
        promoted.append(outcome.promoted)
        if outcome.promoted:
            in_use = SeriesPredictor.student(StudentSegmenter(checkpoint, device="cpu"), classes)
        in_use_rounds.append(rounds[-1] if outcome.promoted else (
            in_use_rounds[-1] if in_use_rounds else None))
        print(f"  {strategy:7s} round {len(rounds)}: {session.saved_count()} labelled, newest "
              f"student {100 * rounds[-1]:.1f} mIoU, validation new/current "
              f"{_pct(outcome.miou_new)}/{_pct(outcome.miou_current)} on "
              f"{len(outcome.validation)} images -> "
              f"{'promoted' if outcome.promoted else 'kept the model in use'}", file=sys.stderr)
    return {"rounds": rounds, "in_use": in_use_rounds, "promoted": promoted,
            "score_seconds": score_s, "train_seconds": train_s,
            "picked": [session.names[i] for i in range(len(session)) if session.is_saved(i)]}


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def al_section(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    from napari_maskclip.series.predictor import SeriesPredictor
    from napari_maskclip.synthetic import CLASS_NAMES

    if args.quick:
        args.al_pool, args.al_eval, args.al_per_round = 16, 8, 4
        args.al_iterations, args.al_rounds = 6, 2
    if args.al_pool < args.al_rounds * args.al_per_round:
        raise SystemExit("--al-pool must hold at least --al-rounds x --al-per-round scenes")
    start, cpu_start = time.perf_counter(), time.process_time()
    teacher = SeriesPredictor.teacher("demo", list(CLASS_NAMES), background="background",
                                      device="cpu")
    eval_scenes = _scenes(AL_EVAL_SEED, args.al_eval)
    n_classes = len(CLASS_NAMES) + 1
    teacher_miou = _held_out_miou(lambda im: teacher.predict(im).labels, eval_scenes, n_classes)
    runs: dict[str, list[dict[str, Any]]] = {"hardest": [], "order": []}
    for repeat in range(args.al_repeats):
        pool = _scenes(AL_POOL_SEED + 1000 * repeat, args.al_pool)
        with tempfile.TemporaryDirectory(prefix="bench-al-") as tmp:
            work = Path(tmp)
            folder = work / "images"
            folder.mkdir()
            for k, scene in enumerate(pool):
                Image.fromarray(scene.image).save(folder / f"scene{k:03d}.png")
            masks = [scene.mask for scene in pool]
            for strategy in runs:
                runs[strategy].append(_simulate(strategy, folder, masks, eval_scenes, teacher,
                                                work, args))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    def mean_rounds(strategy: str, key: str) -> list[Any]:
        per_run = [run[key] for run in runs[strategy]]
        return [None if any(r[k] is None for r in per_run) else
                round(100 * statistics.fmean(r[k] for r in per_run), 2)
                for k in range(args.al_rounds)]

    figures: dict[str, Any] = {
        "al_miou_hardest": mean_rounds("hardest", "rounds")[-1],
        "al_miou_order": mean_rounds("order", "rounds")[-1],
        "al_rounds_hardest": mean_rounds("hardest", "rounds"),
        "al_rounds_order": mean_rounds("order", "rounds"),
        "al_inuse_hardest": mean_rounds("hardest", "in_use"),
        "al_inuse_order": mean_rounds("order", "in_use"),
        "al_promoted_hardest": [run["promoted"] for run in runs["hardest"]],
        "al_promoted_order": [run["promoted"] for run in runs["order"]],
        "al_teacher_miou": round(100 * teacher_miou, 2),
        "al_runs_hardest": [[round(100 * v, 2) for v in run["rounds"]] for run in runs["hardest"]],
        "al_runs_order": [[round(100 * v, 2) for v in run["rounds"]] for run in runs["order"]],
        "al_setup": {"rounds": args.al_rounds, "per_round": args.al_per_round,
                     "pool": args.al_pool, "eval": args.al_eval,
                     "iterations": args.al_iterations, "batch": args.al_batch, "lr": args.al_lr,
                     "repeats": args.al_repeats, "threads": args.threads},
        "al_seconds": round(seconds, 1),
        "al_cpu_seconds": round(cpu_seconds, 1),
        "al_score_seconds": round(sum(r["score_seconds"] for r in runs["hardest"]), 1),
    }
    print(f"active learning: {args.al_rounds} rounds x {args.al_per_round} images from a pool of "
          f"{args.al_pool}, student retrained {args.al_iterations} iterations per round, "
          f"{args.al_eval} held-out scenes, {args.al_repeats} pool(s), {seconds:.0f} s "
          f"({cpu_seconds:.0f} s CPU; load {os.getloadavg()[0]:.1f})")
    print(f"  demo MaskCLIP (teacher): {figures['al_teacher_miou']:.1f} mIoU")
    print("| round | hardest first | folder order |\n|---|---|---|")
    for k in range(args.al_rounds):
        print(f"| {k + 1} ({(k + 1) * args.al_per_round} labelled) | "
              f"{figures['al_rounds_hardest'][k]:.1f} | {figures['al_rounds_order'][k]:.1f} |")
    return figures


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "next": next_section,
    "al": al_section,
}
#: Each section's command-line options.
SECTION_ARGS: list[Callable[[argparse.ArgumentParser], None]] = [
    _next_args,
    _al_args,
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
