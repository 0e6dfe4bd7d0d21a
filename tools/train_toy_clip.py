#!/usr/bin/env python
"""Train the offline toy CLIP of napari-maskclip from scratch, on CPU, in 14 minutes.

Real CLIP weights cannot be downloaded everywhere, so the project ships a tiny CLIP trained here
on procedurally generated scenes (:mod:`napari_maskclip.synthetic`): coloured shapes on textured
backgrounds, captioned with the classes they contain ("a photo of a red circle and a blue
square."), and empty scenes captioned "a photo of a background.". The training objective is
plain CLIP: a symmetric contrastive loss between image and caption embeddings, where scenes with
the same set of classes count as positives of each other. No mask ever reaches the loss; dense
labels are read out afterwards by MaskCLIP (the value path of the last block).

Two things make the dense read-out work in so small a model (measured with
``benchmarks/quality.py``):

- "shape twins": half of each batch repeats the colours of the other half with other shapes, so
  colour alone never separates a caption from its twin's and shape must be learned;
- "late pooling" (``--late-pool-prob``): on half of the steps after the first 30 %, the class
  token may not look at the patches before the last block, so the global embedding has to come
  through the last block's value path, which is exactly what MaskCLIP reads per patch.

Captions that also named the background texture ("... and a striped background") let twins
differ by their backgrounds, and shape was then learned to only about half the accuracy; they
are off by default (``--caption-background``).

Writes three files into ``--out`` (default: the package's ``demo/`` folder):

- ``toy_clip.json``: the open_clip model config (``open_clip.CLIP(**cfg)`` or
  ``open_clip.add_model_config`` + ``create_model``);
- ``toy_clip.safetensors``: the weights in fp16;
- ``toy_vocab.json``: class names, prompt template, background name, image size, mean/std,
  the command and seed that reproduce the file, and the final image-level accuracy.

Seeded: data are drawn from ``numpy.random.default_rng([seed, 0, step])``, validation scenes
from ``[seed, 1, 0]``, the weights from ``torch.manual_seed(seed)``. On the build machine
(2 cores, torch 2.14.1) a rerun of the recorded command reproduced the shipped weights bit for
bit in 832 s; other machines or thread counts can differ in the last bits. ``--device cuda`` trains the same recipe on a GPU in
about 4 minutes (for sweeps; bf16 kernels differ, so the weights do).

The shipped model (``toy_vocab.json`` records the exact command and its timing)::

    python tools/train_toy_clip.py       # 2000 steps x 128 scenes of 64 px, 2 threads
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "napari_maskclip" / "demo"

# CLIP's own normalisation (open_clip's default for every model config).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu",
                   help="cpu (the reproducible recipe) or cuda (for quick sweeps; not bit-identical)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--init-logit-scale", type=float, default=20.0,
                   help="initial CLIP temperature scale (learnable, clamped at 100)")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, then cosine")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast on CPU (about 2x faster where supported)")
    # data
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n-objects", type=int, nargs=2, default=(1, 3), metavar=("LO", "HI"))
    p.add_argument("--empty-prob", type=float, default=0.2,
                   help="fraction of scenes without objects, captioned with the background prompt")
    p.add_argument("--twin-frac", type=float, default=0.5,
                   help="fraction of each batch that are shape twins of other scenes (same "
                        "colours, other shapes): hard negatives that make shape count")
    p.add_argument("--late-pool-prob", type=float, default=0.5,
                   help="fraction of steps whose image forward hides the patches from the class "
                        "token before the last block (see encode_image_late_pool)")
    p.add_argument("--late-pool-start", type=float, default=0.3,
                   help="fraction of the steps before late pooling starts (shape is learned "
                        "faster with the ordinary forward alone)")
    p.add_argument("--radius-frac", type=float, nargs=2, default=(0.1, 0.25))
    p.add_argument("--caption-background", action=argparse.BooleanOptionalAction, default=False,
                   help="name the background texture in captions ('a striped background'); off: "
                        "empty scenes are 'a photo of a background.' and objects' captions name "
                        "only the objects (the texture captions let twins differ by background, "
                        "and shape was then learned at about half the accuracy)")
    p.add_argument("--clutter-prob", type=float, default=0.3)
    p.add_argument("--max-rotation", type=float, default=15.0,
                   help="degrees; squares and triangles are rotated by up to +- this")
    # model
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--head-width", type=int, default=64)
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--text-heads", type=int, default=2)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--context-length", type=int, default=32)
    # reporting
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--val-scenes", type=int, default=500)
    p.add_argument("--val-every", type=int, default=0, help="quick validation every N steps (0: off)")
    p.add_argument("--save-every", type=int, default=0,
                   help="also write intermediate checkpoints to OUT/step_N every N steps (0: off)")
    return p.parse_args(argv)


def model_config(a: argparse.Namespace) -> dict:
    return {
        "embed_dim": a.embed_dim,
        "vision_cfg": {
            "image_size": a.image_size,
            "patch_size": a.patch_size,
            "layers": a.layers,
            "width": a.width,
            "head_width": a.head_width,
            "mlp_ratio": a.mlp_ratio,
        },
        "text_cfg": {
            "context_length": a.context_length,
            "vocab_size": 49408,
            "width": a.text_width,
            "heads": a.text_heads,
            "layers": a.text_layers,
        },
    }


def batch_classes(rng: np.random.Generator, a) -> list[list[int]]:
    """The classes of each scene of one batch.

    A fraction ``a.twin_frac`` of the batch are "shape twins" of other scenes in the batch: the
    same colours, with the shapes drawn again so that the set of classes differs. Colour alone
    then no longer separates a scene from its twin, which makes the contrastive loss learn shape
    early (without twins, a small model first learns colour only and shape much later).
    """
    from napari_maskclip.synthetic import SHAPES

    n_shapes = len(SHAPES)
    n_twins = int(round(a.batch_size * a.twin_frac))
    n_base = a.batch_size - n_twins
    lo, hi = a.n_objects
    out: list[list[int]] = []
    for _ in range(n_base):
        if rng.uniform() < a.empty_prob:
            out.append([])
        else:
            out.append([int(c) for c in rng.integers(1, 13, int(rng.integers(lo, hi + 1)))])
    for i in range(n_twins):
        base = out[i % n_base]
        if not base:  # the twin of an empty scene is another empty scene (a positive)
            out.append([])
            continue
        while True:
            twin = [(c - 1) // n_shapes * n_shapes + int(rng.integers(n_shapes)) + 1 for c in base]
            if set(twin) != set(base):
                break
        out.append(twin)
    return out


class Batches:
    """Deterministic training batches, prepared one step ahead in a background thread."""

    def __init__(self, a, tokenize):
        self.a = a
        self.tokenize = tokenize
        self._cache: dict[str, "torch.Tensor"] = {}
        self._next = None
        self._thread = None

    def _make(self, step: int):
        import torch

        from napari_maskclip.synthetic import make_batch

        a = self.a
        rng = np.random.default_rng([a.seed, 0, step])
        scenes = make_batch(
            rng, a.batch_size, (a.image_size, a.image_size), radius_frac=tuple(a.radius_frac),
            clutter_prob=a.clutter_prob, max_rotation=a.max_rotation, classes=batch_classes(rng, a),
            caption_background=a.caption_background,
        )
        images = torch.from_numpy(np.stack([s.image for s in scenes]))
        tokens = []
        for s in scenes:
            t = self._cache.get(s.caption)
            if t is None:
                t = self._cache[s.caption] = self.tokenize([s.caption])[0]
            tokens.append(t)
        keys = [(tuple(s.class_ids), s.background if a.caption_background else "") for s in scenes]
        # positives: scenes with the same caption up to word order (the same set of classes, and
        # the same background texture where captions name it)
        same = torch.tensor([[ki == kj for kj in keys] for ki in keys], dtype=torch.float32)
        return images, torch.stack(tokens), same

    def get(self, step: int):
        if self._thread is None:  # first call
            out = self._make(step)
        else:
            self._thread.join()
            out = self._next
        if step + 1 < self.a.steps:
            def work():
                self._next = self._make(step + 1)
            self._thread = threading.Thread(target=work, daemon=True)
            self._thread.start()
        return out


def encode_image_late_pool(model, x):
    """Image embedding with the class token blind to the patches before the last block.

    The same weights and ops as ``model.encode_image``, except that in blocks 1..L-1 the class
    token's query may attend only to itself (patches attend to everything as usual). All image
    information then reaches the class token through the last block's attention, i.e. through
    the value embeddings of the patches: the last block becomes an attention pooling, as in the
    original CLIP ResNets. Used on a random fraction of the training steps (``--late-pool-prob``);
    the other steps and all inference use the ordinary forward.
    """
    import torch

    vis = model.visual
    t = vis._embeds(x)
    n = t.shape[1]
    mask = torch.zeros(n, n, dtype=t.dtype, device=t.device)
    mask[0, 1:] = float("-inf")
    blocks = vis.transformer.resblocks
    for blk in blocks[:-1]:
        t = blk(t, attn_mask=mask)
    t = blocks[-1](t)
    pooled, _ = vis._pool(t)
    return torch.nn.functional.normalize(pooled @ vis.proj, dim=-1)


def background_names(a) -> list[str]:
    """The prompts that mean background: the texture names where captions name them, else the
    single name of the empty training scenes' caption ("a photo of a background.")."""
    from napari_maskclip.synthetic import BACKGROUND_NAME, BACKGROUND_NAMES

    return list(BACKGROUND_NAMES) if a.caption_background else [BACKGROUND_NAME]


def to_input(images_u8, mean, std):
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W)."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


def image_level_accuracy(model, a, tokenize, mean, std, n=None, device="cpu") -> dict:
    """Image-level zero-shot accuracy on held-out scenes with one object (1/13 of them empty).

    One-object scenes: top-1 over the 12 class prompts. Empty scenes: correct when a background
    prompt (any of :func:`background_names`) beats every class prompt. ``top1`` pools both.
    """
    import torch

    from napari_maskclip.synthetic import CLASS_NAMES, TEMPLATE, make_batch

    bg_names = background_names(a)
    nb = len(bg_names)
    names = [*bg_names, *CLASS_NAMES]
    with torch.no_grad():
        text = model.encode_text(tokenize([TEMPLATE.format(n) for n in names]).to(device),
                                 normalize=True)
        scenes = make_batch([a.seed, 1, 0], n or a.val_scenes, (a.image_size, a.image_size), (1, 1),
                            empty_prob=1 / 13, radius_frac=tuple(a.radius_frac),
                            clutter_prob=a.clutter_prob, max_rotation=a.max_rotation)
        x = to_input(torch.from_numpy(np.stack([s.image for s in scenes])).to(device), mean, std)
        feats = torch.cat([model.encode_image(xb, normalize=True) for xb in x.split(100)])
        sims = (feats @ text.T).float().cpu().numpy()
    truth = np.array([s.class_ids[0] if s.class_ids else 0 for s in scenes])
    obj = truth > 0
    pred_cls = sims[:, nb:].argmax(1) + 1  # among the classes only
    is_bg = sims.argmax(1) < nb
    ok = np.where(obj, pred_cls == truth, is_bg)
    return {
        "top1": float(ok.mean()),
        "top1_objects": float(ok[obj].mean()),
        "top1_background": float(ok[~obj].mean()) if (~obj).any() else None,
        "colour_given_object": float(((pred_cls - 1) // 3 == (truth - 1) // 3)[obj].mean()),
        "shape_given_object": float(((pred_cls - 1) % 3 == (truth - 1) % 3)[obj].mean()),
        "n": len(scenes),
    }


def main(argv=None) -> int:
    a = parse_args(argv)
    import open_clip
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = model_config(a)
    model = open_clip.CLIP(**cfg, init_logit_scale=math.log(a.init_logit_scale))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters; config {json.dumps(cfg)}", flush=True)

    def tokenize(texts):
        return open_clip.tokenize(texts, context_length=a.context_length)

    dev = torch.device(a.device)
    model.to(dev)
    mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.98), eps=1e-6,
    )

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        t = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * 0.5 * (1 + math.cos(math.pi * t))

    batches = Batches(a, tokenize)
    late_rng = np.random.default_rng([a.seed, 3])
    t0 = time.time()
    running = None
    model.train()
    for step in range(a.steps):
        images, tokens, same = (t.to(dev, non_blocking=True) for t in batches.get(step))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = to_input(images, mean, std)
        # The plain "math" attention kernel is faster than flash attention for these tiny heads
        # on CPU (about 0.6x the step time); both compute the same softmax attention.
        late = bool(late_rng.uniform() < a.late_pool_prob) and step >= a.late_pool_start * a.steps
        kernels = ([SDPBackend.MATH] if dev.type == "cpu" else
                   [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
        with sdpa_kernel(kernels), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            if late:
                img_f = encode_image_late_pool(model, x)
                txt_f = model.encode_text(tokens, normalize=True)
                scale = model.logit_scale.exp()
            else:
                img_f, txt_f, scale = model(x, tokens)
        img_f, txt_f = img_f.float(), txt_f.float()
        logits = scale * img_f @ txt_f.T
        target = same / same.sum(1, keepdim=True)  # symmetric: same is symmetric
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % a.log_every == 0 or step == a.steps - 1:
            el = time.time() - t0
            eta = el / (step + 1) * (a.steps - step - 1)
            print(f"step {step:5d}/{a.steps}  loss {running:.3f}  scale {scale.item():6.2f}  "
                  f"lr {lr_at(step):.2e}  {el:6.0f}s elapsed, eta {eta:4.0f}s", flush=True)
        if a.val_every and step % a.val_every == a.val_every - 1 and step < a.steps - 1:
            model.eval()
            v = image_level_accuracy(model, a, tokenize, mean, std, n=130, device=dev)
            model.train()
            print(f"  val top1 {v['top1']:.3f}  colour {v['colour_given_object']:.3f}  "
                  f"shape {v['shape_given_object']:.3f}", flush=True)
        if a.save_every and step % a.save_every == a.save_every - 1 and step < a.steps - 1:
            write_outputs(a, argv, cfg, model, {}, time.time() - t0, a.out / f"step_{step + 1}")
    train_s = time.time() - t0

    model.eval()
    acc = image_level_accuracy(model, a, tokenize, mean, std, device=dev)
    print(f"image-level accuracy (top-1 of 13 prompts, {acc['n']} held-out scenes with 0-1 "
          f"object): {acc['top1']:.3f} (objects {acc['top1_objects']:.3f}, "
          f"background {acc['top1_background']:.3f})", flush=True)

    write_outputs(a, argv, cfg, model, acc, train_s, a.out)
    size_mb = (a.out / "toy_clip.safetensors").stat().st_size / 1e6
    print(f"wrote {a.out} (weights {size_mb:.1f} MB); training took {train_s:.0f}s", flush=True)
    return 0


def write_outputs(a, argv, cfg, model, acc, train_s, out: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from napari_maskclip.synthetic import CLASS_NAMES, TEMPLATE

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "toy_clip.json", "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "toy_clip.safetensors"), metadata={"format": "pt"})
    cmd = "python tools/train_toy_clip.py " + " ".join(shlex.quote(s) for s in (argv or sys.argv[1:]))
    vocab = {
        "class_names": list(CLASS_NAMES),
        "templates": [TEMPLATE],
        "background_names": background_names(a),
        "background": (
            "A named background prompt: the template applied to 'background' is exactly the "
            "caption of the empty training scenes; at inference it competes in the argmax with "
            "the class prompts."
        ),
        "mask_values": "0 = background, k = class_names[k - 1] (napari_maskclip.synthetic)",
        "image_size": a.image_size,
        "patch_size": a.patch_size,
        "mean": list(MEAN),
        "std": list(STD),
        "caption_style": (
            "'a photo of a X, a Y and a Z.': every class present once, in random order; "
            "scenes with the same set of classes are positives of each other"
        ),
        "data": {
            "generator": "napari_maskclip.synthetic.make_batch",
            "n_objects": list(a.n_objects),
            "empty_prob": a.empty_prob,
            "radius_frac": list(a.radius_frac),
            "clutter_prob": a.clutter_prob,
            "max_rotation": a.max_rotation,
            "twin_frac": a.twin_frac,
            "caption_background": a.caption_background,
            "late_pool_prob": a.late_pool_prob,
            "late_pool_start": a.late_pool_start,
            "train_rng": "numpy.random.default_rng([seed, 0, step])",
            "val_rng": "numpy.random.default_rng([seed, 1, 0])",
        },
        "training": {
            "command": cmd,
            "seed": a.seed,
            "steps": a.steps,
            "batch_size": a.batch_size,
            "lr": a.lr,
            "weight_decay": a.weight_decay,
            "bf16_autocast": a.bf16,
            "threads": a.threads,
            "device": a.device,
            "train_seconds": round(train_s, 1),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        },
        "image_level_accuracy": acc,
    }
    with open(out / "toy_vocab.json", "w") as f:
        json.dump(vocab, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
