"""Precision benchmark: bf16 against fp32 on the CPU, for speed and for labels.

* Speed: ViT-B-16's real architecture with random weights (built from open_clip's config, no
  download). ``encode``: the engine's image encoder pass (dense MaskCLIP features) on a batch of
  224x224 crops; ``text``: the text encoder on prompts of 85 templates. Each figure is the
  fastest of ``--repeats`` runs (wall clock; CPU seconds printed alongside, since a shared machine
  inflates wall time). The min cosine between the fp32 and bf16 outputs is printed too.
* Labels: the shipped demo model (a trained tiny CLIP: random weights leave classes near-tied,
  so their labels flip at any rounding) on the demo's synthetic scenes, read with its sliding
  windows; ``label_agreement`` is the share of pixels labelled alike in fp32 and bf16 (both
  encoders in bf16), ``text_label_agreement`` the share of feature cells whose best prompt is the
  same with bf16 as with fp32 text embeddings (image features fp32).

Targets (issue 16): ``bf16_speedup`` >= 1.8 where the CPU has native bf16 (AVX512-BF16 or AMX;
elsewhere bf16 is emulated and ``auto`` never picks it), ``label_agreement`` >= 0.995.

    python benchmarks/bench_precision.py [--threads 2] [--crops 4] [--repeats 2] [--scenes 8]
    python benchmarks/bench_precision.py --quick    # a smoke run (figures mean little)

Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from napari_maskclip.classes import parse_classes
from napari_maskclip.engine import Segmenter, load_clip
from napari_maskclip.engine.dense import dense_features
from napari_maskclip.engine.precision import (
    cpu_has_native_bf16,
    model_in,
    precision_dtype,
    resolve_precision,
)
from napari_maskclip.engine.templates import resolve_templates
from napari_maskclip.engine.text import TextEncoder

TEXT_CLASSES = ["cat", "dog", "car", "tree", "road"]


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(fastest wall seconds, CPU seconds of that run, last output) after one warm-up call."""
    out = fn()
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best = min(best, (wall, cpu))
    return best[0], best[1], out


def speed(args) -> dict:
    loaded = load_clip("ViT-B-16", "random", device="cpu", precision="fp32")
    x = torch.randn(args.crops, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    prompts = [t.format(c) for c in TEXT_CLASSES[:args.text_classes]
               for t in resolve_templates(args.templates)]
    text = TextEncoder(loaded, cache=None)
    row: dict = {}
    features, embeddings = {}, {}
    for name in ("fp32", "bf16"):
        visual = model_in(loaded, name).visual
        pixels = x.to(precision_dtype(name))
        with torch.no_grad():
            wall, cpu, out = timed(lambda: dense_features(visual, pixels, "maskclip"), args.repeats)
        row[f"encode_{name}_s"], row[f"encode_{name}_cpu_s"] = round(wall, 3), round(cpu, 3)
        features[name] = out.features
        wall, cpu, out = timed(lambda: text.encode_prompts(prompts, precision=name), args.repeats)
        row[f"text_{name}_s"], row[f"text_{name}_cpu_s"] = round(wall, 3), round(cpu, 3)
        embeddings[name] = out
    row["bf16_speedup"] = round(row["encode_fp32_s"] / row["encode_bf16_s"], 3)
    row["text_speedup"] = round(row["text_fp32_s"] / row["text_bf16_s"], 3)
    row["encode_cosine_min"] = round(
        F.cosine_similarity(features["fp32"], features["bf16"], dim=1).min().item(), 6)
    row["text_cosine_min"] = round(
        F.cosine_similarity(embeddings["fp32"], embeddings["bf16"], dim=1).min().item(), 6)
    row["text_prompts"] = len(prompts)
    return row


def labels(args) -> dict:
    from napari_maskclip.cli.demo import demo_classes, demo_scene
    from napari_maskclip.demo import recommended_settings

    names, background = demo_classes()
    prompts = [syn for spec in parse_classes(names) + parse_classes(background)
               for syn in spec.synonyms]
    seg = Segmenter("demo", None, device="cpu", text_cache=None, window_batch=16,
                    **recommended_settings())
    templates = resolve_templates(seg.settings.templates)
    same = total = same_cells = cells = 0
    for seed in range(args.scenes):
        image = demo_scene(seed).image
        a = seg(image, names, background=background, precision="fp32")
        b = seg(image, names, background=background, precision="bf16")
        assert a.settings["inference"] == "sliding" and b.settings["precision"] == "bf16"
        same += int(np.sum(a.labels == b.labels))
        total += a.labels.size
        # Only the text encoder in bf16: fp32 image features (cached) read against bf16 text.
        features = seg.encode(image, precision="fp32")
        t32 = seg.text.embed_texts(prompts, templates, precision="fp32")
        t16 = seg.text.embed_texts(prompts, templates, precision="bf16")
        for win in features.windows:
            best32 = torch.einsum("dhw,qd->qhw", win.features, t32).argmax(dim=0)
            best16 = torch.einsum("dhw,qd->qhw", win.features, t16).argmax(dim=0)
            same_cells += int((best32 == best16).sum())
            cells += best32.numel()
    return {"label_agreement": round(same / total, 5),
            "text_label_agreement": round(same_cells / cells, 5),
            "demo_text_cosine_min": round(F.cosine_similarity(t32, t16, dim=1).min().item(), 6),
            "scenes": args.scenes, "pixels": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--crops", type=int, default=4, help="224x224 crops per encoder pass")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--text-classes", type=int, default=2, help="classes x 85 templates")
    parser.add_argument("--templates", default="maskclip85")
    parser.add_argument("--scenes", type=int, default=8, help="demo scenes for label agreement")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.crops, args.repeats, args.text_classes, args.scenes = 1, 1, 1, 1
        args.templates = "single"
    torch.set_num_threads(args.threads)
    has_bf16 = cpu_has_native_bf16()
    row = {"cpu_has_bf16": has_bf16, "auto_picks": resolve_precision(torch.device("cpu"), "auto"),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "machine": platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "crops": args.crops}
    row.update(speed(args))
    row.update(labels(args))
    row["loadavg"] = round(os.getloadavg()[0], 2)

    native = "native bf16" if has_bf16 else "no native bf16: bf16 is emulated"
    print(f"CPU {row['cpu_capability']} ({native}); auto picks {row['auto_picks']}; "
          f"{row['threads']} threads, load {row['loadavg']}")
    print(f"{'measure':<44} {'fp32':>9} {'bf16':>9} {'speedup':>8} {'min cos':>9}")
    print(f"{'image encoder, ViT-B-16, ' + str(args.crops) + ' crops ' + str(args.size) + ' px (s)':<44} "
          f"{row['encode_fp32_s']:>9.3f} {row['encode_bf16_s']:>9.3f} {row['bf16_speedup']:>7.2f}x "
          f"{row['encode_cosine_min']:>9.6f}")
    print(f"{'  CPU seconds':<44} {row['encode_fp32_cpu_s']:>9.3f} {row['encode_bf16_cpu_s']:>9.3f}")
    print(f"{'text encoder, ' + str(row['text_prompts']) + ' prompts (s)':<44} "
          f"{row['text_fp32_s']:>9.3f} {row['text_bf16_s']:>9.3f} {row['text_speedup']:>7.2f}x "
          f"{row['text_cosine_min']:>9.6f}")
    print(f"{'  CPU seconds':<44} {row['text_fp32_cpu_s']:>9.3f} {row['text_bf16_cpu_s']:>9.3f}")
    print(f"demo model, {row['scenes']} scenes, sliding windows: label agreement "
          f"{row['label_agreement']:.4f} (target >= 0.995); text encoder alone in bf16: "
          f"{row['text_label_agreement']:.4f} (min text cosine {row['demo_text_cosine_min']:.6f})")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
