"""The last-layer read-outs the engine offers (kept torch-free so CLIs and UIs list them cheaply)."""

from __future__ import annotations

__all__ = ["MODES", "VIT_ONLY_MODES", "TEXT_AWARE_MODES", "MODE_HELP", "RESCLIP_BASES"]

MODES = ("maskclip", "sclip", "clearclip", "naclip", "scclip", "rfclip", "resclip", "naive")
VIT_ONLY_MODES = ("sclip", "clearclip", "naclip", "scclip", "rfclip", "resclip", "naive")
#: Modes whose window scores depend on the text beyond a cosine (their query-time read-out lives in
#: their own module: :mod:`.rfclip`, :mod:`.resclip`).
TEXT_AWARE_MODES = ("rfclip", "resclip")
#: ResCLIP's base attention in the last block (its configs use naclip).
RESCLIP_BASES = ("naclip", "clearclip", "sclip")
MODE_HELP = {
    "maskclip": "MaskCLIP: value path of the last block, residual and MLP kept (the paper)",
    "sclip": "SCLIP: q-q + k-k attention in the last block, residual and MLP kept",
    "clearclip": "ClearCLIP: q-q attention, no residual, no MLP",
    "naclip": "NACLIP: k-k attention + Gaussian neighbourhood, no residual, no MLP",
    "scclip": "SC-CLIP: anomaly tokens fixed, intermediate-layer similarity, multi-level fusion",
    "rfclip": "RF-CLIP: distraction tokens fixed, layer-averaged k-k attention, text refocused",
    "resclip": "ResCLIP: NACLIP (or SCLIP/ClearCLIP) + intermediate attention + semantic feedback",
    "naive": "unmodified last layer (baseline; MaskCLIP improves on it)",
}
