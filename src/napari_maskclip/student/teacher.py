"""The frozen MaskCLIP teacher of a student: online pseudo-labels and the class embeddings.

Pseudo-labels are computed on the very crops the student trains on (after scaling, cropping and
flipping), as MaskCLIP+ does, so they match the student's input pixel for pixel. A whole batch of
crops goes through the image encoder in one pass and is read by the engine's own read-out
(:class:`~napari_maskclip.engine.readout.Readout`: cosine logits per prompt, softmax with the
teacher's temperature, max over synonyms, prompt denoising and key smoothing per crop when the
teacher's settings ask for them; PAMR and TLP guided by the crop and region voting on the
crop's superpixels likewise; the text-aware modes' logits as :mod:`~napari_maskclip.engine.window_logits`
gives them, each crop its own image). Pixels whose winning probability is below an optional confidence
threshold are ignored.

The teacher also provides the student's frozen classifier: one text embedding per class (the
normalised mean of its synonyms' embeddings, each averaged over the teacher's templates), with
row 0 the background (its names, by default "background").
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..classes import ClassSpec, parse_classes
from ..errors import InvalidInputError
from ..engine.dense import dense_features
from ..engine.modes import TEXT_AWARE_MODES
from ..engine.loading import LoadedModel
from ..engine.precision import model_in, precision_dtype, run_precision
from ..engine.readout import PromptLayout, Readout
from ..engine.regions import patch_regions, superpixels
from ..engine.settings import SegmentSettings
from ..engine.templates import resolve_templates
from ..engine.text import TextEmbeddingCache, TextEncoder
from ..engine.window_logits import mode_options, window_logits
from .data import IGNORE

__all__ = ["Teacher"]


class Teacher:
    """MaskCLIP on a frozen CLIP, reading batches of crops into label maps."""

    def __init__(
        self,
        loaded: LoadedModel,
        classes: list[ClassSpec],
        background: list[ClassSpec],
        settings: Optional[SegmentSettings] = None,
        *,
        confidence_threshold: Optional[float] = None,
        text_cache: Optional[TextEmbeddingCache] | str = "default",
        record: Optional[dict[str, Any]] = None,
    ) -> None:
        self.loaded = loaded
        self.settings = (settings or SegmentSettings()).validate()
        if self.settings.regions == "labels":
            raise InvalidInputError(
                "A student's teacher reads random training crops, so it cannot vote within a "
                "label image: use regions 'slic' or 'felzenszwalb', or none."
            )
        if loaded.kind != "vit" and (self.settings.pos_embed_resize,
                                     self.settings.partial_patches) != ("grid", "pad"):
            raise InvalidInputError(
                "The reference code's positional-embedding and partial-patch conventions apply "
                "to ViT models only: use pos_embed_resize='grid', partial_patches='pad'."
            )
        self.classes = list(classes)
        self.background = list(background) or parse_classes("background")
        self.confidence_threshold = confidence_threshold
        self.text = TextEncoder(loaded, cache=text_cache)
        #: The precision of both encoders (the settings' ``precision``; ``auto``: the model's).
        self.precision = run_precision(self.settings.precision, device=loaded.device,
                                       weights=loaded.dtype, default=loaded.precision)
        #: How to load this teacher again (model and pretrained as the user gave them).
        self._record = dict(record or {})
        self.templates = resolve_templates(self.settings.templates)
        self._layout = PromptLayout.from_classes(self.classes, self.background)
        self._prompt_embeddings = self.text.embed_texts(list(self._layout.prompts), self.templates,
                                                        precision=self.precision)  # Q x D
        self._readout = Readout(self._layout, self._prompt_embeddings, self.settings,
                                guide_norm=(tuple(loaded.mean), tuple(loaded.std)))

    # ---- the student's classifier ------------------------------------------------------------
    def class_embeddings(self) -> torch.Tensor:
        """``(K + 1) x D`` float32 on the CPU: row 0 background, row k class k (unit norm)."""
        rows = []
        groups = self._layout.groups
        bg = [i for k in range(len(self.classes), len(groups)) for i in groups[k]]
        rows.append(self._prompt_embeddings[bg].mean(dim=0))
        for k in range(len(self.classes)):
            rows.append(self._prompt_embeddings[list(groups[k])].mean(dim=0))
        return F.normalize(torch.stack(rows).float(), dim=-1).cpu()

    def record(self) -> dict[str, Any]:
        """What the checkpoint stores about the teacher."""
        out = {
            "model": self.loaded.name,
            "pretrained": self.loaded.pretrained,
            "identity": self.loaded.identity,
            "settings": self.settings.to_dict() | {"precision": self.precision},
            "confidence_threshold": self.confidence_threshold,
        }
        out.update(self._record)
        return out

    # ---- pseudo-labels ---------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` crops in 0..1 -> ``B x H x W`` labels (long, on the images' device):
        0 background, k class k, :data:`~.data.IGNORE` below the confidence threshold."""
        s = self.settings
        loaded = self.loaded
        out_device = images.device
        height, width = images.shape[-2:]
        patch = loaded.patch_size
        mean = torch.tensor(loaded.mean, dtype=torch.float32, device=loaded.device).view(1, 3, 1, 1)
        std = torch.tensor(loaded.std, dtype=torch.float32, device=loaded.device).view(1, 3, 1, 1)
        x = (images.to(loaded.device, torch.float32) - mean) / std
        if s.partial_patches != "drop":  # else the patch conv leaves the partial patch out
            ph, pw = math.ceil(height / patch) * patch, math.ceil(width / patch) * patch
            x = F.pad(x, (0, pw - width, 0, ph - height))
        x = x.to(precision_dtype(self.precision))
        visual = model_in(loaded, self.precision).visual
        token_regions = None
        if s.attention_regions is not None:  # superpixels of each crop, as the engine's windows
            cells = (lambda n: n // patch) if s.partial_patches == "drop" else (lambda n: -(-n // patch))
            unit = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
            token_regions = torch.stack([torch.from_numpy(patch_regions(
                superpixels(c, s.attention_regions, **s.region_params(s.attention_regions)),
                (cells(height), cells(width)), patch)) for c in unit]).long()
        dense = dense_features(visual, x, s.mode, with_keys=s.key_smoothing,
                               pos_embed_resize=s.pos_embed_resize, partial_patches=s.partial_patches,
                               token_regions=token_regions,
                               mode_options=mode_options(s, loaded.visual))
        logits = None
        if s.mode in TEXT_AWARE_MODES:  # each crop read whole: its own global embedding
            logits = window_logits(self._readout, dense.features, dense.state, s.mode,
                                   s.to_dict(), visual, patch)
        regions = None
        if s.regions is not None:  # superpixels of each crop, as the engine makes of an image
            crops = _half_guide(images, "cpu").permute(0, 2, 3, 1).numpy()
            regions = [superpixels(c, s.regions, **s.region_params()) for c in crops]
        guide = _half_guide(images, loaded.device) if (s.pamr or s.tlp) else None
        labels, confidence = self._readout(dense.features, patch, (height, width), dense.keys,
                                           guide=guide, regions=regions, logits=logits)
        if self.confidence_threshold is not None:
            labels = labels.masked_fill(confidence < self.confidence_threshold, IGNORE)
        return labels.to(out_device)


def _half_guide(images: torch.Tensor, device: Any) -> torch.Tensor:
    """The crops rounded through float16, as the engine caches an image for PAMR and superpixels,
    so the teacher refines a crop exactly as the engine refines the same image."""
    return images.to(device=device, dtype=torch.float16).float()
