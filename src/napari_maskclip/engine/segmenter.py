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
key similarity) upsampled bilinearly to pixels. The windows are averaged where they overlap, a
band of rows at a time (:mod:`.stitch`), and resized back to the input size; the read-out then
turns each block of rows into class probabilities and labels (argmax; background classes and
low-confidence pixels 0).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Generator, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..classes import ClassesLike, ClassSpec, parse_classes
from ..errors import InvalidInputError, UnsupportedModelError
from ..progress import Progress, run_to_completion
from .dense import dense_features
from .modes import TEXT_AWARE_MODES, VIT_ONLY_MODES
from .features import FeatureCache, ImageFeatures, WindowFeatures, image_digest
from .loading import LoadedModel, load_clip
from .pamr import pamr, pamr_halo
from .precision import model_in, precision_dtype, run_precision
from .preprocess import check_image_array, plan_image
from .readout import ActiveClasses, PromptLayout, Readout
from .regions import RegionVote, check_regions, patch_regions, superpixels
from .result import SegmentationResult
from .settings import ENCODE_FIELDS, SegmentSettings
from .templates import resolve_templates
from .text import TextEmbeddingCache, TextEncoder
from .stitch import RowStitcher
from .tlp import TLPGrid
from .window_logits import mode_options, window_logits as mode_window_logits
from .windows import Box, window_boxes

__all__ = ["Segmenter"]

#: Features of one image above this are not kept: the image is streamed (see run_iter).
STREAM_BYTES = 1 << 30
#: Rows per block when PAMR / region voting finish a query (PAMR adds a halo to each block).
_REFINE_ROWS = 256
#: Images up to this many pixels are refined by PAMR in one block (no repeated halo rows).
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
        if (precision or "auto") != "auto" and self.settings.precision == "auto":
            self.settings = self._checked(self.settings.replace(precision=precision))
        self.text = TextEncoder(self.loaded, cache=text_cache)
        self.features_cache = FeatureCache(max_items=feature_cache_items)
        #: Image-encoder forward passes run so far (one per window batch).
        self.image_encoder_calls = 0
        #: Images whose features would take more bytes than this are streamed (see run_iter).
        self.stream_bytes = STREAM_BYTES

    # ---- settings --------------------------------------------------------------------------
    def _checked(self, settings: SegmentSettings) -> SegmentSettings:
        settings.validate()
        if self.loaded.kind != "vit" and (settings.pos_embed_resize, settings.partial_patches) != ("grid", "pad"):
            raise UnsupportedModelError(
                "The reference code's positional-embedding and partial-patch conventions apply to "
                f"ViT models; {self.loaded.name} is a ResNet: use pos_embed_resize='grid', "
                "partial_patches='pad'."
            )
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
    def _pixels(self, unit: np.ndarray, proc: tuple[int, int], antialias: bool = True) -> torch.Tensor:
        """0..1 HxWx3 -> normalised 1x3xhxw tensor at processing size (on the model device);
        a downscale is antialiased unless ``antialias`` is False (the reference code's resize)."""
        x = torch.from_numpy(np.ascontiguousarray(unit)).permute(2, 0, 1)[None]
        if tuple(x.shape[-2:]) != tuple(proc):
            downscale = antialias and (proc[0] < x.shape[-2] or proc[1] < x.shape[-1])
            x = F.interpolate(x, size=proc, mode="bilinear", align_corners=False, antialias=downscale)
        mean = torch.tensor(self.loaded.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.loaded.std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.loaded.device)

    def _encode_batch(self, crops: list[torch.Tensor], mode: str, with_keys: bool,
                      precision: str = "fp32", s: Optional[SegmentSettings] = None,
                      global_only: bool = False):
        s = s or self.settings
        patch = self.loaded.patch_size
        h, w = crops[0].shape[-2:]
        if self._drops_partial(s):  # the reference code: the patch conv leaves the rest out
            batch = torch.cat(crops)
        else:
            ph, pw = math.ceil(h / patch) * patch, math.ceil(w / patch) * patch
            batch = torch.cat([F.pad(c, (0, pw - w, 0, ph - h)) for c in crops])
        token_regions = self._token_regions(crops, s) if s.attention_regions else None
        batch = batch.to(precision_dtype(precision))
        self.image_encoder_calls += 1
        visual = model_in(self.loaded, precision).visual
        return dense_features(visual, batch, mode, with_keys=with_keys,
                              pos_embed_resize=s.pos_embed_resize,
                              partial_patches="drop" if self._drops_partial(s) else "pad",
                              token_regions=token_regions,
                              mode_options={**mode_options(s, self.loaded.visual),
                                            "global_only": global_only})

    def _token_regions(self, crops: list[torch.Tensor], s: SegmentSettings) -> torch.Tensor:
        """``B x gh x gw`` superpixel ids of each crop's patches (``attention_regions``): the
        superpixels of the crop as the model sees it (0..1, before normalising)."""
        mean = torch.tensor(self.loaded.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.loaded.std, dtype=torch.float32).view(1, 3, 1, 1)
        out = []
        for c in crops:
            unit = (c.float().cpu() * std + mean)[0].permute(1, 2, 0).numpy()
            labels = superpixels(unit, s.attention_regions,
                                 **s.region_params(s.attention_regions))
            grid = (self._cells(unit.shape[0], s), self._cells(unit.shape[1], s))
            out.append(torch.from_numpy(patch_regions(labels, grid, self.loaded.patch_size)))
        return torch.stack(out).long()

    def _drops_partial(self, s: SegmentSettings) -> bool:
        """Whether windows lose their partial last patch (``partial_patches="drop"``, ViT only:
        a ResNet's convolutions read every pixel)."""
        return s.partial_patches == "drop" and self.loaded.kind == "vit"

    def _cells(self, size: int, s: SegmentSettings) -> int:
        """Feature cells along a window side of ``size`` pixels."""
        patch = self.loaded.patch_size
        return size // patch if self._drops_partial(s) else math.ceil(size / patch)

    def _windows_plan(
        self,
        image: np.ndarray,
        channel_axis: Optional[int],
        channels: Optional[Sequence[int]],
        s: SegmentSettings,
    ) -> tuple[tuple[int, int], tuple[int, int], dict[str, Any], list[Box], Callable[[Box], torch.Tensor]]:
        """Image size, processing size, plan, windows, and how to get a window's network input.

        Sliding windows without a resize are prepared window by window from the raw image (only
        the windows being encoded are ever in float; bit for bit the same pixels as converting
        the whole image); otherwise the whole image is converted (and resized) once.
        """
        prepared = plan_image(image, channel_axis=channel_axis, channels=channels)
        height, width = prepared.shape
        proc = self._proc_shape(height, width, s)
        plan = self._plan(proc, s)
        if plan["inference"] == "sliding":
            boxes = window_boxes(proc[0], proc[1], plan["window"], plan["stride"])
        else:
            boxes = [Box(0, 0, proc[0], proc[1])]
        if plan["inference"] == "sliding" and proc == (height, width):
            def crop(box: Box) -> torch.Tensor:
                unit = prepared.window(box.y0, box.y1, box.x0, box.x1)
                return self._pixels(unit, (box.height, box.width))
        else:
            pixels = self._pixels(prepared.whole(), proc, s.resize_antialias)

            def crop(box: Box) -> torch.Tensor:
                return pixels[:, :, box.y0:box.y1, box.x0:box.x1]
        return (height, width), proc, plan, boxes, crop

    def _encoded(
        self, boxes: Sequence[Box], crop: Callable[[Box], torch.Tensor], mode: str,
        with_keys: bool, batch: int, precision: str, s: Optional[SegmentSettings] = None,
    ) -> Iterator[list[WindowFeatures]]:
        """The windows' dense features, ``batch`` windows per forward pass, a list per pass,
        encoded in ``precision`` (a resolved name)."""
        s = s or self.settings
        for start in range(0, len(boxes), batch):
            group = boxes[start:start + batch]
            crops = [crop(b) for b in group]
            with torch.no_grad():
                out = self._encode_batch(crops, mode, with_keys, precision, s)
            del crops
            encoded = []
            for i, box in enumerate(group):
                gh, gw = self._cells(box.height, s), self._cells(box.width, s)
                feat = out.features[i, :, :gh, :gw].contiguous()
                keys = None
                if out.keys is not None:
                    full_w = out.features.shape[-1]
                    grid_keys = out.keys[i].reshape(out.features.shape[-2], full_w, -1)
                    keys = grid_keys[:gh, :gw].reshape(gh * gw, -1).contiguous()
                state = {name: t[i] for name, t in out.state.items()}
                if mode == "resclip" and (gh, gw) != tuple(out.features.shape[-2:]):
                    raise InvalidInputError("ResCLIP reads windows of one size per batch: use "
                                            "window_batch=1.")  # pragma: no cover - guard
                encoded.append(WindowFeatures(box=box, features=feat, keys=keys, state=state))
            yield encoded

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
        shape, proc, plan, boxes, crop = self._windows_plan(image, channel_axis, channels, s)
        total = len(boxes)
        yield Progress("encode", 0, total, f"encoding {total} window(s)")
        windows: list[WindowFeatures] = []
        for group in self._encoded(boxes, crop, s.mode, s.key_smoothing, s.window_batch,
                                   precision, s):
            windows.extend(group)
            yield Progress("encode", len(windows), total, f"window {len(windows)}/{total}")
        if self._image_global(s, plan):  # RF-CLIP's global embedding of the whole image
            glob = self._rfclip_image_global(image, channel_axis, channels, proc, s, precision)
            for w in windows:
                w.state["global"] = glob
        features = self._features(key, shape, proc, plan, s, windows, precision)
        features.source = plan_image(image, channel_axis=channel_axis, channels=channels)
        self.features_cache.put(features)
        return features

    @staticmethod
    def _image_global(s: SegmentSettings, plan: dict[str, Any]) -> bool:
        """Whether RF-CLIP's windows take the whole image's global embedding (not their own)."""
        return s.mode == "rfclip" and s.rfclip_global == "image" and plan["inference"] == "sliding"

    def _rfclip_image_global(self, image: np.ndarray, channel_axis: Optional[int],
                             channels: Optional[Sequence[int]], proc: tuple[int, int],
                             s: SegmentSettings, precision: str) -> torch.Tensor:
        """RF-CLIP's global embedding (``D``) of the whole image at processing size (scaled down
        to ``max_whole_pixels`` when larger: one bounded encoder pass)."""
        prepared = plan_image(image, channel_axis=channel_axis, channels=channels)
        size = proc
        if proc[0] * proc[1] > s.max_whole_pixels:
            f = math.sqrt(s.max_whole_pixels / (proc[0] * proc[1]))
            size = (max(self.loaded.patch_size, int(proc[0] * f)),
                    max(self.loaded.patch_size, int(proc[1] * f)))
        pixels = self._pixels(prepared.whole(), size, s.resize_antialias)
        out = self._encode_batch([pixels], "rfclip", False, precision,
                                 s.replace(attention_regions=None), global_only=True)
        return out.state["global"][0]

    def _window_logits(self, query: "_Query", window: WindowFeatures,
                       encoded: dict[str, Any]) -> torch.Tensor:
        """``1 x Q x gh x gw`` logits of one window (:mod:`.window_logits`); ``encoded``: the
        encode settings of its features."""
        mode = encoded.get("mode", "maskclip")
        if mode not in TEXT_AWARE_MODES:
            return query.logits(window.features)
        state = {k: v[None] for k, v in window.state.items()}
        precision = encoded.get("precision") or self.precision()
        visual = model_in(self.loaded, precision).visual
        return mode_window_logits(query.readout, window.features[None], state, mode, encoded,
                             visual, self.loaded.patch_size)

    def _features(
        self, key: str, shape: tuple[int, int], proc: tuple[int, int], plan: dict[str, Any],
        s: SegmentSettings, windows: list[WindowFeatures], precision: str,
    ) -> ImageFeatures:
        return ImageFeatures(
            key=key,
            image_shape=shape,
            proc_shape=proc,
            patch=self.loaded.patch_size,
            windows=windows,
            model_identity=self.loaded.identity,
            encode_settings={name: _plain(getattr(s, name)) for name in ENCODE_FIELDS
                             if name != "precision"} | {"precision": precision},
            plan=plan,
        )

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

    def _query(self, fg: list[ClassSpec], bg: list[ClassSpec], s: SegmentSettings,
               precision: str) -> "_Query":
        """The classes' read-out; the text encoded in ``precision`` (that of the image features)."""
        layout = PromptLayout.from_classes(fg, bg)
        templates = resolve_templates(s.templates)
        text = self.text.embed_texts(list(layout.prompts), templates, precision=precision)  # Q x D
        norm = (tuple(self.loaded.mean), tuple(self.loaded.std))
        return _Query(fg, bg, Readout(layout, text, s, guide_norm=norm), templates)

    def segment_iter(
        self,
        features: ImageFeatures,
        classes: ClassesLike,
        *,
        background: Optional[ClassesLike] = None,
        regions: Optional[np.ndarray | str] = None,
        settings: Optional[SegmentSettings] = None,
        probabilities: "ProbabilitiesOut" = True,
        **overrides: Any,
    ) -> Generator[Progress, None, SegmentationResult]:
        """Read cached features against class names; yields progress per window.

        ``regions``: a label image of the image's size (0 = no region) for region voting (it
        sets the setting ``regions="labels"``), or the setting itself (``"slic"``, ...).

        ``probabilities``: True (the result holds the ``C x H x W`` maps), False (it holds None:
        labels only, 4 bytes per pixel and class less memory), or a callable
        ``sink(y0, y1, block)`` given the float32 ``C x (y1 - y0) x W`` maps of each block of
        rows as they are finished (the result holds None).
        """
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
        # Text in the precision of the image features (what the result records).
        query = self._query(fg, bg, s, features.encode_settings.get("precision", self.precision(s)))
        windows = features.windows
        encoded = features.encode_settings
        window_logits = [self._window_logits(query, w, encoded) for w in windows]
        result = yield from self._read(query, s, features, [w.box for w in windows], window_logits,
                                       lambda i: windows[i].keys, probabilities, region_map)
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
        if features.source is None:
            raise InvalidInputError("These features hold no image for superpixels; encode again.")
        params = s.region_params()
        key = f"{s.regions}|{sorted(params.items())}"
        if key not in features.regions:
            features.regions[key] = superpixels(features.guide(), s.regions, **params)
        return features.regions[key]

    def _read(
        self,
        query: "_Query",
        s: SegmentSettings,
        features: ImageFeatures,
        boxes: Sequence[Box],
        window_logits: list[Optional[torch.Tensor]],
        keys_of: Callable[[int], Optional[torch.Tensor]],
        probabilities: "ProbabilitiesOut",
        regions: Optional[np.ndarray] = None,
    ) -> Generator[Progress, None, SegmentationResult]:
        """Window cosines -> denoising -> window scores -> stitched rows -> labels, probabilities.

        The windows' scores are summed a band of rows at a time (:class:`RowStitcher`), so the
        memory is the band, not ``C x H x W``.
        """
        readout = query.readout
        layout = readout.layout
        # Prompt denoising, decided over the whole image (all windows).
        class_max = None
        if s.denoise:
            class_max = torch.full((len(layout),), -1.0)
            for lg in window_logits:
                class_max = torch.maximum(class_max, readout.class_max(lg)[0].cpu())
        active = readout.select(class_max)
        kept = set(active.classes)
        removed = [layout.names[k] for k in range(len(layout)) if k not in kept]

        patch = features.patch
        channels = len(active.classes) if s.key_smoothing else len(active.prompts)
        device = readout.text.device
        stitch = RowStitcher(channels, features.proc_shape, features.image_shape, features.plan,
                             device=device)
        out = _Outputs(features.image_shape, readout, active, probabilities)
        refine = s.pamr or s.tlp or regions is not None
        if refine:  # PAMR, TLP and region voting need other rows / every row: keep the scores
            if (s.pamr or s.tlp) and features.source is None:
                raise InvalidInputError("These features hold no image to guide PAMR or TLP; "
                                        "encode again.")
            full = torch.zeros(channels, *features.image_shape, dtype=torch.float32, device=device)

            def finish(y0: int, y1: int, block: torch.Tensor) -> None:
                full[:, y0:y1] = block
        else:
            finish = out.finish
        total = len(boxes)
        yield Progress("segment", 0, total, "reading features")
        for i, box in enumerate(boxes):
            lg = window_logits[i].to(device)
            window_logits[i] = None  # read: its memory can go
            keys = keys_of(i) if s.key_smoothing else None
            cells = readout.cell_scores(lg, active, None if keys is None else keys[None])
            up = readout.upsample(cells, patch, (box.height, box.width),
                                  stretch=features.encode_settings.get("partial_patches") == "drop")[0]
            for y0, y1, block in stitch.add(box, up):
                finish(y0, y1, block)
            yield Progress("segment", i + 1, total, f"window {i + 1}/{total}")
        for y0, y1, block in stitch.close():
            finish(y0, y1, block)
        if refine:
            _refined(full, out, readout, active, self._guide(features, s), regions)

        return SegmentationResult(
            labels=out.labels,
            probabilities=out.probabilities,
            classes=query.fg,
            background=query.bg,
            removed_classes=removed,
            settings=self._settings_record(s, features, query.templates),
        )

    def _guide(self, features: ImageFeatures, s: SegmentSettings) -> Callable[[int, int], np.ndarray]:
        """PAMR's and TLP's guide, rows ``y0..y1`` (``h x W x 3``, 0..1): the image as encoded,
        or with ``refine_guide="resized"`` resized to the processing size and back (the
        reference code's guide; computed once per features and kept with them)."""
        if s.refine_guide != "resized" or features.source is None:
            return features.guide
        key = f"resized|{features.proc_shape}|{s.resize_antialias}"
        if key not in features.guides:
            height, width = features.image_shape
            unit = features.source.whole()
            x = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32)).permute(2, 0, 1)[None]
            proc = tuple(features.proc_shape)
            if proc != (height, width):
                down = s.resize_antialias and (proc[0] < height or proc[1] < width)
                x = F.interpolate(x, size=proc, mode="bilinear", align_corners=False, antialias=down)
                x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
            features.guides[key] = x[0].permute(1, 2, 0).contiguous().numpy()
        guide = features.guides[key]
        return lambda y0, y1: guide[y0:y1]

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
        probabilities: "ProbabilitiesOut" = True,
        **overrides: Any,
    ) -> Generator[Progress, None, SegmentationResult]:
        """Encode (or reuse cached features) and query, as one generator.

        An image whose features would take more than :attr:`stream_bytes` (a huge image: 4 GB
        for 16000^2 px with the demo model) is streamed instead: each window is encoded, read
        against the text and its features dropped, so memory holds only the small per-window
        cosines (with key smoothing each window is encoded a second time, for its keys). Labels
        and maps are the same; nothing is cached for a re-query. ``probabilities``: see
        :meth:`segment_iter`.
        """
        s = self._resolve(settings, overrides)
        # Validate the class list before the expensive part.
        self._class_lists(classes, background)
        image = check_image_array(image)
        if self._feature_bytes(image.shape, channel_axis, s) > self.stream_bytes:
            if s.pamr or s.tlp or s.regions is not None or regions is not None:
                raise InvalidInputError(
                    "PAMR, TLP and region voting need the whole image's scores, which a streamed "
                    "image this large does not keep: turn them off, or segment a smaller image."
                )
            result = yield from self._stream_iter(image, classes, background, channel_axis,
                                                  channels, s, probabilities)
            return result
        features = yield from self.encode_iter(
            image, channel_axis=channel_axis, channels=channels, settings=s
        )
        result = yield from self.segment_iter(features, classes, background=background,
                                              regions=regions, settings=s,
                                              probabilities=probabilities)
        return result

    def _feature_bytes(
        self, shape: Sequence[int], channel_axis: Optional[int], s: SegmentSettings
    ) -> int:
        """What the encoded features of an image of ``shape`` would take (from its size only)."""
        dims = list(shape)
        if len(dims) == 3:
            axis = channel_axis if channel_axis is not None else -1
            if not -3 <= axis < 3:
                return 0  # the real run says what is wrong
            del dims[axis]
        if len(dims) != 2:
            return 0  # not an image: the real run says so
        try:
            proc = self._proc_shape(dims[0], dims[1], s)
            plan = self._plan(proc, s)
        except InvalidInputError:
            return 0
        patch = self.loaded.patch_size
        if plan["inference"] == "sliding":
            boxes = window_boxes(proc[0], proc[1], plan["window"], plan["stride"])
        else:
            boxes = [Box(0, 0, proc[0], proc[1])]
        cells = sum(math.ceil(b.height / patch) * math.ceil(b.width / patch) for b in boxes)
        dim = int(getattr(self.loaded.visual, "output_dim", 512) or 512)
        itemsize = torch.finfo(precision_dtype(self.precision(s))).bits // 8
        per_cell = dim * (2 if s.key_smoothing else 1) * itemsize
        if s.mode == "resclip" and self.loaded.kind == "vit":  # its state: tokens and pixels
            from .resclip import state_bytes_per_cell

            visual = self.loaded.visual
            per_cell += state_bytes_per_cell(int(visual.conv1.weight.shape[0]),
                                             len(visual.transformer.resblocks), patch, itemsize)
        return cells * per_cell

    def _stream_iter(
        self,
        image: np.ndarray,
        classes: ClassesLike,
        background: Optional[ClassesLike],
        channel_axis: Optional[int],
        channels: Optional[Sequence[int]],
        s: SegmentSettings,
        probabilities: "ProbabilitiesOut",
    ) -> Generator[Progress, None, SegmentationResult]:
        """Encode and read window by window, keeping only each window's cosines (see run_iter)."""
        shape, proc, plan, boxes, crop = self._windows_plan(image, channel_axis, channels, s)
        fg, bg = self._class_lists(classes, background)
        precision = self.precision(s)
        query = self._query(fg, bg, s, precision)
        total = len(boxes)
        yield Progress("encode", 0, total, f"encoding {total} window(s), streamed")
        window_logits: list[Optional[torch.Tensor]] = []
        encoded = {name: getattr(s, name) for name in ENCODE_FIELDS} | {"precision": precision}
        glob = (self._rfclip_image_global(image, channel_axis, channels, proc, s, precision)
                if self._image_global(s, plan) else None)
        for group in self._encoded(boxes, crop, s.mode, False, s.window_batch, precision, s):
            for w in group:
                if glob is not None:
                    w.state["global"] = glob
                window_logits.append(self._window_logits(query, w, encoded))
            yield Progress("encode", len(window_logits), total, f"window {len(window_logits)}/{total}")

        def keys_of(i: int) -> Optional[torch.Tensor]:  # key smoothing: encode the window again
            (window,) = next(self._encoded([boxes[i]], crop, s.mode, True, 1, precision, s))
            return window.keys

        meta = self._features("", shape, proc, plan, s, [], precision)
        result = yield from self._read(query, s, meta, boxes, window_logits, keys_of, probabilities)
        return result

    def __call__(self, image: np.ndarray, classes: ClassesLike, **kwargs: Any) -> SegmentationResult:
        """Segment ``image`` into ``classes`` (see :meth:`run_iter`)."""
        return run_to_completion(self.run_iter(image, classes, **kwargs))


ProbabilitiesOut = Union[bool, Callable[[int, int, np.ndarray], None]]


def _plain(value: Any) -> Any:
    """A setting as JSON holds it (tuples as lists), for the settings a result records."""
    return list(value) if isinstance(value, tuple) else value



class _Query:
    """The classes of one query and their read-out (prompt layout and prompt embeddings)."""

    def __init__(self, fg: list[ClassSpec], bg: list[ClassSpec], readout: Readout,
                 templates: Sequence[str]) -> None:
        self.fg, self.bg, self.readout, self.templates = fg, bg, readout, templates

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``D x h x w`` features -> ``1 x Q x h x w`` cosines with every prompt."""
        return self.readout.logits(features[None])


class _Outputs:
    """Labels and class probabilities at image size, filled block of rows by block of rows."""

    def __init__(self, size: tuple[int, int], readout: Readout, active: ActiveClasses,
                 probabilities: ProbabilitiesOut) -> None:
        height, width = size
        self.readout, self.active, self.width = readout, active, width
        self.fg_count = fg_count = readout.layout.fg_count
        self.label_dtype = np.uint8 if fg_count <= 255 else np.uint16
        self.labels = np.zeros((height, width), dtype=self.label_dtype)
        self.probabilities = (np.zeros((fg_count, height, width), dtype=np.float32)
                              if probabilities is True else None)
        self.sink = probabilities if callable(probabilities) else None
        self.fg_rows = [(j, k) for j, k in enumerate(active.classes) if k < fg_count]

    def finish(self, y0: int, y1: int, block: torch.Tensor) -> None:
        """Scores of output rows ``y0..y1`` -> their probabilities and labels."""
        self.finish_probs(y0, y1, self.readout.probabilities(block[None], self.active)[0])

    def finish_probs(self, y0: int, y1: int, probs: torch.Tensor) -> None:
        """Class probabilities (``K' x rows x W``) of output rows ``y0..y1`` -> labels, maps."""
        decision = self.readout.label(probs[None], self.active)
        self.labels[y0:y1] = decision.labels[0].cpu().numpy().astype(self.label_dtype)
        if self.probabilities is None and self.sink is None:
            return
        probs_np = decision.probabilities[0].cpu().numpy()
        if self.probabilities is not None:
            for j, k in self.fg_rows:
                self.probabilities[k, y0:y1] = probs_np[j]
        if self.sink is not None:
            part = np.zeros((self.fg_count, y1 - y0, self.width), dtype=np.float32)
            for j, k in self.fg_rows:
                part[k] = probs_np[j]
            self.sink(y0, y1, part)


def _refined(
    scores: torch.Tensor,
    out: _Outputs,
    readout: Readout,
    active: ActiveClasses,
    guide: Callable[[int, int], np.ndarray],
    regions: Optional[np.ndarray],
) -> None:
    """Image-size scores -> PAMR (blocks of rows with an exact halo) -> region voting (a first
    pass sums each region's probabilities) -> labels and maps in ``out``."""
    s = readout.settings
    height, width = scores.shape[-2:]
    halo = pamr_halo(s.pamr_iterations, s.pamr_dilations) if s.pamr else 0
    rows = max(_REFINE_ROWS, 4 * halo)  # the halo's rows cost at most 1.5x
    if s.pamr and height * width <= _PAMR_WHOLE_PIXELS:
        rows = height  # small enough to refine at once: no halo rows at all
    grid = None
    if s.tlp:  # blocks start at multiples of TLP's pooling rows
        grid = TLPGrid(height, width, scores.shape[0], grid=s.tlp_grid, device=scores.device)
        step = grid.factors[0]
        rows = -(-rows // step) * step

    def block_scores(y0: int, y1: int) -> torch.Tensor:
        a0, a1 = max(0, y0 - halo), min(height, y1 + halo)
        block = scores[:, a0:a1]
        if s.pamr:
            g = torch.from_numpy(guide(a0, a1)).permute(2, 0, 1)[None]
            block = pamr(g.to(block.device), block[None], iterations=s.pamr_iterations,
                         dilations=s.pamr_dilations)[0]
        return block[:, y0 - a0:y1 - a0]

    if grid is not None:  # pass 0: every block pooled into TLP's cells, then one solve
        for y0 in range(0, height, rows):
            y1 = min(height, y0 + rows)
            g = torch.from_numpy(guide(y0, y1)).permute(2, 0, 1).to(scores.device)
            grid.add(block_scores(y0, y1), readout.tlp_guide(g), y0)
        grid.solve(readout.tlp_diagonal(active), s.tlp_iterations)

    def block_probs(y0: int, y1: int) -> torch.Tensor:
        block = grid.rows(y0, y1) if grid is not None else block_scores(y0, y1)
        return readout.probabilities(block[None], active)[0]

    vote = None
    if regions is not None:
        vote = RegionVote(regions, len(active.classes), scores.device, s.region_vote)
        for y0 in range(0, height, rows):
            vote.add(block_probs(y0, min(height, y0 + rows)), y0)
    for y0 in range(0, height, rows):
        y1 = min(height, y0 + rows)
        if vote is not None and vote.covers(y0, y1):
            probs = vote.voted(y0, y1)
        else:
            probs = block_probs(y0, y1)
            if vote is not None:
                probs = vote.apply(probs, y0)
        out.finish_probs(y0, y1, probs)
