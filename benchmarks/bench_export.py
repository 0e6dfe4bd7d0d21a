"""Export/import benchmark: time per image while a dataset grows, one batch session vs per-image.

Writes N small images (64x64 RGB, 3 classes, marked edited as an import does) into a dataset:

* ``batch``: one :class:`~napari_maskclip.export.ExportSession` for all N (how ``import`` and the
  CLI ``export`` of many inputs write): one lock, one index read, dataset.json about once a second;
* ``per-image``: one :func:`~napari_maskclip.export.export_sample` per image (how they wrote
  before; still the path of a single export): each locks, reads and rewrites dataset.json. Its
  first 100 images go into an empty dataset and its last 100 into one already holding N - 100
  samples (filled by a batch session, the same dataset state), so the quadratic middle is skipped;
* ``import``: ``import_plan`` of an images + masks folder of N PNG pairs, end to end (reading and
  checking every file too), total seconds.

Prints a table, then one JSON object as the last line.

    python benchmarks/bench_export.py [--n 2000] [--size 64] [--no-import]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_maskclip.export import ExportSession, export_sample, read_dataset

CLASSES = "red, green, blue"


def arrays(i: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    labels = np.kron(rng.integers(0, 4, (size // 16, size // 16)), np.ones((16, 16))).astype(np.uint8)
    return image, labels


def per_image_s(times: list[float]) -> float:
    return sum(times) / len(times)


def bench_batch(root: Path, n: int, size: int) -> tuple[list[float], int]:
    times = []
    names = [f"img{i:06d}" for i in range(n)]
    with ExportSession(root) as session:
        session.expect(names)
        for i, name in enumerate(names):
            image, labels = arrays(i, size)
            start = time.perf_counter()
            session.export(name, image, labels, CLASSES, edited=True)
            times.append(time.perf_counter() - start)
    commits = session.commits
    start = time.perf_counter()
    assert len(read_dataset(root, check_files=False)) == n
    return times, commits


def bench_per_image(root: Path, n: int, size: int, k: int) -> tuple[list[float], list[float]]:
    def one(i: int) -> float:
        image, labels = arrays(i, size)
        start = time.perf_counter()
        export_sample(root, f"img{i:06d}", image, labels, CLASSES, edited=True)
        return time.perf_counter() - start

    first = [one(i) for i in range(k)]
    with ExportSession(root) as session:  # the middle, fast: the same dataset state
        for i in range(k, n - k):
            session.export(f"img{i:06d}", *arrays(i, size), CLASSES, edited=True)
    last = [one(i) for i in range(n - k, n)]
    assert len(read_dataset(root, check_files=False)) == n
    return first, last


def bench_import(tmp: Path, n: int, size: int) -> float:
    from PIL import Image

    from napari_maskclip.export.import_folders import plan_mask_folder
    from napari_maskclip.export.importing import class_list, import_plan

    images, masks = tmp / "src_images", tmp / "src_masks"
    images.mkdir()
    masks.mkdir()
    for i in range(n):
        image, labels = arrays(i, size)
        Image.fromarray(image).save(images / f"img{i:06d}.png", compress_level=1)
        Image.fromarray(labels).save(masks / f"img{i:06d}.png", compress_level=1)
    start = time.perf_counter()
    plan = plan_mask_folder(images, masks, class_list(CLASSES))
    report = import_plan(plan, tmp / "imported")
    seconds = time.perf_counter() - start
    assert len(report.samples) == n, report.notes()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images (default 2000)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--k", type=int, default=100, help="first/last images timed (default 100)")
    parser.add_argument("--no-import", action="store_true", help="skip the end-to-end import")
    args = parser.parse_args()
    n, k, size = args.n, min(args.k, args.n // 2), args.size
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        batch, commits = bench_batch(tmp / "batch", n, size)
        old_first, old_last = bench_per_image(tmp / "per_image", n, size, k)
        import_s = None if args.no_import else bench_import(tmp, n, size)
    result = {
        "n": n,
        "size": size,
        "batch_first_s": round(per_image_s(batch[:k]), 5),
        "batch_last_s": round(per_image_s(batch[-k:]), 5),
        "batch_total_s": round(sum(batch), 2),
        "batch_commits": commits,
        "per_image_first_s": round(per_image_s(old_first), 5),
        "per_image_last_s": round(per_image_s(old_last), 5),
        "last_speedup": round(per_image_s(old_last) / per_image_s(batch[-k:]), 1),
        "batch_growth": round(per_image_s(batch[-k:]) / per_image_s(batch[:k]), 2),
        "import_total_s": None if import_s is None else round(import_s, 1),
    }
    print(f"{n} images of {size}x{size}, s per image, first {k} / last {k}:")
    print(f"| writer | first {k} | last {k} | last/first |")
    print("|---|---|---|---|")
    print(f"| one batch session ({commits} dataset.json commits) | {result['batch_first_s']:.4f} | "
          f"{result['batch_last_s']:.4f} | {result['batch_growth']:.2f}x |")
    print(f"| one export per image | {result['per_image_first_s']:.4f} | "
          f"{result['per_image_last_s']:.4f} | "
          f"{result['per_image_last_s'] / result['per_image_first_s']:.2f}x |")
    print(f"last {k}: the batch session is {result['last_speedup']}x faster per image")
    if import_s is not None:
        print(f"import of {n} image + mask PNG pairs (folders), end to end: {import_s:.1f} s "
              f"({import_s / n:.4f} s per image)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
