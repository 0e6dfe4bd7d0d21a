"""The settings of a MaskCLIP run, with the paper's defaults.

Settings split in two groups. *Encode* settings change the image features (attention mode,
windows, resizing, precision, whether keys are kept for key smoothing); changing one re-runs the
image encoder. *Query* settings (denoising, temperature, templates, background) only change how cached
features are read against text, so changing them is instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..errors import InvalidInputError
from .modes import MODES
from .precision import PRECISIONS
from .templates import TEMPLATE_SETS, resolve_templates

__all__ = ["SegmentSettings", "ENCODE_FIELDS"]

#: Fields whose change requires re-encoding the image.
ENCODE_FIELDS = ("mode", "window", "stride", "short_side", "max_whole_pixels", "auto_window",
                 "precision")


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
    #: Precision of the image and text encoders (one of :data:`PRECISIONS`): ``auto`` is the
    #: model's (bf16 on a CPU with native bf16, fp32 on other CPUs, fp16 on GPUs). The read-out
    #: after the encoders is fp32 in every precision; results record the precision used.
    precision: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def replace(self, **changes: Any) -> "SegmentSettings":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidInputError(f"Unknown setting(s): {', '.join(sorted(unknown))}.")
        if isinstance(changes.get("templates"), list):
            changes["templates"] = tuple(changes["templates"])
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
        return self

    def encode_key(self) -> tuple[Any, ...]:
        """The part of the settings that determines image features."""
        return tuple(getattr(self, name) for name in ENCODE_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if isinstance(out["templates"], tuple):
            out["templates"] = list(out["templates"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegmentSettings":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in names}
        if isinstance(kwargs.get("templates"), list):
            kwargs["templates"] = tuple(kwargs["templates"])
        return cls(**kwargs)
