"""The settings of a MaskCLIP run, with the paper's defaults.

Settings split in two groups. *Encode* settings change the image features (attention mode,
windows, resizing, precision, whether keys are kept for key smoothing, RF-CLIP's channels and
global embedding, ResCLIP's base attention and RCS weights); changing one re-runs the image
encoder. *Query* settings (denoising, temperature, templates, background, PAMR, TLP, region
voting, RF-CLIP's and ResCLIP's text-side weights) only change how cached features are read
against text, so changing them needs no encoder pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..errors import InvalidInputError
from .modes import MODES, RESCLIP_BASES
from .precision import PRECISIONS
from .templates import TEMPLATE_SETS, resolve_templates

__all__ = ["SegmentSettings", "ENCODE_FIELDS", "REGION_SOURCES", "POS_EMBED_RESIZES", "PARTIAL_PATCHES",
           "REGION_VOTES", "REFINE_GUIDES", "RFCLIP_GLOBALS"]

#: Fields whose change requires re-encoding the image.
ENCODE_FIELDS = ("mode", "window", "stride", "short_side", "max_whole_pixels", "auto_window",
                 "precision", "pos_embed_resize", "partial_patches", "resize_antialias",
                 "attention_regions", "rfclip_channels", "rfclip_global", "resclip_base",
                 "resclip_rcs_weights")
#: Where region voting's regions come from (kept torch- and skimage-free for UIs and CLIs).
REGION_SOURCES = ("slic", "felzenszwalb", "labels")
#: Fields added after CLI results were first written; left out of a run's request digest at
#: their defaults (see :meth:`SegmentSettings.request_dict`). Append every new field here.
LATE_FIELDS = ("pos_embed_resize", "partial_patches", "resize_antialias", "attention_regions",
               "rfclip_channels", "rfclip_global", "rfclip_global_weight", "rfclip_text_weight",
               "rfclip_cluster_threshold", "resclip_base", "resclip_rcs_weights",
               "resclip_sfr_weights", "resclip_temp_threshold", "resclip_delete_same_entity",
               "tlp", "tlp_iterations", "tlp_grid", "refine_guide", "region_vote")
#: Region voting's rule: mean probability per region, or CorrCLIP's most frequent label.
REGION_VOTES = ("mean", "majority")
#: The image PAMR and TLP are guided by: as given, or resized to the processing size and back
#: (the reference code's ``interpolate(inputs, ori_shape)``).
REFINE_GUIDES = ("original", "resized")
#: RF-CLIP's global embedding: each window's own, or the whole image's at processing size.
RFCLIP_GLOBALS = ("window", "image")
#: Fields holding tuples (lists in JSON).
_TUPLE_FIELDS = ("templates", "pamr_dilations", "rfclip_channels", "resclip_rcs_weights",
                 "resclip_sfr_weights")
#: Conventions (see :mod:`.presets`): this project's first, then the reference code's.
POS_EMBED_RESIZES = ("grid", "scale_factor")
PARTIAL_PATCHES = ("pad", "drop")


@dataclass(frozen=True)
class SegmentSettings:
    """How MaskCLIP reads an image. Defaults follow the paper (see ``../shared/method.md``)."""

    #: Last-block read-out: ``maskclip`` (paper), ``sclip``, ``clearclip``, ``naclip`` (ViT only),
    #: or ``naive`` (unmodified last layer; a baseline).
    mode: str = "maskclip"
    #: Sliding-window crop in pixels (after resizing); ``None`` = the whole image at once, unless
    #: it has more than ``max_whole_pixels``, then windows of ``auto_window``.
    window: Optional[int] = None
    #: Step between windows; default half the window.
    stride: Optional[int] = None
    #: Resize so that the short side has this many pixels before inference (``None``: as is).
    short_side: Optional[int] = None
    #: Largest image (in pixels, after resizing) read whole; larger ones use sliding windows so
    #: memory stays bounded.
    max_whole_pixels: int = 1024 * 1024
    #: Window used when a large image switches to sliding windows (default: 2x the model's native
    #: input size, e.g. 448 for ViT-B-16).
    auto_window: Optional[int] = None
    #: Key smoothing (paper eq. 5); off by default as in the official configs ("aggressive").
    key_smoothing: bool = False
    #: Only positions whose max probability is below this are smoothed (1.0 = all).
    ks_threshold: float = 1.0
    #: Prompt denoising: drop classes whose max probability over the image stays below the
    #: threshold.
    denoise: bool = True
    denoise_threshold: float = 0.5
    #: Softmax temperature (scale on cosines): 100 as CLIP and MaskCLIP; successors use 40-50.
    logit_scale: float = 100.0
    #: ``maskclip85`` (85 templates), ``single`` ("a photo of a {}."), or a tuple of templates.
    templates: Union[str, tuple[str, ...]] = "maskclip85"
    #: Pixels whose max class probability is below this become background (0); ``None``: off.
    background_threshold: Optional[float] = None
    #: Windows encoded per forward pass (more is faster on a GPU; 1 keeps CPU memory low).
    window_batch: int = 1
    #: PAMR (pixel-adaptive mask refinement, as SCLIP/NACLIP's official code): the prompt
    #: scores at image resolution, refined by local colour affinity before the softmax.
    pamr: bool = False
    pamr_iterations: int = 10
    pamr_dilations: tuple[int, ...] = (8, 16)
    #: Region voting: every pixel of a region gets the region's mean class probabilities.
    #: ``slic`` / ``felzenszwalb`` (superpixels of the image), ``labels`` (a label image the
    #: caller gives, e.g. ``Segmenter.segment(..., regions=array)``), or ``None`` (off).
    regions: Optional[str] = None
    slic_segments: int = 400
    slic_compactness: float = 10.0
    felzenszwalb_scale: float = 100.0
    felzenszwalb_sigma: float = 0.8
    felzenszwalb_min_size: int = 50
    #: The paper preset these settings started from (recorded only; see :mod:`.presets`).
    preset: Optional[str] = None
    #: Precision of the image and text encoders (one of :data:`PRECISIONS`): ``auto`` is the
    #: model's (bf16 on a CPU with native bf16, fp32 on other CPUs, fp16 on GPUs). The read-out
    #: after the encoders is fp32 in every precision; results record the precision used.
    precision: str = "auto"
    #: Conventions of the successors' reference code, for reproducing a paper exactly (presets set
    #: them; see :mod:`.presets`). Positional embedding resized to the exact patch grid
    #: (``grid``) or by the reference's scale factor ``(grid + 0.1) / native`` (``scale_factor``).
    pos_embed_resize: str = "grid"
    #: A window whose size is not a multiple of the patch: padded to whole patches (``pad``), or
    #: its last partial patch dropped and the cell scores stretched over the window (``drop``).
    partial_patches: str = "pad"
    #: Downscaling to ``short_side`` with antialiasing (True), or plain bilinear as mmseg/cv2.
    resize_antialias: bool = True
    #: CorrCLIP's restriction: in the last block each patch attends only to patches of its own
    #: superpixel (``slic`` / ``felzenszwalb`` with the parameters below, per window, sampled
    #: at patch centres); modes sclip, clearclip, naclip. Encode-time: it changes the features.
    attention_regions: Optional[str] = None
    #: RF-CLIP (mode ``rfclip``): the distraction channels (None: the published ones for the
    #: model's width, ViT-B/16 and ViT-L/14, else an estimate; see :mod:`.rfclip`). Encode-time.
    rfclip_channels: Optional[tuple[int, ...]] = None
    #: Whose class embedding enters the logits: each window's own (``window``) or the whole
    #: image's at processing size (``image``, the reference's sliding-window inference; more
    #: encoder work). Encode-time.
    rfclip_global: str = "window"
    #: Query-time weights (defaults: its PASCAL Context config): of the global image-text
    #: similarity in every cell's logits, of the patch mean in each cluster's adjusted prompt,
    #: and the cosine distance that cuts the prompt clustering.
    rfclip_global_weight: float = 0.25
    rfclip_text_weight: float = 0.04
    rfclip_cluster_threshold: float = 0.09
    #: ResCLIP (mode ``resclip``): the last block's base attention (``naclip`` as its configs,
    #: ``clearclip``, ``sclip``) and the RCS weights (tau, lambda): encode-time.
    resclip_base: str = "naclip"
    resclip_rcs_weights: tuple[float, float] = (2.0, 0.4)
    #: Query-time (its text feedback; defaults: its PASCAL Context config): SFR weights (tau,
    #: lambda), the probability below which a pixel's temporary label is prompt 0, and whether
    #: same-label patches not joined by a straight same-label path are decayed.
    resclip_sfr_weights: tuple[float, float] = (1.8, 0.7)
    resclip_temp_threshold: float = 0.25
    resclip_delete_same_entity: bool = True
    #: TLP (PEARL's text-aware Laplacian propagation, :mod:`.tlp`): a few conjugate-gradient
    #: steps on a grid of about ``tlp_grid`` cells a side, after PAMR. Query-time.
    tlp: bool = False
    tlp_iterations: int = 25
    tlp_grid: int = 80
    #: PAMR's and TLP's guide: the image as given (``original``) or resized to the processing size
    #: and back (``resized``, the reference code's; the successors' presets set it).
    refine_guide: str = "original"
    #: Region voting's rule: each region's mean probabilities (``mean``), or its most frequent
    #: label (``majority``, CorrCLIP's; the maps then hold each class's share of the region).
    region_vote: str = "mean"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_preset(cls, name: str, **changes: Any) -> "SegmentSettings":
        """A paper's evaluation settings (:mod:`.presets`), then ``changes``; records ``preset``."""
        from .presets import preset_settings

        return cls().replace(**preset_settings(name)).replace(**changes)

    def replace(self, **changes: Any) -> "SegmentSettings":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidInputError(f"Unknown setting(s): {', '.join(sorted(unknown))}.")
        for name in _TUPLE_FIELDS:
            if isinstance(changes.get(name), list):
                changes[name] = tuple(changes[name])
        return dataclasses.replace(self, **changes)

    def validate(self) -> "SegmentSettings":
        """Raise :class:`InvalidInputError` with a clear message for impossible values."""
        if self.mode not in MODES:
            raise InvalidInputError(f"Unknown mode {self.mode!r}: use one of {', '.join(MODES)}.")
        for name in ("window", "stride", "short_side", "auto_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise InvalidInputError(f"{name} must be a positive whole number of pixels, got {value!r}.")
        if self.stride is not None and self.window is not None and self.stride > self.window:
            raise InvalidInputError(
                f"stride ({self.stride}) is larger than the window ({self.window}): pixels between "
                "windows would be skipped. Use a stride at most the window size."
            )
        if self.max_whole_pixels <= 0:
            raise InvalidInputError("max_whole_pixels must be positive.")
        for name in ("denoise_threshold", "ks_threshold"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise InvalidInputError(f"{name} must lie in 0..1, got {value}.")
        if self.background_threshold is not None and not 0.0 <= self.background_threshold <= 1.0:
            raise InvalidInputError(
                f"background_threshold must lie in 0..1, got {self.background_threshold}."
            )
        if not self.logit_scale > 0:
            raise InvalidInputError(f"logit_scale must be positive, got {self.logit_scale}.")
        if self.window_batch < 1:
            raise InvalidInputError("window_batch must be at least 1.")
        if self.precision not in PRECISIONS:
            raise InvalidInputError(
                f"Unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}."
            )
        if isinstance(self.templates, str) and self.templates not in TEMPLATE_SETS and "{}" not in self.templates:
            raise InvalidInputError(
                f"Unknown template set {self.templates!r}: use {', '.join(TEMPLATE_SETS)} or your own."
            )
        if not isinstance(self.templates, str):
            resolve_templates(self.templates)  # a custom list: each needs exactly one "{}"
        self._validate_refinements()
        if self.pos_embed_resize not in POS_EMBED_RESIZES:
            raise InvalidInputError(f"pos_embed_resize must be one of {', '.join(POS_EMBED_RESIZES)}, "
                                    f"got {self.pos_embed_resize!r}.")
        if self.attention_regions not in (None, "slic", "felzenszwalb"):
            raise InvalidInputError(f"attention_regions must be slic, felzenszwalb or none, got "
                                    f"{self.attention_regions!r}.")
        if self.attention_regions is not None and self.mode not in ("sclip", "clearclip", "naclip"):
            raise InvalidInputError(
                "attention_regions restricts the last block's attention between patches: use mode "
                f"sclip, clearclip or naclip (mode {self.mode!r} does not mix patches there)."
            )
        if self.partial_patches not in PARTIAL_PATCHES:
            raise InvalidInputError(f"partial_patches must be one of {', '.join(PARTIAL_PATCHES)}, "
                                    f"got {self.partial_patches!r}.")
        self._validate_readouts()
        return self

    def _validate_readouts(self) -> None:
        """RF-CLIP's and ResCLIP's settings."""
        channels = self.rfclip_channels
        if channels is not None and (not channels or any(
                not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in channels)):
            raise InvalidInputError(f"rfclip_channels must be channel indices >= 0, got {channels!r}.")
        if self.rfclip_global not in RFCLIP_GLOBALS:
            raise InvalidInputError(f"rfclip_global must be one of {', '.join(RFCLIP_GLOBALS)}, "
                                    f"got {self.rfclip_global!r}.")
        for name in ("rfclip_global_weight", "rfclip_text_weight", "resclip_temp_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise InvalidInputError(f"{name} must lie in 0..1, got {value!r}.")
        if not isinstance(self.rfclip_cluster_threshold, (int, float)) or not 0.0 <= self.rfclip_cluster_threshold <= 2.0:
            raise InvalidInputError("rfclip_cluster_threshold is a cosine distance in 0..2, got "
                                    f"{self.rfclip_cluster_threshold!r}.")
        if self.resclip_base not in RESCLIP_BASES:
            raise InvalidInputError(f"resclip_base must be one of {', '.join(RESCLIP_BASES)}, "
                                    f"got {self.resclip_base!r}.")
        for name in ("resclip_rcs_weights", "resclip_sfr_weights"):
            value = getattr(self, name)
            if (not isinstance(value, tuple) or len(value) != 2
                    or any(not isinstance(v, (int, float)) for v in value)
                    or not value[0] > 0 or not 0.0 <= value[1] <= 1.0):
                raise InvalidInputError(f"{name} must be (tau > 0, lambda in 0..1), got {value!r}.")

    def _validate_refinements(self) -> None:
        if not isinstance(self.pamr_iterations, int) or self.pamr_iterations < 0:
            raise InvalidInputError(f"pamr_iterations must be a whole number >= 0, got {self.pamr_iterations!r}.")
        dil = self.pamr_dilations
        if not dil or any(not isinstance(d, int) or d < 1 for d in dil):
            raise InvalidInputError(f"pamr_dilations must be whole numbers >= 1, got {dil!r}.")
        if self.regions not in (None, *REGION_SOURCES):
            raise InvalidInputError(
                f"Unknown regions {self.regions!r}: use {', '.join(REGION_SOURCES)} or none."
            )
        if not isinstance(self.tlp_iterations, int) or self.tlp_iterations < 0:
            raise InvalidInputError(f"tlp_iterations must be a whole number >= 0, got {self.tlp_iterations!r}.")
        if not isinstance(self.tlp_grid, int) or not 1 <= self.tlp_grid <= 1024:
            raise InvalidInputError(f"tlp_grid must be a whole number of cells in 1..1024, got {self.tlp_grid!r}.")
        if self.refine_guide not in REFINE_GUIDES:
            raise InvalidInputError(f"refine_guide must be one of {', '.join(REFINE_GUIDES)}, "
                                    f"got {self.refine_guide!r}.")
        if self.region_vote not in REGION_VOTES:
            raise InvalidInputError(f"region_vote must be one of {', '.join(REGION_VOTES)}, "
                                    f"got {self.region_vote!r}.")
        if self.slic_segments < 1 or self.felzenszwalb_min_size < 1:
            raise InvalidInputError("slic_segments and felzenszwalb_min_size must be at least 1.")
        if not (self.slic_compactness > 0 and self.felzenszwalb_scale > 0 and self.felzenszwalb_sigma >= 0):
            raise InvalidInputError(
                "slic_compactness and felzenszwalb_scale must be positive, felzenszwalb_sigma >= 0."
            )

    def region_params(self, method: Optional[str] = None) -> dict[str, Any]:
        """The superpixel parameters of ``method`` (default: ``regions``; empty for user labels
        or none)."""
        method = self.regions if method is None else method
        if method == "slic":
            return {"n_segments": self.slic_segments, "compactness": self.slic_compactness}
        if method == "felzenszwalb":
            return {"scale": self.felzenszwalb_scale, "sigma": self.felzenszwalb_sigma,
                    "min_size": self.felzenszwalb_min_size}
        return {}

    def encode_key(self) -> tuple[Any, ...]:
        """The part of the settings that determines image features."""
        key = tuple(getattr(self, name) for name in ENCODE_FIELDS)
        if self.attention_regions is not None:  # its superpixels' parameters shape the features
            key += (tuple(sorted(self.region_params(self.attention_regions).items())),)
        return key

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for name in _TUPLE_FIELDS:
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        return out

    def request_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the fields added later (:data:`LATE_FIELDS`) while they hold
        their defaults: what a CLI run's request digest hashes, so results written before a
        field existed are still recognised as finished by a rerun with the same options."""
        defaults = type(self)()
        return {k: v for k, v in self.to_dict().items()
                if not (k in LATE_FIELDS and getattr(self, k) == getattr(defaults, k))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegmentSettings":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in names}
        for name in _TUPLE_FIELDS:
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)
