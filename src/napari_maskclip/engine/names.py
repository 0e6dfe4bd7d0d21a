"""Model names and the default-weights rule, torch-free, so the CLI, the plugin and the student
agree on them without loading torch.

* :data:`DEMO_MODEL`: the tiny CLIP shipped with the package (:mod:`napari_maskclip.demo`);
* :data:`RANDOM_WEIGHTS`: the ``pretrained`` value meaning "no weights" (tests, benchmarks);
* :data:`DEFAULT_MODEL` / :data:`DEFAULT_PRETRAINED`: what a run uses when nothing is chosen;
* :func:`default_pretrained`: the weights a model gets when none are given.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "DEMO_MODEL",
    "RANDOM_WEIGHTS",
    "default_pretrained",
]

DEMO_MODEL = "demo"
RANDOM_WEIGHTS = "random"
DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"


def default_pretrained(model: str, pretrained: Optional[str]) -> Optional[str]:
    """``openai`` for an open_clip model name, nothing for the demo or config files unless given
    (the demo ships its weights; a config file's weights are the user's file)."""
    if pretrained is not None:
        return pretrained
    if model == DEMO_MODEL or model.lower().endswith(".json"):
        return None
    return DEFAULT_PRETRAINED
