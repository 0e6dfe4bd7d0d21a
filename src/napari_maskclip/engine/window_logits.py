"""A window's prompt logits for any mode: the one place the engine, huge images and the student's
teacher turn encoded features (and a text-aware mode's state) into ``B x Q x h x w`` logits.

Most modes' logits are the cosines of the features with the prompts (:meth:`.Readout.logits`).
The text-aware modes (:data:`~.modes.TEXT_AWARE_MODES`) read the text further: ``rfclip``
refocuses the prompts on the window's patches and mixes in the global similarity
(:func:`.rfclip.rfclip_logits`), ``resclip`` finishes its features with the text's semantic
feedback (:func:`.resclip.resclip_features`) before the cosines.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from .readout import Readout
from .resclip import resclip_features
from .rfclip import distraction_channels, rfclip_logits, text_clusters

__all__ = ["window_logits", "mode_options"]


def mode_options(s: Any, visual: Optional[nn.Module] = None) -> dict[str, Any]:
    """The encode settings a text-aware mode reads (``dense_features(mode_options=...)``) from
    :class:`~.settings.SegmentSettings` ``s``. ``visual``: the model's own vision tower (not a
    half-precision copy), from which RF-CLIP's channels are chosen when the settings give none,
    so that every precision reads the same channels."""
    if s.mode == "rfclip":
        channels = s.rfclip_channels
        if channels is None and visual is not None:
            channels = distraction_channels(visual)
        return {"channels": channels}
    if s.mode == "resclip":
        return {"base": s.resclip_base, "rcs_weights": s.resclip_rcs_weights}
    return {}


def window_logits(
    readout: Readout,
    features: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    mode: str,
    encoded: Mapping[str, Any],
    visual: nn.Module,
    patch: int,
) -> torch.Tensor:
    """``B x D x h x w`` features (+ their batch-first ``state``) -> ``B x Q x h x w`` logits.

    ``mode`` and ``encoded`` (the encode settings the features were made with: ResCLIP's base
    attention and RCS weights) describe the features; the query settings are the readout's.
    ``visual`` is the vision tower in the features' precision (ResCLIP runs its last block again).
    """
    s = readout.settings
    if mode == "rfclip":
        key = ("rfclip_clusters", float(s.rfclip_cluster_threshold))
        if key not in readout.cache:
            readout.cache[key] = text_clusters(readout.text, s.rfclip_cluster_threshold)
        return rfclip_logits(features, readout.text, state["global"], readout.cache[key],
                             float(s.rfclip_text_weight), float(s.rfclip_global_weight))
    if mode == "resclip":
        finished = resclip_features(
            visual, features, dict(state), readout.text, patch,
            base=str(encoded.get("resclip_base", "naclip")),
            rcs_weights=tuple(encoded.get("resclip_rcs_weights", (2.0, 0.4))),
            sfr_weights=tuple(s.resclip_sfr_weights), scale=float(s.logit_scale),
            threshold=float(s.resclip_temp_threshold),
            delete_same_entity=bool(s.resclip_delete_same_entity))
        return readout.logits(finished)
    return readout.logits(features)
