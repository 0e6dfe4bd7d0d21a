"""The last-layer read-outs the engine offers (kept torch-free so CLIs and UIs list them cheaply)."""

from __future__ import annotations

__all__ = ["MODES", "VIT_ONLY_MODES", "MODE_HELP"]

MODES = ("maskclip", "sclip", "clearclip", "naclip", "scclip", "naive")
VIT_ONLY_MODES = ("sclip", "clearclip", "naclip", "scclip", "naive")
MODE_HELP = {
    "maskclip": "MaskCLIP: value path of the last block, residual and MLP kept (the paper)",
    "sclip": "SCLIP: q-q + k-k attention in the last block, residual and MLP kept",
    "clearclip": "ClearCLIP: q-q attention, no residual, no MLP",
    "naclip": "NACLIP: k-k attention + Gaussian neighbourhood, no residual, no MLP",
    "scclip": "SC-CLIP: anomaly tokens fixed, intermediate-layer similarity, multi-level fusion",
    "naive": "unmodified last layer (baseline; MaskCLIP improves on it)",
}
