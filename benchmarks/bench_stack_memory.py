"""Stack memory benchmark: ``napari-maskclip segment`` on a z-stack holds one slice at a time.

Runs ``segment`` (the shipped demo model, 8 classes, confidence on) in fresh processes on a
1-slice and an N-slice RGB TIFF of synthetic scenes, and reports each run's peak resident memory
(``ru_maxrss`` of the child), the growth from 1 to N slices, and the size of the N-slice stack's
whole float32 confidence (what a run holding every slice would add). The target: the growth is
a small fraction of the whole confidence.

Prints a table, then one JSON object as the last line.

    python benchmarks/bench_stack_memory.py [--slices 40] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLASSES = ("red circle, green square, blue triangle, yellow star, black line, white dot, "
           "purple ring, grey box")


def _run(image: Path, out: Path) -> tuple[float, float]:
    """Peak RSS (MiB) and seconds of one ``segment`` run in a fresh process."""
    code = (
        "import resource, sys\n"
        "from napari_maskclip.cli import main\n"
        f"code = main(['segment', {str(image)!r}, '--classes', {CLASSES!r}, '--no-denoise',"
        f" '--model', 'demo', '--device', 'cpu', '--precision', 'fp32', '--out', {str(out)!r},"
        " '--quiet'])\n"
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"segment failed: {proc.stderr.strip()}")
    rss_kib = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("RSS")))
    return rss_kib / 1024, seconds


def main() -> None:
    import numpy as np
    import tifffile

    from napari_maskclip.synthetic import make_scene

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    n, size, classes = args.slices, args.size, len(CLASSES.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stack = np.stack([make_scene(seed=i, size=(size, size)).image for i in range(n)])
        tifffile.imwrite(root / "one.tif", stack[:1], photometric="rgb")
        tifffile.imwrite(root / "stack.tif", stack, photometric="rgb")
        del stack
        one_rss, one_s = _run(root / "one.tif", root / "out1")
        all_rss, all_s = _run(root / "stack.tif", root / "outn")
    whole = n * classes * size * size * 4 / 2**20
    growth = all_rss - one_rss
    rows = [("1 slice", one_rss, one_s), (f"{n} slices", all_rss, all_s)]
    print(f"{'run':<12}{'peak RSS MiB':>14}{'seconds':>10}")
    for name, rss, secs in rows:
        print(f"{name:<12}{rss:>14.1f}{secs:>10.1f}")
    print(f"growth {growth:.1f} MiB; the whole confidence of {n} slices is {whole:.1f} MiB")
    print(json.dumps({"slices": n, "size": size, "classes": classes,
                      "peak_rss_one_mib": round(one_rss, 1), "peak_rss_stack_mib": round(all_rss, 1),
                      "growth_mib": round(growth, 1), "whole_confidence_mib": round(whole, 1),
                      "growth_fraction": round(growth / whole, 3)}))


if __name__ == "__main__":
    main()
