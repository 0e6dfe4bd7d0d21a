"""Paper presets: each method's own evaluation settings, so real weights reproduce its numbers.

A preset sets the read-out mode, templates, softmax scale, sliding window and stride, short side,
PAMR and denoising as that paper's official code evaluates (base config; some datasets override
a few values, e.g. NACLIP reads VOC whole, and thresholds per dataset are the user's). The
preset's name is recorded in ``settings["preset"]`` of every result. Kept free of torch.

The successors' presets also set the reference code's conventions (:data:`REFERENCE_CONVENTIONS`,
engine settings ``pos_embed_resize``, ``partial_patches``, ``resize_antialias``); this project's
own defaults are the exact grid, padding to whole patches and an antialiased downscale. They also
guide PAMR and TLP by the image resized to the processing size and back (``refine_guide``), as
the reference code does. What still differs: mmseg rounds the resized size with ``int(x + 0.5)``
(this project: Python's ``round``), caps the long side at 2048, and cv2 resizes 8-bit images in
fixed point; MaskCLIP's code normalises with ImageNet's mean/std (a quirk, not reproduced). Use a ``-quickgelu`` model name
(``ViT-B-16-quickgelu``) with OpenAI weights.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "PRESET_SOURCES", "REFERENCE_CONVENTIONS", "preset_settings"]

#: The successors' reference code (SCLIP, ClearCLIP, NACLIP, SC-CLIP; all on mmseg): positional
#: embedding resized by the scale factor ``(grid + 0.1) / native``, a window's partial last
#: patch left out by the patch convolution (scores stretched over the window), images resized
#: by mmseg's cv2 bilinear (no antialiasing), PAMR (and TLP) guided by the network input resized
#: back to the image (``interpolate(inputs, ori_shape)``).
REFERENCE_CONVENTIONS = {"pos_embed_resize": "scale_factor", "partial_patches": "drop",
                         "resize_antialias": False, "refine_guide": "resized"}

_SUCCESSOR = {"templates": "openai80", "denoise": False, "key_smoothing": False, "short_side": 336,
              "window": 224, "stride": 112, "pamr": False, **REFERENCE_CONVENTIONS}

#: Settings of each preset (fields of :class:`~.settings.SegmentSettings`).
PRESETS: dict[str, dict[str, Any]] = {
    "maskclip": {"mode": "maskclip", "templates": "maskclip85", "logit_scale": 100.0,
                 "denoise": False, "key_smoothing": False, "short_side": 512, "window": None,
                 "stride": None, "pamr": False, "resize_antialias": False},
    "sclip": {**_SUCCESSOR, "mode": "sclip", "logit_scale": 40.0},
    "clearclip": {**_SUCCESSOR, "mode": "clearclip", "logit_scale": 50.0, "short_side": 448,
                  "window": 448, "stride": 224},
    "naclip": {**_SUCCESSOR, "mode": "naclip", "logit_scale": 40.0, "pamr": True,
               "pamr_iterations": 10, "pamr_dilations": (8, 16)},
    "scclip": {**_SUCCESSOR, "mode": "scclip", "logit_scale": 40.0},
    # Both 2025 read-outs: their PASCAL Context-59 configs' values (see PRESET_SOURCES).
    "rfclip": {**_SUCCESSOR, "mode": "rfclip", "logit_scale": 40.0, "rfclip_global": "image",
               "rfclip_global_weight": 0.25, "rfclip_text_weight": 0.04,
               "rfclip_cluster_threshold": 0.09},
    "resclip": {**_SUCCESSOR, "mode": "resclip", "logit_scale": 40.0, "resclip_base": "naclip",
                "resclip_rcs_weights": (2.0, 0.4), "resclip_sfr_weights": (1.8, 0.7),
                "resclip_temp_threshold": 0.25, "resclip_delete_same_entity": True},
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
    "rfclip": "liblacklucy/RF-CLIP custom_segmentor.py and configs/cfg_context59.py: 80 templates, "
              "scale 40, 224/112 windows at short side 336, the whole image's global embedding, "
              "global weight 0.25, text weight 0.04, cluster threshold 0.09, no PAMR (other "
              "configs: global 0.1-0.4, text 0.01-0.05, threshold 0.02-0.14; VOC21 whole image)",
    "resclip": "yvhangyang/ResCLIP resclip_segmentor.py and configs/cfg_context59.py: 80 "
               "templates, scale 40, 224/112 windows at short side 336, NACLIP base attention "
               "(wo_resi), RCS (2.0, 0.4), SFR (1.8, 0.7), temporary threshold 0.25, "
               "same-entity decay, no PAMR (other configs: RCS lambda 0.2-0.6, SFR tau 1.8-2.2, "
               "threshold 0.1-0.5; VOC whole image)",
}


def preset_settings(name: str) -> dict[str, Any]:
    """The settings of preset ``name`` plus ``preset=name`` (a new dict)."""
    from ..errors import InvalidInputError

    if name not in PRESETS:
        raise InvalidInputError(f"Unknown preset {name!r}: use one of {', '.join(PRESETS)}.")
    return {**PRESETS[name], "preset": name}
