"""The Segmenter: encode an image once, then query it with any class names, instantly.

    seg = Segmenter("ViT-B-16", "openai")
    features = seg.encode(image)                       # the image encoder runs here, once
    result = seg.segment(features, "cat, dog; puppy")  # text + cached features: fast
    result = seg.segment(features, "sofa, floor")      # no image encoder pass

Both steps exist as generators (:meth:`Segmenter.encode_iter`, :meth:`Segmenter.segment_iter`,
:meth:`Segmenter.run_iter`) that yield :class:`~napari_maskclip.progress.Progress` after each
window, so the napari widget, the CLI and tests share them; closing the generator cancels between
windows and nothing partial is cached or returned.

The pipeline of a query, per window at patch resolution: cosine logits of every prompt; prompt
denoising decided over the whole image (all windows); with key smoothing, class probabilities
smoothed by key similarity. Scores are upsampled bilinearly to pixels, averaged where windows
overlap, resized back to the input size, and turned into class probabilities (softmax over
prompts, max over synonyms) and labels (argmax; background classes and low-confidence pixels 0).
"""

from __future__ import annotations

import math
from typing import Any, Generator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..classes import ClassesLike, ClassSpec, parse_classes
from ..errors import InvalidInputError, UnsupportedModelError
from ..progress import Progress, run_to_completion
from .dense import dense_features
from .modes import VIT_ONLY_MODES
from .features import FeatureCache, ImageFeatures, WindowFeatures, image_digest
from .loading import LoadedModel, load_clip
from .precision import model_in, precision_dtype, run_precision
from .preprocess import check_image_array, prepare_image
from .refine import class_probabilities, denoise_keep, key_smoothing
from .result import SegmentationResult
from .settings import SegmentSettings
from .templates import resolve_templates
from .text import TextEmbeddingCache, TextEncoder
from .windows import Box, coverage, window_boxes

__all__ = ["Segmenter"]

# Prompt denoising's threshold is calibrated at CLIP's scale (paper and official code: 100), so it
# is decided at that scale whatever temperature the user picks for the confidence maps.
DENOISE_SCALE = 100.0

# Output rows processed per block when turning scores into probabilities and labels.
_ROW_BLOCK = 256


class Segmenter:
    """MaskCLIP on one model: encode images into cached features, query them with class names."""

    def __init__(
        self,
        model: str | LoadedModel = "ViT-B-16",
        pretrained: Optional[str] = "openai",
        *,
        settings: Optional[SegmentSettings] = None,
        device: str = "auto",
        precision: str = "auto",
        text_cache: Optional[TextEmbeddingCache] | str = "default",
        feature_cache_items: int = 4,
        **setting_overrides: Any,
    ) -> None:
        self.loaded = (
            model if isinstance(model, LoadedModel)
            else load_clip(model, pretrained, device=device, precision=precision)
        )
        base = settings or SegmentSettings()
        self.settings = self._checked(base.replace(**setting_overrides) if setting_overrides else base)
        if (precision or "auto") != "auto" and self.settings.precision == "auto":
            self.settings = self._checked(self.settings.replace(precision=precision))
        self.text = TextEncoder(self.loaded, cache=text_cache)
        self.features_cache = FeatureCache(max_items=feature_cache_items)
        #: Image-encoder forward passes run so far (one per window batch).
        self.image_encoder_calls = 0

    # ---- settings --------------------------------------------------------------------------
    def _checked(self, settings: SegmentSettings) -> SegmentSettings:
        settings.validate()
        if self.loaded.kind != "vit" and settings.mode in VIT_ONLY_MODES:
            raise UnsupportedModelError(
                f"Mode {settings.mode!r} needs a ViT model; {self.loaded.name} is a ResNet. "
                "Use mode 'maskclip', or a ViT such as ViT-B-16."
            )
        return settings

    def precision(self, settings: Optional[SegmentSettings] = None) -> str:
        """The precision a run with ``settings`` uses (``auto``: the model's default)."""
        s = settings or self.settings
        return run_precision(s.precision, device=self.loaded.device, weights=self.loaded.dtype,
                             default=self.loaded.precision)

    def _resolve(self, settings: Optional[SegmentSettings], overrides: dict[str, Any]) -> SegmentSettings:
        s = settings or self.settings
        if overrides:
            s = s.replace(**overrides)
        return self._checked(s) if (settings is not None or overrides) else s

    # ---- planning --------------------------------------------------------------------------
    def _proc_shape(self, height: int, width: int, s: SegmentSettings) -> tuple[int, int]:
        if s.short_side is None:
            return height, width
        scale = s.short_side / min(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def _plan(self, proc: tuple[int, int], s: SegmentSettings) -> dict[str, Any]:
        h, w = proc
        patch = self.loaded.patch_size
        if min(h, w) < patch:
            raise InvalidInputError(
                f"The image ({w}x{h} px after resizing) is smaller than one {patch}-px patch of "
                f"{self.loaded.name}; use a larger image or a larger short_side."
            )
        if s.window is None and h * w <= s.max_whole_pixels:
            return {"inference": "whole", "window": None, "stride": None}
        if s.window is not None:
            window = s.window
        else:
            window = s.auto_window or 2 * max(self.loaded.native_size)
        if window < patch:
            raise InvalidInputError(f"The window ({window} px) is smaller than one patch ({patch} px).")
        stride = s.stride or max(patch, window // 2)
        stride = min(stride, window)
        if h <= window and w <= window:
            return {"inference": "whole", "window": None, "stride": None}
        return {"inference": "sliding", "window": window, "stride": stride}

    # ---- encoding --------------------------------------------------------------------------
    def _pixels(self, unit: np.ndarray, proc: tuple[int, int]) -> torch.Tensor:
        """0..1 HxWx3 -> normalised 1x3xhxw tensor at processing size (on the model device)."""
        x = torch.from_numpy(np.ascontiguousarray(unit)).permute(2, 0, 1)[None]
        if tuple(x.shape[-2:]) != tuple(proc):
            downscale = proc[0] < x.shape[-2] or proc[1] < x.shape[-1]
            x = F.interpolate(x, size=proc, mode="bilinear", align_corners=False, antialias=downscale)
        mean = torch.tensor(self.loaded.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.loaded.std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.loaded.device)

    def _encode_batch(self, crops: list[torch.Tensor], mode: str, with_keys: bool,
                      precision: str = "fp32"):
        patch = self.loaded.patch_size
        h, w = crops[0].shape[-2:]
        ph, pw = math.ceil(h / patch) * patch, math.ceil(w / patch) * patch
        batch = torch.cat([F.pad(c, (0, pw - w, 0, ph - h)) for c in crops])
        batch = batch.to(precision_dtype(precision))
        self.image_encoder_calls += 1
        visual = model_in(self.loaded, precision).visual
        return dense_features(visual, batch, mode, with_keys=with_keys)

    def encode_iter(
        self,
        image: np.ndarray,
        *,
        channel_axis: Optional[int] = None,
        channels: Optional[Sequence[int]] = None,
        settings: Optional[SegmentSettings] = None,
        **overrides: Any,
    ) -> Generator[Progress, None, ImageFeatures]:
        """Encode ``image`` into dense features, yielding progress per window (cached)."""
        s = self._resolve(settings, overrides)
        image = check_image_array(image)
        precision = self.precision(s)  # resolved: features of two precisions never mix
        # The cache is checked first: a re-query pays only for hashing the image.
        key = image_digest(
            image, f"{channel_axis}|{channels}|{self.loaded.identity}|"
            f"{s.replace(precision=precision).encode_key()}"
        )
        cached = self.features_cache.get(key, need_keys=s.key_smoothing)
        if cached is not None:
            n = len(cached.windows)
            yield Progress("encode", n, n, "cached image features")
            return cached
        unit = prepare_image(image, channel_axis=channel_axis, channels=channels)
        height, width = unit.shape[:2]
        proc = self._proc_shape(height, width, s)
        plan = self._plan(proc, s)

        if plan["inference"] == "sliding":
            boxes = window_boxes(proc[0], proc[1], plan["window"], plan["stride"])
        else:
            boxes = [Box(0, 0, proc[0], proc[1])]
        pixels = self._pixels(unit, proc)
        del unit
        patch = self.loaded.patch_size
        total = len(boxes)
        yield Progress("encode", 0, total, f"encoding {total} window(s)")
        windows: list[WindowFeatures] = []
        step = s.window_batch
        for start in range(0, total, step):
            group = boxes[start:start + step]
            crops = [pixels[:, :, b.y0:b.y1, b.x0:b.x1] for b in group]
            with torch.no_grad():
                out = self._encode_batch(crops, s.mode, s.key_smoothing, precision)
            for i, box in enumerate(group):
                gh, gw = math.ceil(box.height / patch), math.ceil(box.width / patch)
                feat = out.features[i, :, :gh, :gw].contiguous()
                keys = None
                if out.keys is not None:
                    full_w = out.features.shape[-1]
                    grid_keys = out.keys[i].reshape(out.features.shape[-2], full_w, -1)
                    keys = grid_keys[:gh, :gw].reshape(gh * gw, -1).contiguous()
                windows.append(WindowFeatures(box=box, features=feat, keys=keys))
            yield Progress("encode", len(windows), total, f"window {len(windows)}/{total}")
        features = ImageFeatures(
            key=key,
            image_shape=(height, width),
            proc_shape=proc,
            patch=patch,
            windows=windows,
            model_identity=self.loaded.identity,
            encode_settings={name: getattr(s, name) for name in ("mode", "window", "stride",
                                                                  "short_side", "max_whole_pixels",
                                                                  "auto_window")}
            | {"precision": precision},
            plan=plan,
        )
        self.features_cache.put(features)
        return features

    def encode(self, image: np.ndarray, **kwargs: Any) -> ImageFeatures:
        """:meth:`encode_iter`, run to the end."""
        return run_to_completion(self.encode_iter(image, **kwargs))

    # ---- querying --------------------------------------------------------------------------
    def _class_lists(
        self, classes: ClassesLike, background: Optional[ClassesLike]
    ) -> tuple[list[ClassSpec], list[ClassSpec]]:
        fg = parse_classes(classes)
        bg = parse_classes(background, allow_empty=True) if background else []
        parse_classes(fg + bg)  # duplicates across the two lists are an error too
        return fg, bg

    def segment_iter(
        self,
        features: ImageFeatures,
        classes: ClassesLike,
        *,
        background: Optional[ClassesLike] = None,
        settings: Optional[SegmentSettings] = None,
        **overrides: Any,
    ) -> Generator[Progress, None, SegmentationResult]:
        """Read cached features against class names; yields progress per window."""
        s = self._resolve(settings, overrides)
        if features.model_identity != self.loaded.identity:
            raise InvalidInputError("These features were encoded by another model; encode again.")
        if s.key_smoothing and not features.has_keys:
            raise InvalidInputError(
                "Key smoothing needs the attention keys, which these features do not hold: "
                "encode the image with key_smoothing=True."
            )
        fg, bg = self._class_lists(classes, background)
        specs = fg + bg
        prompts = [syn for spec in specs for syn in spec.synonyms]
        groups: list[list[int]] = []
        for spec in specs:
            first = sum(len(g) for g in groups)
            groups.append(list(range(first, first + len(spec.synonyms))))
        templates = resolve_templates(s.templates)
        # Text in the precision of the image features (what the result records).
        text_precision = features.encode_settings.get("precision", self.precision(s))
        text = self.text.embed_texts(prompts, templates, precision=text_precision)  # Q x D

        windows = features.windows
        window_logits = [
            torch.einsum("dhw,qd->qhw", w.features, text.to(w.features.dtype)) for w in windows
        ]

        # Prompt denoising, decided over the whole image.
        keep = torch.ones(len(specs), dtype=torch.bool)
        if s.denoise:
            class_max = torch.full((len(specs),), -1.0)
            for lg in window_logits:
                probs = class_probabilities(lg.flatten(1), groups, DENOISE_SCALE)
                class_max = torch.maximum(class_max, probs.amax(dim=1).cpu())
            keep = denoise_keep(class_max, s.denoise_threshold)
        active = [k for k in range(len(specs)) if keep[k]]
        removed = [specs[k].name for k in range(len(specs)) if not keep[k]]
        active_prompts = [q for k in active for q in groups[k]]
        active_groups: list[list[int]] = []
        for k in active:
            first = sum(len(g) for g in active_groups)
            active_groups.append(list(range(first, first + len(groups[k]))))

        proc_h, proc_w = features.proc_shape
        patch = features.patch
        channels = len(active) if s.key_smoothing else len(active_prompts)
        scores = torch.zeros(channels, proc_h, proc_w, dtype=torch.float32, device=text.device)
        total = len(windows)
        yield Progress("segment", 0, total, "reading features")
        prompt_index = torch.tensor(active_prompts, device=text.device)
        for i, (win, lg) in enumerate(zip(windows, window_logits)):
            lg = lg.index_select(0, prompt_index.to(lg.device))
            gh, gw = win.grid
            if s.key_smoothing:
                probs = class_probabilities(lg.flatten(1), active_groups, s.logit_scale)
                probs = key_smoothing(probs, win.keys, threshold=s.ks_threshold)
                score = probs.reshape(-1, gh, gw)
            else:
                score = lg
            up = F.interpolate(score[None].float(), size=(gh * patch, gw * patch), mode="bilinear",
                               align_corners=False)[0]
            box = win.box
            scores[:, box.y0:box.y1, box.x0:box.x1] += up[:, :box.height, :box.width]
            yield Progress("segment", i + 1, total, f"window {i + 1}/{total}")
        if features.plan.get("inference") == "sliding":
            window, stride = features.plan["window"], features.plan["stride"]
            rows = torch.from_numpy(coverage(proc_h, window, stride)).to(scores.device)
            cols = torch.from_numpy(coverage(proc_w, window, stride)).to(scores.device)
            scores /= rows[None, :, None] * cols[None, None, :]

        height, width = features.image_shape
        labels, probabilities = self._finish(
            scores, (height, width), s, fg_count=len(fg), active=active,
            active_groups=active_groups,
        )
        result = SegmentationResult(
            labels=labels,
            probabilities=probabilities,
            classes=fg,
            background=bg,
            removed_classes=removed,
            settings=self._settings_record(s, features, templates),
        )
        return result

    def _finish(
        self,
        scores: torch.Tensor,
        size: tuple[int, int],
        s: SegmentSettings,
        *,
        fg_count: int,
        active: list[int],
        active_groups: list[list[int]],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores at processing size -> labels and foreground probabilities at image size."""
        height, width = size
        resize = tuple(scores.shape[-2:]) != (height, width)
        label_dtype = np.uint8 if fg_count <= 255 else np.uint16
        labels = np.zeros((height, width), dtype=label_dtype)
        probabilities = np.zeros((fg_count, height, width), dtype=np.float32)
        # Label value of each active class: k+1 for the user's classes, 0 for background ones.
        values = torch.tensor([k + 1 if k < fg_count else 0 for k in active], dtype=torch.int64)
        fg_rows = [(j, k) for j, k in enumerate(active) if k < fg_count]
        for y0 in range(0, height, _ROW_BLOCK):
            y1 = min(height, y0 + _ROW_BLOCK)
            if resize:
                # Resample only the rows this block needs (bounded memory on big images).
                block = _resize_rows(scores, y0, y1, height, width)
            else:
                block = scores[:, y0:y1]
            if s.key_smoothing:
                probs = block / block.sum(dim=0, keepdim=True).clamp_min(1e-12)
            else:
                probs = class_probabilities(block, active_groups, s.logit_scale)
            best_p, best = probs.max(dim=0)
            lab = values[best.cpu()]
            if s.background_threshold is not None:
                lab[best_p.cpu() < s.background_threshold] = 0
            labels[y0:y1] = lab.numpy().astype(label_dtype)
            probs_np = probs.cpu().numpy()
            for j, k in fg_rows:
                probabilities[k, y0:y1] = probs_np[j]
        return labels, probabilities

    def _settings_record(
        self, s: SegmentSettings, features: ImageFeatures, templates: Sequence[str]
    ) -> dict[str, Any]:
        record = s.to_dict()
        # What the features were actually encoded with wins over the query's settings.
        record.update(features.encode_settings)
        record.update(
            model=self.loaded.name,
            pretrained=self.loaded.pretrained,
            model_identity=self.loaded.identity,
            device=str(self.loaded.device),
            n_templates=len(templates),
            image_shape=list(features.image_shape),
            processing_shape=list(features.proc_shape),
            inference=features.plan.get("inference"),
            window_used=features.plan.get("window"),
            stride_used=features.plan.get("stride"),
            napari_maskclip_version=__version__,
        )
        return record

    def segment(self, features: ImageFeatures, classes: ClassesLike, **kwargs: Any) -> SegmentationResult:
        """:meth:`segment_iter`, run to the end."""
        return run_to_completion(self.segment_iter(features, classes, **kwargs))

    # ---- both ------------------------------------------------------------------------------
    def run_iter(
        self,
        image: np.ndarray,
        classes: ClassesLike,
        *,
        background: Optional[ClassesLike] = None,
        channel_axis: Optional[int] = None,
        channels: Optional[Sequence[int]] = None,
        settings: Optional[SegmentSettings] = None,
        **overrides: Any,
    ) -> Generator[Progress, None, SegmentationResult]:
        """Encode (or reuse cached features) and query, as one generator."""
        s = self._resolve(settings, overrides)
        # Validate the class list before the expensive part.
        self._class_lists(classes, background)
        features = yield from self.encode_iter(
            image, channel_axis=channel_axis, channels=channels, settings=s
        )
        result = yield from self.segment_iter(features, classes, background=background, settings=s)
        return result

    def __call__(self, image: np.ndarray, classes: ClassesLike, **kwargs: Any) -> SegmentationResult:
        """Segment ``image`` into ``classes`` (see :meth:`run_iter`)."""
        return run_to_completion(self.run_iter(image, classes, **kwargs))


def _resize_rows(scores: torch.Tensor, y0: int, y1: int, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of ``scores`` to ``height x width``, computing only output rows y0..y1.

    Equivalent to resizing the whole map (align_corners=False) and slicing, because each output
    row only reads the source rows around ``(y + 0.5) * scale - 0.5``.
    """
    src_h = scores.shape[-2]
    scale = src_h / height
    ys = (torch.arange(y0, y1, dtype=torch.float64) + 0.5) * scale - 0.5
    ys = ys.clamp(min=0.0)
    top = ys.floor().long().clamp(max=src_h - 1)
    bottom = (top + 1).clamp(max=src_h - 1)
    frac = (ys - top.double()).float().to(scores.device)
    rows_top = scores[:, top.to(scores.device)]
    rows_bottom = scores[:, bottom.to(scores.device)]
    rows = rows_top + (rows_bottom - rows_top) * frac[None, :, None]
    return _resize_cols(rows, width)


def _resize_cols(rows: torch.Tensor, width: int) -> torch.Tensor:
    src_w = rows.shape[-1]
    if src_w == width:
        return rows
    scale = src_w / width
    xs = ((torch.arange(width, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
    left = xs.floor().long().clamp(max=src_w - 1)
    right = (left + 1).clamp(max=src_w - 1)
    frac = (xs - left.double()).float().to(rows.device)
    a = rows[..., left.to(rows.device)]
    b = rows[..., right.to(rows.device)]
    return a + (b - a) * frac
