"""Paper presets: each method's own evaluation settings, so real weights reproduce its numbers.

A preset sets the read-out mode, templates, softmax scale, sliding window and stride, short side,
PAMR and denoising as that paper's official code evaluates (base config; some datasets override
a few values, e.g. NACLIP reads VOC whole, and thresholds per dataset are the user's). The
preset's name is recorded in ``settings["preset"]`` of every result. Kept free of torch.

Differences that remain from the reference code are conventions: the official code resizes the
positional embedding by a scale factor (``size + 0.1``) instead of to the exact grid, loads
images with mmseg's resize (antialiased differently) and normalises with CLIP's mean/std given in
0..255 (the same values); MaskCLIP's code normalises with ImageNet's mean/std (a quirk, not
reproduced). Use a ``-quickgelu`` model name (``ViT-B-16-quickgelu``) with OpenAI weights.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "PRESET_SOURCES", "preset_settings"]

_SUCCESSOR = {"templates": "openai80", "denoise": False, "key_smoothing": False, "short_side": 336,
              "window": 224, "stride": 112, "pamr": False}

#: Settings of each preset (fields of :class:`~.settings.SegmentSettings`).
PRESETS: dict[str, dict[str, Any]] = {
    "maskclip": {"mode": "maskclip", "templates": "maskclip85", "logit_scale": 100.0,
                 "denoise": False, "key_smoothing": False, "short_side": 512, "window": None,
                 "stride": None, "pamr": False},
    "sclip": {**_SUCCESSOR, "mode": "sclip", "logit_scale": 40.0},
    "clearclip": {**_SUCCESSOR, "mode": "clearclip", "logit_scale": 50.0, "short_side": 448,
                  "window": 448, "stride": 224},
    "naclip": {**_SUCCESSOR, "mode": "naclip", "logit_scale": 40.0, "pamr": True,
               "pamr_iterations": 10, "pamr_dilations": (8, 16)},
    "scclip": {**_SUCCESSOR, "mode": "scclip", "logit_scale": 40.0},
}

#: Where each preset's values come from.
PRESET_SOURCES: dict[str, str] = {
    "maskclip": "chongzhou96/MaskCLIP configs: whole image, short side 512, 85 templates, "
                "no key smoothing or denoising (as the successors' tables report it)",
    "sclip": "wangf3014/SCLIP clip_segmentor.py defaults: 80 templates, scale 40, 224/112 windows "
             "at short side 336, no PAMR (per-dataset configs raise the scale, e.g. VOC21 65)",
    "clearclip": "mc-lan/ClearCLIP clearclip_segmentor.py defaults: 80 templates, scale 50, "
                 "448/224 windows at short side 448",
    "naclip": "sinahmr/NACLIP naclip.py defaults: 80 templates, scale 40, 224/112 windows at short "
              "side 336, PAMR 10 iterations at dilations 8 and 16",
    "scclip": "SuleBai/SC-CLIP scclip_segmentor.py defaults: 80 templates, scale 40, 224/112 "
              "windows at short side 336, no PAMR (per-dataset configs raise the scale)",
}


def preset_settings(name: str) -> dict[str, Any]:
    """The settings of preset ``name`` plus ``preset=name`` (a new dict)."""
    from ..errors import InvalidInputError

    if name not in PRESETS:
        raise InvalidInputError(f"Unknown preset {name!r}: use one of {', '.join(PRESETS)}.")
    return {**PRESETS[name], "preset": name}
