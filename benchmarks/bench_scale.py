"""Scaling-out benchmark: data-parallel student training under torchrun, batches on dask.

Sections are functions returning a dict of figures; the last line printed is one JSON object,
the merge of their dicts.

* :func:`ddp_section`: seconds per training step of the same global batch in 1 and in 2
  processes (``torchrun --standalone --nproc_per_node N``, gloo on the CPU), the demo CLIP as
  the online teacher on half of every crop's pixels; ``ddp_step_ratio`` = 2-process step time /
  1-process step time (ideal 0.5 with two free cores; above 1 means the communication and the
  processes' competition for cores cost more than the split saves). The first steps are warm-up.

* :func:`dask_section`: images/s of ``segment`` (``segment_folder``, demo model) on 1 and 2 local
  dask workers over ``--images`` synthetic ``--size``-px scenes, warm; ``dask_overhead`` = the
  1-worker time / the plain in-process loop's (target <= 1.15).

* :func:`huge_section`: seconds and peak RSS (client plus workers, and the largest process) of
  ``segment_large`` on a ``--huge-size``^2 RGB zarr (default 4096) with the demo model, on 1 and
  2 local dask workers (``huge_s_N``, ``huge_peak_rss_mib_N``, ``huge_max_process_rss_mib_N``).

    python benchmarks/bench_scale.py [--sections ddp,dask,huge] [--backbone tiny] [--batch 8]
        [--crop 128] [--iterations 6] [--threads 1] [--images 64] [--size 256]
        [--huge-size 4096] [--huge-chunk PX] [--quick]

Run on an idle machine: the ratio needs at least as many free cores as processes x threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

WARMUP = 2


# ---- data-parallel training (torchrun) -------------------------------------------------------
def _worker(args: argparse.Namespace) -> None:
    """One torchrun rank: train from in-memory synthetic data, rank 0 writes its step times."""
    import numpy as np
    import torch

    from napari_maskclip.student import TrainingData, TrainSettings, train_iter
    from napari_maskclip.student import distributed
    from napari_maskclip.synthetic import CLASS_NAMES, make_scene

    torch.set_num_threads(args.threads)
    ranks = distributed.start(torch.device("cpu"))
    try:
        scenes = [make_scene(i, size=(192, 192), n_objects=(1, 3)) for i in range(8)]
        trusted = []
        for scene in scenes:  # a person labelled the left half; the teacher labels the rest
            edited = np.zeros(scene.mask.shape, bool)
            edited[:, : scene.mask.shape[1] // 2] = True
            trusted.append(edited)
        data = TrainingData.from_arrays([s.image for s in scenes], [s.mask for s in scenes],
                                        list(CLASS_NAMES), trusted=trusted)
        settings = TrainSettings(iterations=WARMUP + args.iterations, batch_size=args.batch,
                                 crop_size=args.crop, backbone=args.backbone,
                                 backbone_weights="random", val_fraction=0.0, val_interval=0,
                                 save_interval=0, self_train_fraction=1.0, frozen_batch_norm=True)
        times, last = [], None
        for step in train_iter(data, None, settings=settings, teacher="demo", device="cpu",
                               text_cache=None):
            if step.stage != "train":
                continue
            now = time.perf_counter()
            if last is not None and step.done > WARMUP:
                times.append(now - last)
            last = now
        if ranks.main:
            Path(args.worker_out).write_text(json.dumps({"step_s": times}))
    finally:
        distributed.stop()


def _run_ranks(nproc: int, args: argparse.Namespace, folder: Path) -> float:
    """Median seconds per step with ``nproc`` processes."""
    out = folder / f"ddp{nproc}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(Path(__file__).resolve()), "--worker-out", str(out),
               "--backbone", args.backbone, "--batch", str(args.batch), "--crop", str(args.crop),
               "--iterations", str(args.iterations), "--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"torchrun with {nproc} process(es) failed:\n{done.stderr[-3000:]}")
    return statistics.median(json.loads(out.read_text())["step_s"])


def ddp_section(args: argparse.Namespace) -> dict[str, Any]:
    """Step time of 1 vs 2 torchrun processes on the same global batch."""
    with tempfile.TemporaryDirectory() as tmp:
        one = _run_ranks(1, args, Path(tmp))
        two = _run_ranks(2, args, Path(tmp))
    print(f"training, {args.backbone} backbone, global batch {args.batch} x {args.crop}^2 px, "
          f"{args.threads} thread(s) per process, teacher on half the pixels:")
    print(f"  1 process   {one * 1000:8.1f} ms/step")
    print(f"  2 processes {two * 1000:8.1f} ms/step   ratio {two / one:.2f} (ideal 0.5)")
    return {"ddp_step_s_1": one, "ddp_step_s_2": two, "ddp_step_ratio": two / one,
            "ddp_backbone": args.backbone, "ddp_batch": args.batch, "ddp_crop": args.crop,
            "ddp_threads": args.threads}


# ---- batches on dask.distributed -------------------------------------------------------------


def dask_section(args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of ``segment_folder`` on 1 and 2 local dask workers, and the 1-worker path's
    time over the plain in-process loop (``dask_overhead``). Models are loaded and the cluster
    started before the clock runs (a warm-up batch), so this is the steady streaming rate."""
    import imageio.v3 as iio

    from napari_maskclip.distributed import open_client
    from napari_maskclip.segment_batch import segment_folder
    from napari_maskclip.synthetic import make_scene

    classes = "red circle, green square, blue triangle"
    options = dict(classes=classes, model="demo", device="cpu", precision="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        images = []
        for i in range(args.images):
            path = root / "images" / f"scene{i:03d}.png"
            iio.imwrite(path, make_scene(seed=i, size=(args.size, args.size)).image)
            images.append(path)

        def timed(out: str, **where: Any) -> float:
            segment_folder(images[:4], root / f"warm-{out}", **options, **where)
            start = time.perf_counter()
            summary = segment_folder(images, root / out, **options, **where)
            seconds = time.perf_counter() - start
            assert summary.ok and len(summary.done) == len(images), summary
            return seconds

        plain = timed("plain")
        per_workers = {}
        for workers in (1, 2):
            with open_client(workers=workers) as client:
                per_workers[workers] = timed(f"dask{workers}", client=client)
    n = len(images)
    print(f"segment, demo model, {n} synthetic {args.size}x{args.size} images, warm:")
    print(f"  plain loop     {n / plain:7.2f} images/s")
    for workers, seconds in per_workers.items():
        print(f"  dask {workers} worker(s) {n / seconds:7.2f} images/s")
    print(f"  dask overhead (1 worker / plain) {per_workers[1] / plain:.2f} (target <= 1.15)")
    return {"images_per_s_plain": n / plain, "images_per_s_1": n / per_workers[1],
            "images_per_s_2": n / per_workers[2], "dask_overhead": per_workers[1] / plain,
            "dask_images": n, "dask_size": args.size}


# ---- huge images (segment --out OUT.zarr) -----------------------------------------------------
class _PeakRss:
    """Peak resident memory of this process plus all its children (dask workers), summed, and
    the largest single process, sampled every 50 ms."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.me = psutil.Process()
        self.total = self.single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            sizes = []
            for proc in [self.me, *self.me.children(recursive=True)]:
                try:
                    sizes.append(proc.memory_info().rss)
                except psutil.Error:
                    continue
            self.total = max(self.total, sum(sizes))
            self.single = max(self.single, max(sizes, default=0))
            self._stop.wait(0.05)

    def __enter__(self) -> "_PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def huge_section(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds and peak RSS of ``segment_large`` (demo model, default windows) on a
    ``--huge-size``^2 RGB zarr, on 1 and 2 local dask workers (cluster started before the
    clock; the model loads inside the timed run, once per worker)."""
    import zarr

    from napari_maskclip.distributed import open_client
    from napari_maskclip.huge import segment_large
    from napari_maskclip.progress import run_to_completion
    from napari_maskclip.synthetic import make_scene

    size = args.huge_size
    classes = "red circle, green square, blue triangle"
    figures: dict[str, Any] = {"huge_size": size}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = zarr.open_array(str(root / "big.zarr"), mode="w", shape=(size, size, 3),
                                 chunks=(512, 512, 3), dtype="uint8")
        for y in range(0, size, 512):  # written block by block: never the whole image in memory
            for x in range(0, size, 512):
                block = make_scene(seed=(y, x), size=(512, 512), n_objects=(2, 4)).image
                source[y:y + 512, x:x + 512] = block[:min(512, size - y), :min(512, size - x)]
        for workers in (1, 2):
            with open_client(workers=workers) as client:
                with _PeakRss() as rss:
                    start = time.perf_counter()
                    result = run_to_completion(segment_large(
                        root / "big.zarr", root / f"out{workers}.zarr", classes=classes,
                        model="demo", device="cpu", precision="fp32", client=client,
                        chunk=args.huge_chunk))
                    seconds = time.perf_counter() - start
            chunk = zarr.open_array(str(root / f"out{workers}.zarr" / "labels"), mode="r").chunks
            print(f"huge image {size}x{size} px, {result.tiles} tiles of {chunk[0]}x{chunk[1]}, "
                  f"{workers} worker(s): {seconds:7.1f} s, {size * size / seconds / 1e6:.2f} Mpx/s, "
                  f"peak RSS {rss.total / 2**20:.0f} MiB (client + workers), "
                  f"largest process {rss.single / 2**20:.0f} MiB")
            figures.update({f"huge_s_{workers}": seconds,
                            f"huge_peak_rss_mib_{workers}": rss.total / 2**20,
                            f"huge_max_process_rss_mib_{workers}": rss.single / 2**20,
                            "huge_tiles": result.tiles, "huge_chunk": chunk[0]})
    image_mib = size * size * 3 / 2**20
    print(f"  (the image is {image_mib:.0f} MiB as uint8, {image_mib * 4:.0f} MiB as float32; "
          f"its float32 confidence would be {3 * size * size * 4 / 2**20:.0f} MiB)")
    return figures


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "ddp": ddp_section, "dask": dask_section, "huge": huge_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--batch", type=int, default=8, help="global batch (crops per step)")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=6, help="timed steps (after warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--images", type=int, default=64, help="dask: images in the batch")
    parser.add_argument("--size", type=int, default=256, help="dask: image side in pixels")
    parser.add_argument("--huge-size", type=int, default=4096, help="huge: image side in pixels")
    parser.add_argument("--huge-chunk", type=int, default=None, help="huge: tile size (default: "
                        "the library's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.crop, args.iterations, args.images, args.size = 4, 64, 2, 8, 96
        args.huge_size = 1024
    if args.worker_out:
        _worker(args)
        return
    figures: dict[str, Any] = {}
    for name in args.sections.split(","):
        figures.update(SECTIONS[name](args))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
