"""Offline quality harness: MaskCLIP's and MaskCLIP+'s claims, in miniature, with the demo model.

The demo model is a tiny CLIP trained here from scratch on captioned synthetic scenes
(``tools/train_toy_clip.py``; no pixel labels, ever). On held-out scenes with exact masks, never
seen in training, this prints mIoU and pixel accuracy (all classes, background included) of:

  a) naive last-layer tokens          (mode ``naive``)
  b) MaskCLIP                          (the value path; no refinements)
  c) b + prompt denoising
  d) b + key smoothing
  e) the SCLIP, ClearCLIP, NACLIP, SC-CLIP, RF-CLIP and ResCLIP read-outs
  f) a MaskCLIP+ student trained with the project's own training code on b's pseudo-labels of
     *separate, unlabeled* scenes (no ground truth anywhere in its training)
  g) the query-time refinements on every read-out: mode x {plain, +PAMR, +regions (region
     voting on Felzenszwalb superpixels, mean probability), +both, +TLP (PEARL's text-aware
     propagation), +majority (the same regions, CorrCLIP's most-frequent-label vote)}; each
     image encoded once per mode, then re-queried. Superpixel parameters were chosen on a
     separate tuning stream of scenes (TUNE_STREAM), never on the evaluation scenes.

Claims: b beats a (dense labels come out of the value path, not the naive tokens), and f beats b
(the student denoises its teacher). The last line is one JSON object with the keys ``naive``,
``maskclip``, ``pd``, ``ks``, ``sclip``, ``clearclip``, ``naclip``, ``scclip``, ``rfclip``,
``resclip``, ``student``,
``pamr`` (NACLIP + PAMR, the published pairing), ``regions`` (NACLIP + region voting), ``best``
and ``best_name`` (the best training-free combination of table g), ``table`` (g),
``attention_regions`` (NACLIP with its last block's attention restricted to superpixels, CorrCLIP's
main idea, encode-time) and ``attention_table`` (h: that restriction on SCLIP, ClearCLIP and
NACLIP, alone and with region voting) (mIoU, percent).

Every row runs in ``--precision`` (default fp32, the reference). ``--compare-precision bf16`` (the
default) adds b and the best training-free read-out again in that precision (keys ``maskclip_bf16``
and e.g. ``naclip_bf16``; the student is not rerun): the mIoU must stay within 0.3 points.

    python benchmarks/quality.py            # the full run (>= 200 eval scenes)
    python benchmarks/quality.py --quick    # a smoke version (under a minute)
    python benchmarks/quality.py --compare-precision none   # no bf16 rows
    python benchmarks/quality.py --model-dir DIR   # another toy model (toy_clip.json/.safetensors/toy_vocab.json)
    python benchmarks/quality.py --save-student src/napari_maskclip/demo/toy_student.safetensors
                                            # the full run that made the shipped student
    python benchmarks/quality.py --student-checkpoint src/napari_maskclip/demo/toy_student.safetensors
                                            # score the shipped student (no training)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

# Scenes are drawn from their own seed streams: training of the toy model uses [seed, 0, step]
# and [seed, 1, 0]; these never collide with them.
EVAL_STREAM = (20261127, 7)
STUDENT_STREAM = (20261127, 8)
TUNE_STREAM = (20261127, 9)  # where the superpixel parameters below were picked

#: Table g: the modes and the query-time refinements applied to each.
REFINED_MODES = ("maskclip", "sclip", "clearclip", "naclip", "scclip", "rfclip", "resclip")
REFINEMENTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "pamr": {"pamr": True},
    "regions": {"regions": "felzenszwalb", "felzenszwalb_scale": 50.0, "felzenszwalb_min_size": 50},
    "pamr+regions": {"pamr": True, "regions": "felzenszwalb", "felzenszwalb_scale": 50.0,
                     "felzenszwalb_min_size": 50},
    "tlp": {"tlp": True},
    "majority": {"regions": "felzenszwalb", "felzenszwalb_scale": 50.0, "felzenszwalb_min_size": 50,
                 "region_vote": "majority"},
}

READOUTS: dict[str, dict[str, Any]] = {
    "naive": {"mode": "naive", "denoise": False},
    "maskclip": {"mode": "maskclip", "denoise": False},
    "pd": {"mode": "maskclip", "denoise": True},
    "ks": {"mode": "maskclip", "denoise": False, "key_smoothing": True},
    "sclip": {"mode": "sclip", "denoise": False},
    "clearclip": {"mode": "clearclip", "denoise": False},
    "naclip": {"mode": "naclip", "denoise": False},
    "scclip": {"mode": "scclip", "denoise": False},
    "rfclip": {"mode": "rfclip", "denoise": False},
    "resclip": {"mode": "resclip", "denoise": False},
}
LABELS = {
    "naive": "a) naive last-layer tokens",
    "maskclip": "b) MaskCLIP (value path)",
    "pd": "c) b + prompt denoising",
    "ks": "d) b + key smoothing",
    "sclip": "e) SCLIP read-out",
    "clearclip": "e) ClearCLIP read-out",
    "naclip": "e) NACLIP read-out",
    "scclip": "e) SC-CLIP read-out",
    "rfclip": "e) RF-CLIP read-out",
    "resclip": "e) ResCLIP read-out",
    "student": "f) MaskCLIP+ student (on {teacher}'s pseudo-labels)",
}
#: Largest mIoU change (points) a half-precision read-out may show against fp32 (issue 16).
PRECISION_BAR = 0.3


def model_files(model_dir: Optional[str]) -> tuple[Path, Path, dict[str, Any]]:
    """(config, weights, vocabulary) of the toy model: the shipped demo model by default."""
    if model_dir is None:
        from napari_maskclip.demo import demo_model_files

        files = demo_model_files(check=False)
        config, weights, vocab = files.config, files.weights, files.vocab
    else:
        base = Path(model_dir)
        config, weights, vocab = base / "toy_clip.json", base / "toy_clip.safetensors", base / "toy_vocab.json"
    return config, weights, json.loads(vocab.read_text())


def scene_kwargs(vocab: dict[str, Any]) -> dict[str, Any]:
    """How evaluation scenes are drawn: like the training distribution, at the eval size."""
    data = vocab.get("data", {})
    size = int(vocab.get("eval_image_size", vocab.get("image_size", 64)))
    n_objects = tuple(vocab.get("eval_n_objects", data.get("n_objects", (1, 3))))
    kwargs: dict[str, Any] = {"size": (size, size), "n_objects": n_objects}
    for key in ("radius_frac", "clutter_prob", "max_rotation", "noise", "max_overlap"):
        if key in data:
            value = data[key]
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return kwargs


def make_scenes(stream: tuple[int, int], n: int, kwargs: dict[str, Any]):
    from napari_maskclip.synthetic import make_batch

    size, n_objects = kwargs["size"], kwargs["n_objects"]
    extra = {k: v for k, v in kwargs.items() if k not in ("size", "n_objects")}
    scenes = []
    for start in range(0, n, 64):  # batches keep memory small and the draw deterministic
        scenes += make_batch([*stream, start], min(64, n - start), size, n_objects, **extra)
    return scenes


def score(predict: Callable[[np.ndarray], np.ndarray], scenes, n_classes: int):
    from napari_maskclip.evaluate import confusion_matrix, scores_from_confusion

    cm = np.zeros((n_classes, n_classes + 1), dtype=np.int64)
    for scene in scenes:
        cm += confusion_matrix(predict(scene.image), scene.mask, n_classes, ignore_index=None)
    return scores_from_confusion(cm, n_images=len(scenes))


def refinement_table(teacher, classes, background, scenes, n_classes, quiet=False):
    """Table g: mIoU of every mode x refinement; each scene encoded once per mode."""
    table: dict[str, dict[str, float]] = {}
    for mode in REFINED_MODES:
        features = [teacher.encode(scene.image, mode=mode) for scene in scenes]
        table[mode] = {}
        for name, refinement in REFINEMENTS.items():
            it = iter(features)

            def predict(image, refinement=refinement):
                return teacher.segment(next(it), classes, background=background, mode=mode,
                                       denoise=False, **refinement).labels
            table[mode][name] = round(100 * score(predict, scenes, n_classes).miou, 2)
            if not quiet:
                print(f"  g) {mode} {name}: {table[mode][name]:.1f}", file=sys.stderr)
    return table


#: Table h: CorrCLIP's restriction of the last block's attention to within-superpixel patches
#: (encode-time), on the modes whose last block mixes patches; the same superpixels as table g.
ATTENTION_MODES = ("sclip", "clearclip", "naclip")
ATTENTION_REGIONS = {"attention_regions": "felzenszwalb", "felzenszwalb_scale": 50.0,
                     "felzenszwalb_min_size": 50}


def attention_table(teacher, classes, background, scenes, n_classes, quiet=False):
    """Table h: mIoU with the attention restricted to superpixels, alone and with region voting
    (on the same superpixels); each scene encoded once per mode."""
    table: dict[str, dict[str, float]] = {}
    for mode in ATTENTION_MODES:
        features = [teacher.encode(scene.image, mode=mode, **ATTENTION_REGIONS)
                    for scene in scenes]
        table[mode] = {}
        for name, refinement in (("restricted", {}),
                                 ("restricted+regions", REFINEMENTS["regions"])):
            it = iter(features)

            def predict(image, refinement=refinement):
                return teacher.segment(next(it), classes, background=background, mode=mode,
                                       denoise=False, **{**ATTENTION_REGIONS, **refinement}).labels
            table[mode][name] = round(100 * score(predict, scenes, n_classes).miou, 2)
            if not quiet:
                print(f"  h) {mode} {name}: {table[mode][name]:.1f}", file=sys.stderr)
    return table


def train_student(teacher, classes, background, scenes, args) -> tuple[Any, dict[str, Any]]:
    """A MaskCLIP+ student trained on the teacher's online pseudo-labels of unlabeled scenes."""
    from napari_maskclip.progress import run_to_completion
    from napari_maskclip.student import TrainingData, train_iter

    images = [s.image for s in scenes]
    masks = [np.zeros(s.mask.shape, dtype=np.uint8) for s in scenes]
    nobody = [np.zeros(s.mask.shape, dtype=bool) for s in scenes]  # no pixel labelled by a person
    data = TrainingData.from_arrays(images, masks, classes, background=background, trusted=nobody)
    size = scenes[0].image.shape[0]
    start = time.perf_counter()
    last: dict[str, Any] = {}

    def report(step) -> None:
        if step.stage == "train" and step.info.get("loss") is not None:
            last.update(step.info, it=step.done, total=step.total)
            if not args.quiet and (step.done % max(1, step.total // 10) == 0):
                print(f"  student it {step.done}/{step.total} loss {step.info['loss']:.3f} "
                      f"({step.info.get('stage')})", file=sys.stderr)

    result = run_to_completion(
        train_iter(
            data, args.save_student, teacher=teacher, overwrite=True, device=args.device, text_cache=None,
            precision=args.precision,
            iterations=args.student_iterations, backbone=args.student_backbone,
            backbone_weights="random", batch_size=args.student_batch, crop_size=size,
            scale_min=args.student_scale[0], scale_max=args.student_scale[1], val_fraction=0.0, val_interval=0, save_interval=0,
            lr=args.student_lr, self_train_fraction=args.self_train_fraction,
            normalize_features=True, confidence_threshold=args.confidence_threshold, seed=0,
        ),
        report,
    )
    info = {"seconds": time.perf_counter() - start, "iterations": last.get("it"),
            "final_loss": last.get("loss"), "train_scenes": len(scenes),
            "backbone": args.student_backbone}
    return result.segmenter(args.device, args.precision), info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small version (under a minute)")
    parser.add_argument("--model-dir", default=None, help="toy model folder (default: the demo model)")
    parser.add_argument("--n-eval", type=int, default=None, help="held-out scenes (default 300; quick 24)")
    parser.add_argument("--n-train", type=int, default=None, help="unlabeled student scenes (default 2000)")
    parser.add_argument("--student-iterations", type=int, default=None)
    parser.add_argument("--student-backbone", default="tiny")
    parser.add_argument("--student-batch", type=int, default=16)
    parser.add_argument("--student-lr", type=float, default=0.02)
    parser.add_argument("--student-scale", type=float, nargs=2, default=(1.0, 1.0),
                        metavar=("MIN", "MAX"),
                        help="random rescaling of the student's crops (default none: the toy "
                        "CLIP knows one object scale, and its pseudo-labels of rescaled crops "
                        "are worse; 0.75-1.5 gave 26.4 vs 27.8 mIoU on 100 scenes)")
    parser.add_argument("--self-train-fraction", type=float, default=1.0,
                        help="share of the schedule trained on the teacher's labels before the "
                        "student's own predictions take over (paper: 0.1 with ImageNet backbones; "
                        "here 1.0, no self-training: a student from random weights that trained "
                        "on its own predictions from mid-schedule lost the foreground classes, "
                        "14 vs 20 mIoU with 2000 iterations)")
    parser.add_argument("--student-teacher", default="maskclip", choices=sorted(READOUTS),
                        help="the read-out whose pseudo-labels teach the student (default b)")
    parser.add_argument("--save-student", default=None, metavar="PATH",
                        help="also save the trained student (.safetensors), e.g. to ship it")
    parser.add_argument("--student-checkpoint", default=None, metavar="PATH",
                        help="score this trained student instead of training one")
    parser.add_argument("--confidence-threshold", type=float, default=None,
                        help="ignore teacher pixels whose winning probability is below this")
    parser.add_argument("--device", default="cpu", help="cpu (the reference) or cuda")
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                        help="precision of every row (default fp32, the reference)")
    parser.add_argument("--compare-precision", default="bf16", choices=["bf16", "fp16", "none"],
                        help="also read b and the best training-free read-out in this precision "
                        "(default bf16; the student is not rerun)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--skip-student", action="store_true",
                        help="no student row (f): the training-free read-outs only")
    parser.add_argument("--attention-only", action="store_true",
                        help="only table h (attention restricted to superpixels); last line "
                        "{attention_regions, attention_table}")
    parser.add_argument("--skip-refinements", action="store_true",
                        help="no refinement table (g)")
    args = parser.parse_args()
    args.n_eval = args.n_eval or (24 if args.quick else 300)
    args.n_train = args.n_train or (64 if args.quick else 2000)
    args.student_iterations = args.student_iterations or (60 if args.quick else 4000)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("NAPARI_MASKCLIP_CACHE_DIR", tempfile.mkdtemp(prefix="maskclip-quality-"))
    from napari_maskclip.engine import Segmenter, TextEmbeddingCache, load_clip

    config, weights, vocab = model_files(args.model_dir)
    if args.model_dir is None:  # by name, so a saved student records its teacher as "demo"
        loaded = load_clip("demo", None, device=args.device, precision=args.precision)
    else:
        loaded = load_clip(str(config), str(weights), device=args.device, precision=args.precision)
    classes = list(vocab["class_names"])
    background = "; ".join(vocab.get("background_names", ["background"]))
    templates = tuple(vocab.get("templates", ["a photo of a {}."]))
    kwargs = scene_kwargs(vocab)
    eval_scenes = make_scenes(EVAL_STREAM, args.n_eval, kwargs)
    n_classes = len(classes) + 1
    teacher = Segmenter(loaded, text_cache=TextEmbeddingCache(None), templates=templates,
                        short_side=vocab.get("eval_short_side"), precision=args.precision)

    if args.attention_only:
        t1 = time.perf_counter()
        attention = attention_table(teacher, classes, background, eval_scenes, n_classes, args.quiet)
        print(f"h) attention restricted to superpixels, {len(eval_scenes)} held-out scenes "
              f"({time.perf_counter() - t1:.0f}s; {ATTENTION_REGIONS})")
        print("| mode | restricted | restricted+regions |\n|---|---|---|")
        for mode, row in attention.items():
            print(f"| {mode} | {row['restricted']:.1f} | {row['restricted+regions']:.1f} |")
        print(json.dumps({"attention_regions": attention["naclip"]["restricted"],
                          "attention_table": attention}))
        return 0
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for key, overrides in READOUTS.items():
        def predict(image, overrides=overrides):
            return teacher(image, classes, background=background, **overrides).labels
        results[key] = score(predict, eval_scenes, n_classes)
    teacher_seconds = time.perf_counter() - t0
    table = None
    if not args.skip_refinements:
        t1 = time.perf_counter()
        table = refinement_table(teacher, classes, background, eval_scenes, n_classes, args.quiet)
        refine_seconds = time.perf_counter() - t1
        t1 = time.perf_counter()
        attention = attention_table(teacher, classes, background, eval_scenes, n_classes,
                                    args.quiet)
        attention_seconds = time.perf_counter() - t1
    compare: dict[str, Any] = {}
    if args.compare_precision != "none":
        # b, and the best training-free read-out (a is the naive baseline), in the other precision.
        best = max((k for k in READOUTS if k not in ("naive", "maskclip")), key=lambda k: results[k].miou)
        t1 = time.perf_counter()
        for key in ("maskclip", best):
            def predict(image, overrides=READOUTS[key]):
                return teacher(image, classes, background=background, precision=args.compare_precision,
                               **overrides).labels
            compare[key] = score(predict, eval_scenes, n_classes)
        compare_seconds = time.perf_counter() - t1

    if args.skip_student:
        student, info = None, {}
    elif args.student_checkpoint:
        from napari_maskclip.student import StudentSegmenter

        student = StudentSegmenter(args.student_checkpoint, device=args.device,
                                   precision=args.precision)
        meta = student.checkpoint.meta
        info = {"seconds": 0.0, "iterations": meta.get("iteration"), "train_scenes": "its",
                "backbone": meta["settings"]["backbone"], "loaded": args.student_checkpoint}
    else:
        student_scenes = make_scenes(STUDENT_STREAM, args.n_train, kwargs)
        teacher_s = Segmenter(loaded, text_cache=TextEmbeddingCache(None), templates=templates,
                              short_side=vocab.get("eval_short_side"), precision=args.precision,
                              **READOUTS[args.student_teacher])
        student, info = train_student(teacher_s, classes, background, student_scenes, args)
    if student is not None:
        results["student"] = score(lambda image: student(image).labels, eval_scenes, n_classes)

    size = kwargs["size"]
    print(f"toy model {config.name} ({weights.name}), {len(eval_scenes)} held-out scenes "
          f"{size[0]}x{size[1]}, {kwargs['n_objects'][0]}-{kwargs['n_objects'][1]} objects, "
          f"{n_classes} classes incl. background ('{background}'), templates {list(templates)}")
    if student is None:
        print(f"student: skipped; teacher read-outs {teacher_seconds:.0f}s")
    elif info.get("loaded"):
        print(f"student: {info['backbone']}, {info['iterations']} iterations, loaded from "
              f"{info['loaded']}; teacher read-outs {teacher_seconds:.0f}s")
    else:
        print(f"student: {info['backbone']}, {info['iterations']} iterations on {info['train_scenes']} "
              f"unlabeled scenes, taught by read-out '{args.student_teacher}', "
              f"{info['seconds']:.0f}s; teacher read-outs {teacher_seconds:.0f}s")
    print("| read-out | mIoU | pixel acc. |\n|---|---|---|")
    teacher_letter = {"naive": "a", "maskclip": "b", "pd": "c", "ks": "d"}.get(args.student_teacher,
                                                                            args.student_teacher)
    for key, scores in results.items():
        label = LABELS[key].format(teacher=teacher_letter)
        print(f"| {label} | {100 * scores.miou:.1f} | {100 * scores.pixel_accuracy:.1f} |")
    reference = args.precision if args.precision != "auto" else loaded.precision
    for key, scores in compare.items():
        label = f"{LABELS[key]}, {args.compare_precision} (rows above: {reference})"
        print(f"| {label} | {100 * scores.miou:.1f} | {100 * scores.pixel_accuracy:.1f} |")
    miou = {key: round(100 * scores.miou, 2) for key, scores in results.items()}
    line = f"b - a = {miou['maskclip'] - miou['naive']:+.1f} mIoU points (bar: >= +10)"
    if "student" in miou:
        line += f"; f - b = {miou['student'] - miou['maskclip']:+.1f} (bar: >= +5)"
    print(line)
    if table is not None:
        print(f"\ng) query-time refinements (mIoU; {refine_seconds:.0f}s; regions: Felzenszwalb "
              f"superpixels, {REFINEMENTS['regions']})")
        print("| mode | " + " | ".join(REFINEMENTS) + " |\n|---|" + "---|" * len(REFINEMENTS))
        for mode, row in table.items():
            print(f"| {mode} | " + " | ".join(f"{row[name]:.1f}" for name in REFINEMENTS) + " |")
        best_name, best = max(((f"{mode}+{name}" if name != "plain" else mode, value)
                               for mode, row in table.items() for name, value in row.items()),
                              key=lambda item: item[1])
        miou.update(pamr=table["naclip"]["pamr"], regions=table["naclip"]["regions"],
                    best=best, best_name=best_name, table=table)
        print(f"best training-free: {best_name} {best:.1f} vs NACLIP {miou['naclip']:.1f}: "
              f"{best - miou['naclip']:+.1f} mIoU points (bar: >= +3)")
        print(f"\nh) attention restricted to superpixels (CorrCLIP; encode-time; mIoU; "
              f"{attention_seconds:.0f}s; {ATTENTION_REGIONS})")
        print("| mode | plain | restricted | regions | restricted+regions |\n|---|---|---|---|---|")
        for mode, row in attention.items():
            print(f"| {mode} | {table[mode]['plain']:.1f} | {row['restricted']:.1f} | "
                  f"{table[mode]['regions']:.1f} | {row['restricted+regions']:.1f} |")
        miou.update(attention_regions=attention["naclip"]["restricted"], attention_table=attention)
        h_name, h_best = max(((f"{mode}+attention-{name}", value) for mode, row in attention.items()
                              for name, value in row.items()), key=lambda item: item[1])
        if h_best > miou["best"]:  # training-free too (encode-time, no extra backbone)
            miou.update(best=h_best, best_name=h_name)
            print(f"best training-free overall: {h_name} {h_best:.1f} vs NACLIP "
                  f"{miou['naclip']:.1f}: {h_best - miou['naclip']:+.1f} mIoU points")
    for key, scores in compare.items():
        name = f"{key}_{args.compare_precision}"
        miou[name] = round(100 * scores.miou, 2)
        diff = 100 * (scores.miou - results[key].miou)
        print(f"{name} - {key} ({reference}) = {diff:+.2f} mIoU points (bar: within "
              f"+-{PRECISION_BAR}); pixel accuracy {100 * (scores.pixel_accuracy - results[key].pixel_accuracy):+.2f}; "
              f"{compare_seconds:.0f}s for the {args.compare_precision} rows, "
              f"{teacher_seconds:.0f}s for the {len(READOUTS)} {reference} rows")
    print(json.dumps(miou))
    return 0


if __name__ == "__main__":
    sys.exit(main())
