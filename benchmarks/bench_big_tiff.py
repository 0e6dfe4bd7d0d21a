"""Big TIFF benchmark: ``napari-maskclip segment BIG.tif --out FOLDER`` with the demo model.

Builds a synthetic RGB TIFF of each size (tiled synthetic scenes, on disk in a temporary folder)
and runs the CLI on it in a fresh process, as a user would (progress bar on, confidence on), and
reports per size: wall seconds, peak resident memory (``ru_maxrss`` of the child), the sliding
windows the engine used, and where the time went, read from the progress bar's own updates
(timestamped as they arrive on stderr): before the first report (start-up), the ``read``
(reading the image, then loading the model), ``encode``, ``segment`` and ``write`` (the result
files) stages, and after the last report (exit). ``eta`` is the share of the bar's updates
within a stage that showed a remaining time (``<00:12``, not ``<?``).

The path: ``--out FOLDER`` is the per-image batch (``segment_batch`` / ``batch.result_task``),
not the huge-image tiles (``--out OUT.zarr``, :mod:`napari_maskclip.huge`). The image is read
whole (3 bytes a pixel), the engine switches to sliding windows (the demo model: 128-px windows
every 64 px, 62,001 windows at 16000x16000) and the confidence maps, too large to hold, go to a
temporary raw file in row blocks and are compressed into the TIFF at the end (``write``). Time
grows with the windows, so with the pixels. Memory does not grow alike at every size: features up
to the engine's ``STREAM_BYTES`` (1 GiB: about 8000x8000 px with the demo model) are kept for a
re-query (16 bytes a pixel; 24 more measured at 4000x4000); a larger image (16000x16000) is
streamed, window by window. Compare sizes within one run: the machine is shared, so only the
ratios mean something.

Prints a table, then one JSON object as the last line.

    python benchmarks/bench_big_tiff.py [--sizes 2000 4000 8000] [--classes "a, b"]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CLASSES = "red circle, green square, blue triangle, yellow star"
#: tqdm's "[elapsed<remaining, rate]": the remaining time, or "?" when it has none.
_REMAINING = re.compile(r"\[[\d:]+<([\d:]+|\?)")
#: The stage in the bar's description ("big.tif encode: ...").
_STAGE = re.compile(r"^big\.tif (\w+):")
_TOTAL = re.compile(r"\| *(\d+)/(\d+) \[")


def _write_tiff(path: Path, size: int) -> None:
    """A size x size RGB TIFF of synthetic scenes, written tile row by tile row (never the whole
    image in this process)."""
    import numpy as np
    import tifffile

    from napari_maskclip.synthetic import make_scene

    tile = 512
    scenes = [make_scene(seed=k, size=(tile, tile)).image for k in range(4)]

    def tiles():
        for ty in range(-(-size // tile)):
            for tx in range(-(-size // tile)):
                yield scenes[(ty * 3 + tx) % 4]

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb")


class _Timeline:
    """The progress bar's updates, timestamped as they arrive on the child's stderr."""

    def __init__(self, stream, start: float) -> None:
        self.start, self.updates, self.other = start, [], []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        pending = ""
        while True:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            now = time.perf_counter() - self.start
            pending += chunk.decode("utf-8", "replace")
            *pieces, pending = re.split(r"[\r\n]", pending)
            for piece in pieces:
                piece = piece.strip()
                if _STAGE.match(piece):
                    self.updates.append((now, piece))
                elif piece:
                    self.other.append(piece)

    def join(self) -> None:
        self._thread.join()

    def stage_spans(self) -> dict[str, list[float]]:
        """Each stage from its first report to the next stage's first (the last stage: to its
        last report). ``read`` so includes loading the model, which follows the reading."""
        firsts: dict[str, float] = {}
        for t, piece in self.updates:
            firsts.setdefault(_STAGE.match(piece).group(1), t)
        stages = list(firsts)
        ends = [firsts[s] for s in stages[1:]] + [self.updates[-1][0]] if stages else []
        return {stage: [firsts[stage], end] for stage, end in zip(stages, ends)}

    def windows(self) -> int:
        """The encode stage's total (the sliding windows)."""
        totals = [int(m.group(2)) for _, p in self.updates
                  if _STAGE.match(p).group(1) == "encode" and (m := _TOTAL.search(p))]
        return max(totals, default=0)

    def eta_share(self) -> float:
        """Of the updates with a total and something done, those that show a remaining time."""
        counted = shown = 0
        for _, piece in self.updates:
            total = _TOTAL.search(piece)
            remaining = _REMAINING.search(piece)
            if total and remaining and 0 < int(total.group(1)) < int(total.group(2)):
                counted += 1
                shown += remaining.group(1) != "?"
        return shown / counted if counted else 0.0


def _run(image: Path, out: Path, classes: str) -> dict:
    """One ``segment`` run in a fresh process: seconds, peak RSS and the timeline."""
    code = (
        "import resource, sys\n"
        "from napari_maskclip.cli import main\n"
        f"code = main(['segment', {str(image)!r}, '--classes', {classes!r}, '--model', 'demo',"
        f" '--device', 'cpu', '--precision', 'fp32', '--out', {str(out)!r}])\n"
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "COLUMNS": "120"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    timeline = _Timeline(proc.stderr, start)
    stdout = proc.stdout.read().decode()
    proc.wait()
    seconds = time.perf_counter() - start
    timeline.join()
    if proc.returncode != 0:
        raise SystemExit(f"segment failed ({proc.returncode}): {' | '.join(timeline.other[-3:])}")
    rss_kib = int(next(line.split()[1] for line in stdout.splitlines() if line.startswith("RSS")))
    spans = timeline.stage_spans()
    first = min((s[0] for s in spans.values()), default=seconds)
    last = max((s[1] for s in spans.values()), default=seconds)
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(rss_kib / 1024, 1),
        "windows": timeline.windows(),
        "before_first_report_s": round(first, 1),
        **{f"{stage}_s": round(b - a, 1) for stage, (a, b) in spans.items()},
        "after_last_report_s": round(seconds - last, 1),
        "eta_shown": round(timeline.eta_share(), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000, 8000])
    parser.add_argument("--classes", default=CLASSES)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in args.sizes:
            image = root / "big.tif"
            _write_tiff(image, size)
            row = {"size": size, "tiff_mib": round(image.stat().st_size / 2**20, 1),
                   **_run(image, root / f"out{size}", args.classes)}
            rows.append(row)
            image.unlink()
            for path in sorted((root / f"out{size}").iterdir()):
                path.unlink()
            print(f"{size}x{size}: " + ", ".join(f"{k} {v}" for k, v in row.items()
                                                 if k != "size"), flush=True)
    base = rows[0]
    for row in rows:
        pixels = (row["size"] / base["size"]) ** 2
        row["seconds_per_base_pixels"] = round(row["seconds"] / base["seconds"] / pixels, 2)
    stages = ["read", "encode", "segment", "write"]
    print(f"{'size':>6}{'seconds':>9}{'RSS MiB':>9}{'windows':>9}{'start':>7}"
          + "".join(f"{s:>9}" for s in stages) + f"{'exit':>6}{'eta':>6}{'s/px vs first':>15}")
    for r in rows:
        print(f"{r['size']:>6}{r['seconds']:>9}{r['peak_rss_mib']:>9}{r['windows']:>9}"
              f"{r['before_first_report_s']:>7}"
              + "".join(f"{r.get(s + '_s', '-'):>9}" for s in stages)
              + f"{r['after_last_report_s']:>6}{r['eta_shown']:>6}{r['seconds_per_base_pixels']:>15}")
    print(json.dumps({"classes": len(args.classes.split(",")), "runs": rows}))


if __name__ == "__main__":
    main()
