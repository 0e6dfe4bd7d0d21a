"""Engine benchmark: MaskCLIP's costs, as ratios measured in one run (machines are noisy).

Uses ViT-B-16's real architecture with random weights (no download). Measures:

* dense_overhead: dense features vs plain ``encode_image`` at the same token count;
* requery: a cold run (image encoder + text encoder, empty caches) vs a re-query with cached
  image features and cached text, 10 classes on a 1024x1024 image;
* text_speedup: truncated vs full 77-token text encoding, 20 classes x 85 templates;
* peak_rss_gib: peak resident memory of segmenting a 4096x4096 image with sliding windows and
  key smoothing (in a fresh subprocess, so nothing else counts);
* refinements: on a 1024x1024 image with cached features, the seconds of a re-query with PAMR,
  with region voting on SLIC / Felzenszwalb superpixels (first query, which computes the
  superpixels, and a repeat, which reuses them), with TLP, with the majority region vote, each
  as a ratio to a plain re-query; the encode time of modes scclip, rfclip (``rfclip_global``
  window) and resclip vs naclip, and the re-query time of rfclip (whole image) and of resclip
  against naclip on 224/112 windows (ResCLIP's feedback reruns its last block and PAMR per
  window). ``--refinements`` runs only this part.

Prints a table, then one JSON object as the last line. ``--quick`` shrinks every size for a smoke
run (figures then mean little).

    python benchmarks/bench_engine.py [--quick] [--model ViT-B-16] [--threads N]

``--huge SIZE`` measures only the memory of a huge image instead: the peak resident memory of
``napari-maskclip segment`` (default settings, confidence maps on) on a SIZE x SIZE gray uint8
TIFF, in a fresh process. The model is a tiny random ViT (patch 32, native 256 px: 3844 windows
of 512 px at 16000^2, minutes on 2 cores) unless ``--huge-model demo`` (the shipped model:
62000 windows of 128 px, about half an hour on 2 cores). The target: under 4 GiB at 16000^2.

    python benchmarks/bench_engine.py --huge 16000 [--huge-model demo]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from napari_maskclip.engine import Segmenter, TextEmbeddingCache, load_clip
from napari_maskclip.engine.dense import dense_features
from napari_maskclip.engine.templates import maskclip_templates

CLASSES_10 = ["cat", "dog", "person", "car", "tree", "sky", "road", "building", "grass", "water"]
CLASSES_20 = CLASSES_10 + ["bird", "boat", "bottle", "chair", "cow", "horse", "sheep", "sofa",
                           "train", "tv monitor"]


def timed(fn, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_dense(loaded, batch: int, repeats: int) -> dict:
    size = loaded.native_size
    x = torch.randn(batch, 3, *size)
    with torch.no_grad():
        t_plain = timed(lambda: loaded.model.encode_image(x), repeats)
        t_dense = timed(lambda: dense_features(loaded.visual, x, "maskclip"), repeats)
    return {"plain_s": t_plain, "dense_s": t_dense, "dense_overhead": t_dense / t_plain,
            "tokens": (size[0] // loaded.patch_size) * (size[1] // loaded.patch_size), "batch": batch}


def bench_requery(loaded, size: int, classes: list[str]) -> dict:
    rng = np.random.default_rng(0)
    image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    seg = Segmenter(loaded, text_cache=TextEmbeddingCache(None))
    start = time.perf_counter()
    features = seg.encode(image)
    result = seg.segment(features, classes)
    cold = time.perf_counter() - start
    calls = seg.image_encoder_calls
    # Re-query: cached features (the Segmenter's cache) and cached text embeddings.
    requery_times = []
    for _ in range(3):
        start = time.perf_counter()
        feats = seg.encode(image)
        result = seg.segment(feats, classes)
        requery_times.append(time.perf_counter() - start)
    assert seg.image_encoder_calls == calls, "re-query ran the image encoder"
    requery = statistics.median(requery_times)
    return {"cold_s": cold, "requery_s": requery, "requery_speedup": cold / requery,
            "labels_shape": list(result.labels.shape)}


def bench_text(loaded, classes: list[str], repeats: int) -> dict:
    from napari_maskclip.engine.text import TextEncoder

    templates = maskclip_templates()
    prompts = [t.format(c) for c in classes for t in templates]
    encoder = TextEncoder(loaded, cache=None)
    t_trunc = timed(lambda: encoder.encode_prompts(prompts, truncate=True), repeats)
    tokens = loaded.tokenizer(prompts)

    def full():
        with torch.no_grad():
            for start in range(0, len(prompts), 256):
                loaded.model.encode_text(tokens[start:start + 256])

    t_full = timed(full, repeats)
    return {"prompts": len(prompts), "truncated_s": t_trunc, "full_s": t_full,
            "text_speedup": t_full / t_trunc}


def bench_refinements(loaded, size: int, classes: list[str]) -> dict:
    """Query-time refinements on cached features, against a plain re-query (seconds, ratio)."""
    rng = np.random.default_rng(1)
    image = (rng.random((size // 16, size // 16, 3)) * 255).astype(np.uint8)
    image = np.repeat(np.repeat(image, 16, axis=0), 16, axis=1)  # flat blocks: some structure
    seg = Segmenter(loaded, text_cache=TextEmbeddingCache(None), templates="single", denoise=False)
    out: dict = {}
    encoded = {}
    seg.encode(image[:64, :64], mode="naclip")  # warm-up: one-time costs stay out of the ratios
    for mode in ("naclip", "scclip", "rfclip", "resclip"):
        start, cpu = time.perf_counter(), time.process_time()  # CPU time: steadier under load
        encoded[mode] = seg.encode(image, mode=mode)
        out[f"encode_{mode}_s"] = time.perf_counter() - start
        out[f"encode_{mode}_cpu_s"] = time.process_time() - cpu
    # Their text-side read-out, text cached. ResCLIP's feedback is O(N^2.5) in a window's
    # patches (a whole 1024^2 image: 4096 patches, minutes), so it is timed on its preset's
    # 224/112 windows, against a plain naclip query of the same windows.
    seg.segment(encoded["rfclip"], classes, mode="rfclip")
    start = time.perf_counter()
    seg.segment(encoded["rfclip"], classes, mode="rfclip")
    out["query_rfclip_s"] = time.perf_counter() - start
    del encoded
    for mode in ("naclip", "resclip"):
        windows = seg.encode(image, mode=mode, window=224, stride=112)
        seg.segment(windows, classes, mode=mode)
        start, cpu = time.perf_counter(), time.process_time()
        seg.segment(windows, classes, mode=mode)
        out[f"windows_{mode}_s"] = time.perf_counter() - start
        out[f"windows_{mode}_cpu_s"] = time.process_time() - cpu
    out["windows"] = len(windows.windows)
    del windows
    features = seg.encode(image, mode="naclip")
    seg.segment(features, classes, mode="naclip")  # text now cached
    calls = seg.image_encoder_calls

    def query(**refinement) -> float:
        start = time.perf_counter()
        seg.segment(features, classes, mode="naclip", **refinement)
        return time.perf_counter() - start

    plain = statistics.median(query() for _ in range(3))
    out["plain_s"] = plain
    out["pamr_s"] = statistics.median(query(pamr=True) for _ in range(2))
    for method in ("slic", "felzenszwalb"):
        out[f"{method}_first_s"] = query(regions=method)
        out[f"{method}_s"] = query(regions=method)
    out["majority_s"] = query(regions="felzenszwalb", region_vote="majority")  # cached regions
    out["tlp_s"] = statistics.median(query(tlp=True) for _ in range(2))
    assert seg.image_encoder_calls == calls, "a refinement ran the image encoder"
    for key in ("pamr_s", "slic_first_s", "slic_s", "felzenszwalb_first_s", "felzenszwalb_s",
                "majority_s", "tlp_s", "query_rfclip_s"):
        out[key.replace("_s", "_ratio")] = out[key] / plain
    out["windows_resclip_ratio"] = out["windows_resclip_s"] / out["windows_naclip_s"]
    for mode in ("scclip", "rfclip", "resclip"):
        out[f"{mode}_encode_ratio"] = out[f"encode_{mode}_s"] / out["encode_naclip_s"]
        out[f"{mode}_encode_cpu_ratio"] = out[f"encode_{mode}_cpu_s"] / out["encode_naclip_cpu_s"]
    out["windows_resclip_cpu_ratio"] = out["windows_resclip_cpu_s"] / out["windows_naclip_cpu_s"]
    return out


_RSS_CHILD = """
import json, resource, sys, time
import numpy as np
from napari_maskclip.engine import Segmenter, TextEmbeddingCache, load_clip
model, size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import torch
torch.set_num_threads(threads)
loaded = load_clip(model, "random", device="cpu")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rng = np.random.default_rng(0)
image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
seg = Segmenter(loaded, text_cache=TextEmbeddingCache(None), key_smoothing=True,
                window=448, stride=224, templates="single")
start = time.perf_counter()
result = seg(image, "cat, dog, person, car, background")
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_kib": peak, "after_load_kib": base, "seconds": elapsed,
                  "windows": seg.image_encoder_calls, "shape": list(result.labels.shape)}))
"""


def bench_rss(model: str, size: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, model, str(size), str(threads)],
                          capture_output=True, text=True, check=True)
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["peak_rss_gib"] = data["peak_kib"] / 2**20
    data["after_load_gib"] = data["after_load_kib"] / 2**20
    return data


# A tiny random ViT whose windows are big and cheap: the huge-image measurement runs in minutes.
_HUGE_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 256, "layers": 1, "width": 32, "head_width": 16,
                   "patch_size": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

_HUGE_CHILD = """
import json, resource, sys, time
start = time.perf_counter()
from napari_maskclip.cli import main
code = main(sys.argv[1:])
print(json.dumps({"exit": code, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "seconds": time.perf_counter() - start}))
"""


def bench_huge(size: int, model: str, threads: int) -> dict:
    """Peak RSS of ``napari-maskclip segment`` on a ``size`` x ``size`` gray TIFF (see doc)."""
    import tifffile

    work = tempfile.mkdtemp(prefix="maskclip-huge-")
    image = os.path.join(work, f"gray{size}.tif")
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 256, (size // 50 + 1, size // 50 + 1)).astype(np.uint8)
    gray = np.repeat(np.repeat(cells, 50, axis=0), 50, axis=1)[:size, :size]
    tifffile.imwrite(image, gray, compression="zlib")
    del gray
    if model == "tiny":
        config = os.path.join(work, "tiny_huge.json")
        with open(config, "w") as handle:
            json.dump(_HUGE_CONFIG, handle)
        model_args = ["--model", config, "--pretrained", "random"]
    else:
        model_args = ["--model", model]
    argv = ["segment", image, "--classes", "red circle, blue square", "--background",
            "background", "--out", os.path.join(work, "out"), "--quiet", *model_args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", _HUGE_CHILD, *argv], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SystemExit(f"segment failed: {proc.stderr.strip()[-2000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    if data["exit"] != 0:
        raise SystemExit(f"segment failed: {proc.stderr.strip()[-2000:]}")
    data.update(size=size, model=model, image_mb=os.path.getsize(image) / 1e6,
                peak_rss_gib=data["peak_kib"] / 2**20, command=" ".join(["napari-maskclip", *argv]))
    out = os.path.join(work, "out")
    data["outputs"] = sorted(os.listdir(out))
    with tifffile.TiffFile(os.path.join(out, f"gray{size}_confidence.tif")) as tif:
        data["confidence_shape"] = list(tif.series[0].shape)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--refinements", action="store_true",
                        help="only the refinements' costs on a 1024x1024 image (a quick option)")
    parser.add_argument("--huge", type=int, default=None, metavar="SIZE",
                        help="only measure the peak RSS of segment on a SIZE x SIZE gray image")
    parser.add_argument("--huge-model", default="tiny", help="tiny (random, fast) or demo")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("NAPARI_MASKCLIP_CACHE_DIR", tempfile.mkdtemp(prefix="maskclip-bench-"))
    if args.huge:
        huge = bench_huge(args.huge, args.huge_model, args.threads)
        print(f"model {huge['model']}, {args.threads} threads, torch {torch.__version__}")
        print(f"command: {huge['command']}")
        print("| measure | result | target |\n|---|---|---|")
        print(f"| peak RSS, segment {huge['size']}^2 gray uint8 ({huge['image_mb']:.1f} MB TIFF), "
              f"default settings, {huge['seconds']:.0f}s | {huge['peak_rss_gib']:.2f} GiB | < 4 GiB |")
        print(f"outputs: {', '.join(huge['outputs'])}; confidence {huge['confidence_shape']}")
        print(json.dumps({"huge_size": huge["size"], "huge_model": huge["model"],
                          "huge_peak_rss_gib": round(huge["peak_rss_gib"], 3),
                          "huge_seconds": round(huge["seconds"], 1)}))
        return

    loaded = load_clip(args.model, "random", device="cpu")
    quick = args.quick
    refine = bench_refinements(loaded, 256 if quick else 1024, CLASSES_10)
    refine_rows = [
        (f"re-query + PAMR (10 it.), {256 if quick else 1024}^2", f"{refine['pamr_s']:.2f}s vs {refine['plain_s']:.2f}s",
         f"{refine['pamr_ratio']:.1f}x plain", "-"),
        ("re-query + SLIC regions (first / cached)", f"{refine['slic_first_s']:.2f}s / {refine['slic_s']:.2f}s",
         f"{refine['slic_first_ratio']:.1f}x / {refine['slic_ratio']:.1f}x", "-"),
        ("re-query + Felzenszwalb regions (first / cached)",
         f"{refine['felzenszwalb_first_s']:.2f}s / {refine['felzenszwalb_s']:.2f}s",
         f"{refine['felzenszwalb_first_ratio']:.1f}x / {refine['felzenszwalb_ratio']:.1f}x", "-"),
        ("re-query + Felzenszwalb majority vote (cached regions)", f"{refine['majority_s']:.2f}s",
         f"{refine['majority_ratio']:.1f}x", "-"),
        ("re-query + TLP (25 CG steps, ~80-cell grid)", f"{refine['tlp_s']:.2f}s",
         f"{refine['tlp_ratio']:.1f}x", "-"),
        ("re-query rfclip (text refocusing), whole image", f"{refine['query_rfclip_s']:.2f}s",
         f"{refine['query_rfclip_ratio']:.1f}x", "-"),
        (f"re-query resclip vs naclip, {refine['windows']} windows 224/112 (its feedback)",
         f"{refine['windows_resclip_s']:.2f}s vs {refine['windows_naclip_s']:.2f}s",
         f"{refine['windows_resclip_ratio']:.1f}x (CPU {refine['windows_resclip_cpu_ratio']:.1f}x)", "-"),
    ] + [(f"encode {mode} vs naclip (wall; CPU)",
          f"{refine[f'encode_{mode}_s']:.2f}s vs {refine['encode_naclip_s']:.2f}s; "
          f"{refine[f'encode_{mode}_cpu_s']:.2f}s vs {refine['encode_naclip_cpu_s']:.2f}s",
          f"{refine[f'{mode}_encode_ratio']:.2f}x; {refine[f'{mode}_encode_cpu_ratio']:.2f}x", "-")
         for mode in ("scclip", "rfclip", "resclip")]
    refine_json = {k: round(v, 4) if isinstance(v, float) else v for k, v in refine.items()}
    if args.refinements:
        print(f"model {args.model} (random weights), {args.threads} threads, torch {torch.__version__}")
        print("| measure | times | result | target |\n|---|---|---|---|")
        for row in refine_rows:
            print("| " + " | ".join(row) + " |")
        print(json.dumps({"refinements": refine_json}))
        return
    dense = bench_dense(loaded, batch=2 if quick else 8, repeats=1 if quick else 3)
    requery = bench_requery(loaded, 256 if quick else 1024, CLASSES_10)
    text = bench_text(loaded, CLASSES_20[:4] if quick else CLASSES_20, repeats=1 if quick else 2)
    rss = bench_rss(args.model, 896 if quick else 4096, args.threads)

    rows = [
        ("dense features vs encode_image (same tokens)", f"{dense['dense_s']:.3f}s vs {dense['plain_s']:.3f}s",
         f"{dense['dense_overhead']:.2f}x", "<= 1.15x"),
        (f"re-query vs cold, 10 classes, {requery['labels_shape'][0]}^2",
         f"{requery['requery_s']:.3f}s vs {requery['cold_s']:.1f}s",
         f"{requery['requery_speedup']:.0f}x faster", ">= 20x and < 0.3 s"),
        (f"truncated vs full text, {text['prompts']} prompts",
         f"{text['truncated_s']:.2f}s vs {text['full_s']:.2f}s", f"{text['text_speedup']:.1f}x faster", ">= 3x"),
        (f"peak RSS, {rss['shape'][0]}^2, sliding + KS ({rss['windows']} windows, {rss['seconds']:.0f}s)",
         f"{rss['after_load_gib']:.2f} GiB after load", f"{rss['peak_rss_gib']:.2f} GiB", "< 4 GiB"),
    ] + refine_rows
    print(f"model {args.model} (random weights), {args.threads} threads, torch {torch.__version__}")
    print(f"| measure | times | result | target |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(json.dumps({
        "dense_overhead": round(dense["dense_overhead"], 4),
        "requery_speedup": round(requery["requery_speedup"], 2),
        "requery_seconds": round(requery["requery_s"], 4),
        "text_speedup": round(text["text_speedup"], 3),
        "peak_rss_gib": round(rss["peak_rss_gib"], 3),
        "refinements": refine_json,
    }))


if __name__ == "__main__":
    main()
