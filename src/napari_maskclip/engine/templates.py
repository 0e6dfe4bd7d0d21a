"""Prompt templates: how a class name becomes the sentences CLIP's text encoder reads.

MaskCLIP's default is 85 templates: the 80 ImageNet templates of the CLIP paper (taken from
open_clip, which ships them) plus 5 scene templates; each class embedding is the normalised mean
of its templates' normalised embeddings. ``"single"`` is the one-sentence "a photo of a {}.".
Users may give their own list; each template must contain ``{}`` once.
"""

from __future__ import annotations

import hashlib
from typing import Sequence, Union

from ..errors import InvalidInputError

__all__ = [
    "SCENE_TEMPLATES",
    "SINGLE_TEMPLATE",
    "maskclip_templates",
    "resolve_templates",
    "templates_key",
    "TemplatesLike",
    "TEMPLATE_SETS",
]

#: MaskCLIP's five scene templates, added to CLIP's 80 ImageNet ones.
SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)

TEMPLATE_SETS = ("maskclip85", "openai80", "single")

TemplatesLike = Union[str, Sequence[str]]


def maskclip_templates() -> tuple[str, ...]:
    """The 85 templates of MaskCLIP: CLIP's 80 ImageNet templates + 5 scene templates."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    imagenet = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
    return imagenet + SCENE_TEMPLATES


def resolve_templates(templates: TemplatesLike | None) -> tuple[str, ...]:
    """``"maskclip85"`` (default), ``"single"``, or the user's own list of ``{}`` templates."""
    if templates is None or (isinstance(templates, str) and templates in ("", "maskclip85", "maskclip")):
        return maskclip_templates()
    if isinstance(templates, str):
        if templates == "single":
            return SINGLE_TEMPLATE
        if templates == "openai80":  # CLIP's 80 ImageNet templates (SCLIP, NACLIP, SC-CLIP...)
            return maskclip_templates()[:-len(SCENE_TEMPLATES)]
        if "{}" in templates:
            templates = [templates]
        else:
            raise InvalidInputError(
                f"Unknown template set {templates!r}: use 'maskclip85', 'single', or templates "
                "containing '{}', e.g. 'a microscopy image of {}.'"
            )
    result = tuple(str(t) for t in templates)
    if not result:
        raise InvalidInputError("The template list is empty.")
    for template in result:
        if template.count("{}") != 1:
            raise InvalidInputError(f"Template {template!r} must contain '{{}}' exactly once.")
    return result


def templates_key(templates: Sequence[str]) -> str:
    """A short, stable digest of a template list, for cache keys."""
    return hashlib.sha256("\n".join(templates).encode("utf-8")).hexdigest()[:20]
