"""Student benchmark: MaskCLIP+ training speed at 320x320 crops, and prediction speed.

Measures, through the real training generator (augmentation, forward, loss, backward, SGD step):

* ``exact``: steps on exactly labelled crops (no teacher): also the cost of a self-training
  step, which reuses the student's own forward pass;
* ``teacher``: steps whose crops are all unlabelled, so the frozen MaskCLIP teacher (ViT-B-16's
  real architecture, random weights: no download) labels every crop online;
* ``predict``: seconds to segment one 1024x1024 image with the trained student (whole image).

Each row runs in one precision (``--precisions fp32,bf16``): the student under autocast (loss and
optimiser fp32) and the teacher's encoders in the same precision. bf16 is fast only on CPUs with
native bf16 (AVX512-BF16 or AMX); elsewhere it is emulated, and ``auto`` picks fp32.

Backbone weights are random (speed does not depend on them; nothing is downloaded). Prints a
table, then one JSON object as the last line.

    python benchmarks/bench_student.py [--backbones mobilenet_v3_large,resnet50] [--batch 4]
        [--crop 320] [--iterations 6] [--threads N] [--precisions fp32,bf16] [--no-teacher]
        [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from napari_maskclip.student import StudentSegmenter, TrainingData, TrainSettings, train_iter

CLASSES = ["red", "green", "blue"]


def make_data(n: int, size: int, trusted: bool, seed: int = 0) -> TrainingData:
    """Random images with blocky random labels (speed does not depend on content)."""
    rng = np.random.default_rng(seed)
    images = [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(n)]
    masks = [np.kron(rng.integers(0, 4, (size // 32, size // 32)), np.ones((32, 32))).astype(np.uint8)
             for _ in range(n)]
    edited = None if trusted else [np.zeros((size, size), dtype=bool) for _ in range(n)]
    return TrainingData.from_arrays(images, masks, CLASSES, trusted=edited)


def step_times(data: TrainingData, settings: TrainSettings, warmup: int, **kwargs) -> tuple[list[float], object]:
    """Wall time of each training step after ``warmup`` steps (from the generator's reports)."""
    gen = train_iter(data, None, settings=settings, device="cpu", text_cache=None, **kwargs)
    times: list[float] = []
    last = None
    result = None
    while True:
        try:
            step = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        if step.stage != "train":
            continue
        now = time.perf_counter()
        if last is not None and step.done > warmup:
            times.append(now - last)
        last = now
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="mobilenet_v3_large")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--iterations", type=int, default=6, help="timed steps (after 2 warm-up)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precisions", default="fp32",
                        help="comma-separated: fp32, bf16 (auto: this CPU's choice)")
    parser.add_argument("--no-teacher", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.crop, args.iterations, args.batch = 64, 2, 2
    warmup = 2
    rows = []
    image_size = max(512, args.crop)
    exact = make_data(6, image_size, trusted=True)
    unlabelled = make_data(6, image_size, trusted=False)
    teacher = None
    if not args.no_teacher:
        from napari_maskclip.engine import Segmenter, load_clip

        teacher = Segmenter(load_clip("ViT-B-16", "random", device="cpu"), templates="single",
                            text_cache=None)
    for backbone, precision in [(b, p) for b in args.backbones.split(",")
                                for p in args.precisions.split(",")]:
        settings = TrainSettings(iterations=warmup + args.iterations, batch_size=args.batch,
                                 crop_size=args.crop, backbone=backbone, backbone_weights="random",
                                 val_fraction=0.0, val_interval=0, save_interval=0,
                                 self_train_fraction=1.0)
        emb = torch.nn.functional.normalize(torch.randn(len(CLASSES) + 1, 512), dim=-1)
        times, result = step_times(exact, settings, warmup, class_embeddings=emb, precision=precision)
        row = {"backbone": backbone, "precision": result.meta["precision"], "batch": args.batch,
               "crop": args.crop,
               "exact_s_per_it": statistics.median(times),
               "exact_it_per_s": 1.0 / statistics.median(times)}
        if teacher is not None:
            t_times, _ = step_times(unlabelled, settings, warmup, teacher=teacher,
                                    class_embeddings=emb, precision=precision)
            row["teacher_s_per_it"] = statistics.median(t_times)
            row["teacher_it_per_s"] = 1.0 / statistics.median(t_times)
        seg = StudentSegmenter(_checkpoint_of(result), device="cpu", precision=precision)
        image = (np.random.default_rng(1).random((1024, 1024, 3)) * 255).astype(np.uint8)
        seg(image)  # warm-up
        start = time.perf_counter()
        seg(image)
        row["predict_1024_s"] = time.perf_counter() - start
        rows.append(row)

    print(f"MaskCLIP+ student on the CPU ({torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}); batch {args.batch}, crops {args.crop}x{args.crop}")
    print(f"{'backbone':<20} {'precision':>9} {'exact it/s':>11} {'teacher it/s':>13} "
          f"{'predict 1024^2 s':>17}")
    for row in rows:
        teacher_rate = f"{row['teacher_it_per_s']:.3f}" if "teacher_it_per_s" in row else "-"
        print(f"{row['backbone']:<20} {row['precision']:>9} {row['exact_it_per_s']:>11.3f} "
              f"{teacher_rate:>13} {row['predict_1024_s']:>17.2f}")
    from napari_maskclip.engine.precision import cpu_has_native_bf16

    print(json.dumps({"threads": torch.get_num_threads(), "loadavg": os.getloadavg()[0],
                      "cpu_has_bf16": cpu_has_native_bf16(),
                      "teacher": "ViT-B-16 (random weights)" if teacher is not None else None,
                      "rows": rows}))


def _checkpoint_of(result):
    from napari_maskclip.student.checkpoint import StudentCheckpoint

    state = {k: v.detach().cpu() for k, v in result.net.state_dict().items()}
    return StudentCheckpoint(result.meta, state)


if __name__ == "__main__":
    main()
