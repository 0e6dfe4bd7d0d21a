#!/usr/bin/env python
"""The presets against the authors' published code: RF-CLIP, ResCLIP and NACLIP (with PAMR).

Not a test: it needs the reference code, which this project neither ships nor downloads. Get it
(any folder; one is enough, the others are skipped)::

    git clone https://github.com/yvhangyang/ResCLIP  refs/ResCLIP     # read at 0e085f7
    git clone https://github.com/sinahmr/NACLIP      refs/NACLIP      # read at 0cac3a6
    git clone https://github.com/liblacklucy/RF-CLIP refs/RF-CLIP
    git -C refs/RF-CLIP checkout c2b333e64b57ba17a62e1564759c62cc9fb70cec  # the head holds a README only
    python benchmarks/compare_reference.py --refs refs               # --quick: a smaller image

It needs torch, open_clip, scipy and scikit-image (this project's dependencies); mmseg, mmengine,
cv2, matplotlib and scikit-learn are not needed: the few names the reference files import from
them are stubbed here (``BaseSegmentor`` as a plain ``nn.Module``, ``PixelData`` as a record,
sklearn's ``cosine_distances`` written out as sklearn computes it). RF-CLIP's checkout has no
``pamr.py``: ResCLIP's or NACLIP's (the same file) is used when present. Without any reference it
says how to get them and exits 0 with ``{"skipped": ...}``.

What is compared, per preset, on one random ViT-B/16 (open_clip ``ViT-B-16-quickgelu``, random
weights, seed 0; a few positional-embedding entries raised in RF-CLIP's distraction channels so
that its fix has tokens to work on) and one synthetic 300x400 RGB scene:

* the engine: ``Segmenter`` with ``SegmentSettings.from_preset(name)`` alone (fp32), the class
  names below (synonyms included), the image-size scores captured before the softmax; extra
  rows: ResCLIP with its temporary threshold at 0 (with random weights no pixel reaches the
  preset's 0.25, so its feedback sees one label) and its other base attentions, and NACLIP's
  preset with PAMR guided by the original image (this project's default guide);
* the reference: its segmentor class built without ``__init__`` (which downloads CLIP) and its
  attributes set as ``__init__`` sets them from the same config values, its ``VisionTransformer``
  given the same vision weights (OpenAI and open_clip share the layout), ``query_features`` the
  engine's own text embeddings (openai80 templates, the same random text tower), and ``predict``
  run on the engine's network input (the scene resized to the processing size and normalised),
  so the resizing conventions are not compared here (``tests/test_engine_conventions.py``). CUDA
  calls in the reference code run on the CPU.

Printed: the largest logit difference over every pixel and prompt (target < 1e-4) and the share
of pixels with the same label (target >= 99.5 %; also above a 0.05 probability margin). The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

#: preset -> (checkout folder name, files needed, segmentor module, class)
REFERENCES = {
    "rfclip": ("RF-CLIP", ("clip/model.py", "custom_segmentor.py"), "custom_segmentor", "RF_CLIP"),
    "resclip": ("ResCLIP", ("clip/model.py", "resclip_segmentor.py", "pamr.py"), "resclip_segmentor",
                "ResCLIPSegmentation"),
    "naclip": ("NACLIP", ("clip/model.py", "naclip.py", "pamr.py"), "naclip", "NACLIP"),
}
CLASSES = "sky; clouds, grass, road, car; truck, person, building, tree"
LOGIT_TARGET = 1e-4
LABEL_TARGET = 0.995
HOW = __doc__.split("::")[1].strip("\n").split("\n\n")[0]


# ---- the reference code, imported with stubs ------------------------------------------------------
def _stub(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _stubs() -> dict[str, types.ModuleType]:
    import numpy as np
    from torch import nn

    class BaseSegmentor(nn.Module):
        def __init__(self, data_preprocessor: Any = None, **_: Any) -> None:
            nn.Module.__init__(self)

    class PixelData:
        def __init__(self, **fields: Any) -> None:
            self.__dict__.update(fields)

    class Registry:
        def register_module(self, *_: Any, **__: Any):
            return lambda cls: cls

    def cosine_distances(x, y=None):
        """sklearn.metrics.pairwise.cosine_distances: 1 - cos, clipped to 0..2, zero diagonal
        when ``y`` is ``x``."""
        x = np.asarray(x, dtype=np.float64 if np.asarray(x).dtype == np.float64 else np.float32)
        same = y is None
        y = x if same else np.asarray(y)
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        yn = y / np.linalg.norm(y, axis=1, keepdims=True)
        d = np.clip(1.0 - xn @ yn.T, 0.0, 2.0)
        if same:
            np.fill_diagonal(d, 0.0)
            d = (d + d.T) / 2  # sklearn's result is symmetric by construction for X is Y
        return d

    def refuse(*_: Any, **__: Any):
        raise RuntimeError("the comparison never loads CLIP through the reference's clip package")

    mm = {
        "mmengine": _stub("mmengine"), "mmengine.structures": _stub("mmengine.structures", PixelData=PixelData),
        "mmseg": _stub("mmseg"), "mmseg.models": _stub("mmseg.models"),
        "mmseg.models.data_preprocessor": _stub("mmseg.models.data_preprocessor",
                                                SegDataPreProcessor=lambda **_: None),
        "mmseg.models.segmentors": _stub("mmseg.models.segmentors", BaseSegmentor=BaseSegmentor),
        "mmseg.registry": _stub("mmseg.registry", MODELS=Registry()),
        "cv2": _stub("cv2"), "matplotlib": _stub("matplotlib"), "matplotlib.pyplot": _stub("matplotlib.pyplot"),
        "sklearn": _stub("sklearn"), "sklearn.metrics": _stub("sklearn.metrics"),
        "sklearn.metrics.pairwise": _stub("sklearn.metrics.pairwise", cosine_distances=cosine_distances),
        "clip": _stub("clip", load=refuse, tokenize=refuse),
        "prompts": _stub("prompts"),
        "prompts.imagenet_template": _stub("prompts.imagenet_template", openai_imagenet_template=[]),
    }
    return mm


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def reference_code(root: Path, pamr_file: Optional[Path]) -> Iterator[tuple[types.ModuleType, types.ModuleType]]:
    """Import ``clip/model.py`` and the segmentor of a checkout with the stubs in place; every
    module it brought is removed afterwards (the three checkouts share module names)."""
    name = root.name
    _, _, seg_module, _ = next(v for v in REFERENCES.values() if v[0] == name)
    before = set(sys.modules)
    saved = {k: sys.modules[k] for k in list(sys.modules) if k in _stubs()}
    sys.modules.update(_stubs())
    sys.path.insert(0, str(root))
    try:
        pamr = root / "pamr.py" if (root / "pamr.py").is_file() else pamr_file
        if pamr is None:
            raise FileNotFoundError("no pamr.py (give ResCLIP or NACLIP too)")
        _load("pamr", pamr)
        model = _load("clip_reference_model", root / "clip" / "model.py")
        segmentor = _load(seg_module, root / f"{seg_module}.py")
        yield model, segmentor
    finally:
        sys.path.remove(str(root))
        for k in set(sys.modules) - before:
            del sys.modules[k]
        sys.modules.update(saved)


@contextlib.contextmanager
def cuda_on_cpu() -> Iterator[None]:
    """The reference code moves tensors and modules to CUDA: here they stay on the CPU."""
    import torch
    from torch import nn

    tensor_cuda, module_to = torch.Tensor.cuda, nn.Module.to

    def to(self, *args, **kwargs):
        args = tuple(a for a in args if not (isinstance(a, (str, torch.device)) and "cuda" in str(a)))
        if "cuda" in str(kwargs.get("device", "")):
            kwargs.pop("device")
        return module_to(self, *args, **kwargs)

    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.to = to
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.to = tensor_cuda, module_to


# ---- the comparison ---------------------------------------------------------------------------------
def _model():
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    with torch.no_grad():
        pos = model.visual.positional_embedding
        for k, channel in ((20, 4), (75, 162), (130, 474)):  # RF-CLIP's ViT-B/16 channels
            pos[1 + k, channel] += 30.0
    return model


def _reference_segmentor(preset: str, model_module, seg_module, visual_state, text, query_idx,
                         settings, patch: int):
    import torch
    from torch import nn

    _, _, _, cls_name = REFERENCES[preset]
    vit = model_module.VisionTransformer(input_resolution=224, patch_size=patch, width=768,
                                         layers=12, heads=12, output_dim=512)
    missing, unexpected = vit.load_state_dict(visual_state, strict=False)
    assert not missing and not [k for k in unexpected if not k.startswith("attn_pool")], (missing, unexpected)
    vit.eval()

    class Net(nn.Module):  # the reference CLIP's encode_image: visual(image.type(dtype), **options)
        def __init__(self) -> None:
            super().__init__()
            self.visual = vit

        def encode_image(self, image, **options):
            return self.visual(image.type(torch.float32), **options)

    cls = getattr(seg_module, cls_name)
    seg = cls.__new__(cls)
    nn.Module.__init__(seg)
    s = settings
    seg.net = Net()
    seg.query_idx = torch.tensor(query_idx, dtype=torch.int64)
    seg.num_queries = len(query_idx)
    seg.query_features = text.float()
    seg.dtype = torch.float32
    seg.logit_scale = s.logit_scale
    seg.prob_thd = 0.0
    seg.slide_stride = s.stride or 0
    seg.slide_crop = s.window or 0
    seg.align_corners = False
    if preset == "rfclip":
        seg.scale_up = False
        seg.cls_net = seg.net
        seg.query_words = [str(i) for i in query_idx]
        seg.global_semantics_weight = s.rfclip_global_weight
        seg.mean_vector_weight = s.rfclip_text_weight
        seg.h_threshold = s.rfclip_cluster_threshold
        seg.dataset = "context59" if s.rfclip_global == "image" else "city_scapes"
        seg.cls_query_features = seg.query_features
        seg.cluster_info = seg.hierarchical_clustering(seg.query_features)
        seg.pamr = None
    elif preset == "resclip":
        arch = "w_resi" if s.resclip_base == "sclip" else "wo_resi"  # SCLIP keeps the residual
        strategy = "resclip" if s.resclip_base == "naclip" else s.resclip_base
        seg.net.visual.set_params(arch, strategy, 5.0)
        seg.area_thd = None
        seg.pamr = None
        seg.temp_thd = s.resclip_temp_threshold
        seg.attn_sfr_weights = list(s.resclip_sfr_weights)
        seg.attn_rcs_weights = list(s.resclip_rcs_weights)
        seg.delete_same_entity = s.resclip_delete_same_entity
        seg.use_rcs, seg.use_sfr = (True,), (True,)  # as the reference's trailing commas make them
    else:  # naclip
        seg.net.visual.set_params("reduced", "naclip", 5.0)
        pamr_cls = sys.modules["pamr"].PAMR
        seg.pamr = pamr_cls(s.pamr_iterations, dilations=tuple(s.pamr_dilations)) if s.pamr else None
    return seg


class _Sample:
    def __init__(self, shape) -> None:
        self.metainfo = {"ori_shape": tuple(shape), "img_path": "scene.png"}
        self.data: dict[str, Any] = {}

    def set_data(self, data: dict[str, Any]) -> None:
        self.data.update(data)


def compare(preset: str, root: Path, pamr_file: Optional[Path], model, loaded, image,
            **changes: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    from napari_maskclip.engine import Segmenter, resclip, rfclip
    from napari_maskclip.engine import segmenter as segmenter_module
    from napari_maskclip.engine.settings import SegmentSettings

    settings = SegmentSettings.from_preset(preset, precision="fp32").replace(**changes)
    seg = Segmenter(loaded, settings=settings, text_cache=None)
    captured: list[torch.Tensor] = []
    exercised = {"fixed_tokens": 0, "patch_labels": set()}
    probabilities = segmenter_module.Readout.probabilities
    fix, labels_of = rfclip.fix_distraction, resclip.patch_labels

    def spy(self, scores, active):
        captured.append(scores[0].detach().clone())
        return probabilities(self, scores, active)

    def counted_fix(x, grid, channels):  # how many tokens RF-CLIP's fix touched
        out = fix(x, grid, channels)
        exercised["fixed_tokens"] += int(((out - x).abs().amax(dim=-1) > 0).sum())
        return out

    def seen_labels(*a, **k):  # which temporary labels ResCLIP's feedback saw
        out = labels_of(*a, **k)
        exercised["patch_labels"].update(out.unique().tolist())
        return out

    segmenter_module.Readout.probabilities = spy
    rfclip.fix_distraction, resclip.patch_labels = counted_fix, seen_labels
    try:
        result = seg(image, CLASSES)
    finally:
        segmenter_module.Readout.probabilities = probabilities
        rfclip.fix_distraction, resclip.patch_labels = fix, labels_of
    ours = torch.cat(captured, dim=1)  # Q x H x W, the prompts in layout order
    readout = seg._query(*seg._class_lists(CLASSES, None), settings, "fp32").readout
    layout, text = readout.layout, readout.text
    query_idx = [k for k, group in enumerate(layout.groups) for _ in group]
    height, width = image.shape[:2]
    proc = seg._proc_shape(height, width, settings)
    inputs = seg._pixels(image.astype(np.float32) / 255.0, proc, settings.resize_antialias)
    with reference_code(root, pamr_file) as (model_module, seg_module), cuda_on_cpu(), torch.no_grad():
        ref = _reference_segmentor(preset, model_module, seg_module, model.visual.state_dict(), text,
                                   query_idx, settings, loaded.patch_size)
        seen: dict[str, torch.Tensor] = {}
        post = ref.postprocess_result

        def keep(logits, samples):
            seen["logits"] = logits.detach().clone()
            return post(logits, samples)

        ref.postprocess_result = keep
        sample = _Sample((height, width))
        ref.predict(inputs, [sample])
    theirs = seen["logits"][0].float()
    ref_labels = sample.data["pred_sem_seg"].data[0].cpu().numpy()
    ref_probs = sample.data["seg_logits"].data.float()
    labels = result.labels.astype(np.int64) - 1
    top2 = torch.topk(ref_probs, 2, dim=0).values
    decided = ((top2[0] - top2[1]) > 0.05).numpy()
    out = {
        "preset": preset,
        "max_logit_diff": float((ours - theirs).abs().max()),
        "label_agreement": float(np.mean(labels == ref_labels)),
        "label_agreement_margin_0.05": float(np.mean(labels[decided] == ref_labels[decided])),
        "decided_share": float(decided.mean()),
        "processing_shape": list(proc),
        "windows": result.settings.get("inference"),
        "changes": {k: v for k, v in changes.items()},
    }
    if preset == "rfclip":
        out["fixed_tokens"] = exercised["fixed_tokens"]
    if preset == "resclip":
        out["patch_labels_seen"] = len(exercised["patch_labels"])
    out["ok"] = out["max_logit_diff"] < LOGIT_TARGET and out["label_agreement"] >= LABEL_TARGET
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refs", type=Path, default=None,
                        help="folder holding the checkouts RF-CLIP, ResCLIP, NACLIP (any of them)")
    parser.add_argument("--only", choices=list(REFERENCES), action="append", default=None)
    parser.add_argument("--quick", action="store_true", help="a 150x200 scene (fewer windows)")
    args = parser.parse_args(argv)
    found = {}
    if args.refs is not None:
        for preset, (folder, files, _, _) in REFERENCES.items():
            root = args.refs / folder
            if (args.only is None or preset in args.only) and all((root / f).is_file() for f in files):
                found[preset] = root
    if not found:
        print("No reference code found. Get it first (this project never downloads it):\n" + HOW)
        print(json.dumps({"skipped": "no reference code", "refs": str(args.refs)}))
        return 0
    pamr_file = next((args.refs / REFERENCES[p][0] / "pamr.py" for p in ("resclip", "naclip")
                      if (args.refs / REFERENCES[p][0] / "pamr.py").is_file()), None)
    import torch

    from napari_maskclip.engine import wrap_model
    from napari_maskclip.synthetic import make_scene

    model = _model()
    loaded = wrap_model(model, name="ViT-B-16-quickgelu (random)")
    size = (150, 200) if args.quick else (300, 400)
    image = make_scene(seed=7, size=size, n_objects=(3, 5)).image
    rows = []
    runs = [(preset, {}) for preset in found]
    if "resclip" in found:  # the feedback with several labels (random weights leave every pixel
        # below the preset's threshold, so its labels are all prompt 0), and the other bases
        runs += [("resclip", {"resclip_temp_threshold": 0.0}),
                 ("resclip", {"resclip_base": "clearclip", "resclip_temp_threshold": 0.0}),
                 ("resclip", {"resclip_base": "sclip", "resclip_temp_threshold": 0.0})]
    if "naclip" in found:  # what the reference guide setting buys: PAMR guided by the original
        runs.append(("naclip", {"refine_guide": "original"}))
    for preset, changes in runs:
        try:
            rows.append(compare(preset, found[preset], pamr_file, model, loaded, image, **changes))
        except FileNotFoundError as exc:
            rows.append({"preset": preset, "skipped": str(exc)})
    print(f"{'preset':44} {'max |logit diff|':>17} {'labels equal':>13} {'(margin > 0.05)':>16}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['preset']:8} skipped: {r['skipped']}")
            continue
        name = r["preset"] + "".join(f" {k}={v}" for k, v in r["changes"].items())
        print(f"{name:44} {r['max_logit_diff']:17.2e} {100 * r['label_agreement']:12.2f}% "
              f"{100 * r['label_agreement_margin_0.05']:15.2f}%")
    print(json.dumps({"size": list(size), "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
