"""The Segmenter: encode an image once, then query it with any class names, instantly.

    seg = Segmenter("ViT-B-16", "openai")
    features = seg.encode(image)                       # the image encoder runs here, once
    result = seg.segment(features, "cat, dog; puppy")  # text + cached features: fast
    result = seg.segment(features, "sofa, floor")      # no image encoder pass

Both steps exist as generators (:meth:`Segmenter.encode_iter`, :meth:`Segmenter.segment_iter`,
:meth:`Segmenter.run_iter`) that yield :class:`~napari_maskclip.progress.Progress` after each
window, so the napari widget, the CLI and tests share them; closing the generator cancels between
windows and nothing partial is cached or returned.

A query is the engine's read-out (:mod:`.readout`, shared with the student's teacher) applied to
the windows of one image: cosine logits of every prompt per window; prompt denoising decided over
the whole image (all windows); cell scores (with key smoothing, class probabilities smoothed by
key similarity) upsampled bilinearly to pixels. Here the windows are averaged where they overlap
and resized back to the input size; the read-out then turns the scores into class probabilities
and labels (argmax; background classes and low-confidence pixels 0), in blocks of rows.
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
from .pamr import pamr_halo
from .preprocess import check_image_array, prepare_image
from .readout import ActiveClasses, PromptLayout, Readout, resize_rows
from .regions import RegionVote, check_regions, superpixels
from .result import SegmentationResult
from .settings import SegmentSettings
from .templates import resolve_templates
from .text import TextEmbeddingCache, TextEncoder
from .windows import Box, coverage, window_boxes

__all__ = ["Segmenter"]

# Output rows processed per block when turning scores into probabilities and labels.
_ROW_BLOCK = 256
# Images up to this many pixels are refined by PAMR in one block (no repeated halo rows).
_PAMR_WHOLE_PIXELS = 1 << 21


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

    def _encode_batch(self, crops: list[torch.Tensor], mode: str, with_keys: bool):
        patch = self.loaded.patch_size
        h, w = crops[0].shape[-2:]
        ph, pw = math.ceil(h / patch) * patch, math.ceil(w / patch) * patch
        batch = torch.cat([F.pad(c, (0, pw - w, 0, ph - h)) for c in crops]).to(self.loaded.dtype)
        self.image_encoder_calls += 1
        return dense_features(self.loaded.visual, batch, mode, with_keys=with_keys)

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
        # The cache is checked first: a re-query pays only for hashing the image.
        key = image_digest(
            image, f"{channel_axis}|{channels}|{self.loaded.identity}|{s.encode_key()}"
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
        guide = unit.astype(np.float16)
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
                out = self._encode_batch(crops, s.mode, s.key_smoothing)
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
                                                                  "auto_window")},
            plan=plan,
            guide=guide,
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
        regions: Optional[np.ndarray | str] = None,
        settings: Optional[SegmentSettings] = None,
        **overrides: Any,
    ) -> Generator[Progress, None, SegmentationResult]:
        """Read cached features against class names; yields progress per window.

        ``regions``: a label image of the image's size (0 = no region) for region voting (it
        sets the setting ``regions="labels"``), or the setting itself (``"slic"``, ...)."""
        if isinstance(regions, str):
            overrides, regions = {**overrides, "regions": regions}, None
        elif regions is not None:
            overrides = {**overrides, "regions": "labels"}
        s = self._resolve(settings, overrides)
        region_map = self._region_map(features, s, regions)
        if features.model_identity != self.loaded.identity:
            raise InvalidInputError("These features were encoded by another model; encode again.")
        if s.key_smoothing and not features.has_keys:
            raise InvalidInputError(
                "Key smoothing needs the attention keys, which these features do not hold: "
                "encode the image with key_smoothing=True."
            )
        fg, bg = self._class_lists(classes, background)
        layout = PromptLayout.from_classes(fg, bg)
        templates = resolve_templates(s.templates)
        text = self.text.embed_texts(list(layout.prompts), templates)  # Q x D
        readout = Readout(layout, text, s)

        # One window at a time (batch of 1): windows differ in place, not in how they are read.
        windows = features.windows
        window_logits = [readout.logits(w.features[None]) for w in windows]
        # Prompt denoising, decided over the whole image (all windows).
        class_max = None
        if s.denoise:
            class_max = torch.full((len(layout),), -1.0)
            for lg in window_logits:
                class_max = torch.maximum(class_max, readout.class_max(lg)[0].cpu())
        active = readout.select(class_max)
        kept = set(active.classes)
        removed = [layout.names[k] for k in range(len(layout)) if k not in kept]

        proc_h, proc_w = features.proc_shape
        patch = features.patch
        channels = len(active.classes) if s.key_smoothing else len(active.prompts)
        scores = torch.zeros(channels, proc_h, proc_w, dtype=torch.float32, device=text.device)
        total = len(windows)
        yield Progress("segment", 0, total, "reading features")
        for i, (win, lg) in enumerate(zip(windows, window_logits)):
            keys = None if win.keys is None else win.keys[None]
            cells = readout.cell_scores(lg.to(text.device), active, keys)
            box = win.box
            up = readout.upsample(cells, patch, (box.height, box.width))[0]
            scores[:, box.y0:box.y1, box.x0:box.x1] += up
            yield Progress("segment", i + 1, total, f"window {i + 1}/{total}")
        if features.plan.get("inference") == "sliding":
            window, stride = features.plan["window"], features.plan["stride"]
            rows = torch.from_numpy(coverage(proc_h, window, stride)).to(scores.device)
            cols = torch.from_numpy(coverage(proc_w, window, stride)).to(scores.device)
            scores /= rows[None, :, None] * cols[None, None, :]

        labels, probabilities = self._finish(scores, features.image_shape, readout, active,
                                             guide=features.guide, regions=region_map)
        result = SegmentationResult(
            labels=labels,
            probabilities=probabilities,
            classes=fg,
            background=bg,
            removed_classes=removed,
            settings=self._settings_record(s, features, templates),
        )
        return result

    @staticmethod
    def _region_map(
        features: ImageFeatures, s: SegmentSettings, regions: Optional[np.ndarray]
    ) -> Optional[np.ndarray]:
        """The id map for region voting (superpixels cached on the features), or None."""
        if s.regions is None:
            return None
        if s.regions == "labels":
            if regions is None:
                raise InvalidInputError(
                    "regions='labels' needs a label image: pass regions=ARRAY (same size as the image)."
                )
            return check_regions(regions, features.image_shape)
        if features.guide is None:
            raise InvalidInputError("These features hold no image for superpixels; encode again.")
        params = s.region_params()
        key = f"{s.regions}|{sorted(params.items())}"
        if key not in features.regions:
            features.regions[key] = superpixels(features.guide, s.regions, **params)
        return features.regions[key]

    @staticmethod
    def _finish(
        scores: torch.Tensor,
        size: tuple[int, int],
        readout: Readout,
        active: ActiveClasses,
        *,
        guide: Optional[np.ndarray] = None,
        regions: Optional[np.ndarray] = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores at processing size -> labels and foreground probabilities at image size, in
        blocks of rows (bounded memory on big images). PAMR reads each block with a halo of
        rows (exact); region voting takes a first pass to sum each region's probabilities."""
        height, width = size
        s = readout.settings
        fg_count = readout.layout.fg_count
        resize = tuple(scores.shape[-2:]) != (height, width)
        label_dtype = np.uint8 if fg_count <= 255 else np.uint16
        labels = np.zeros((height, width), dtype=label_dtype)
        probabilities = np.zeros((fg_count, height, width), dtype=np.float32)
        fg_rows = [(j, k) for j, k in enumerate(active.classes) if k < fg_count]
        if s.pamr and guide is None:
            raise InvalidInputError("These features hold no image to guide PAMR; encode again.")
        halo = pamr_halo(s.pamr_iterations, s.pamr_dilations) if s.pamr else 0
        rows_per_block = max(_ROW_BLOCK, 4 * halo)  # the halo's rows cost at most 1.5x
        if s.pamr and height * width <= _PAMR_WHOLE_PIXELS:
            rows_per_block = height  # small enough to refine at once: no halo rows at all

        def block_probs(y0: int, y1: int) -> torch.Tensor:
            a0, a1 = max(0, y0 - halo), min(height, y1 + halo)
            # Resample only the rows this block needs.
            block = resize_rows(scores, a0, a1, height, width) if resize else scores[:, a0:a1]
            if s.pamr:
                g = torch.from_numpy(guide[a0:a1].astype(np.float32)).permute(2, 0, 1)[None]
                block = readout.refine_pixels(block[None], g.to(block.device))[0]
            return readout.probabilities(block[None, :, y0 - a0:y1 - a0], active)[0]

        vote = None
        if regions is not None:
            vote = RegionVote(regions, len(active.classes), scores.device)
            for y0 in range(0, height, rows_per_block):
                vote.add(block_probs(y0, min(height, y0 + rows_per_block)), y0)
        for y0 in range(0, height, rows_per_block):
            y1 = min(height, y0 + rows_per_block)
            if vote is not None and vote.covers(y0, y1):
                probs = vote.voted(y0, y1)
            else:
                probs = block_probs(y0, y1)
                if vote is not None:
                    probs = vote.apply(probs, y0)
            decision = readout.label(probs[None], active)
            labels[y0:y1] = decision.labels[0].cpu().numpy().astype(label_dtype)
            probs_np = decision.probabilities[0].cpu().numpy()
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
        regions: Optional[np.ndarray | str] = None,
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
        result = yield from self.segment_iter(features, classes, background=background,
                                              regions=regions, settings=s)
        return result

    def __call__(self, image: np.ndarray, classes: ClassesLike, **kwargs: Any) -> SegmentationResult:
        """Segment ``image`` into ``classes`` (see :meth:`run_iter`)."""
        return run_to_completion(self.run_iter(image, classes, **kwargs))

