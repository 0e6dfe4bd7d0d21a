"""The MaskCLIP read-out: dense features and text embeddings in, probabilities and labels out.

Every query-time step lives here, once, on batch-first tensors, so the Segmenter (the windows of
one image) and the student's teacher (a batch of training crops) read features the same way:

1. :meth:`Readout.logits` - cosine of every cell with every prompt: ``B x D x h x w`` features and
   ``Q x D`` prompt embeddings -> ``B x Q x h x w``.
2. :meth:`Readout.class_max` + :meth:`Readout.select` - prompt denoising (paper section 3.3):
   each class's highest probability at :data:`DENOISE_SCALE`; classes below the threshold drop
   out. The caller decides what is pooled: the whole image (engine, max over its windows) or
   each crop (teacher).
3. :meth:`Readout.cell_scores` - scores at patch resolution for the surviving classes: their
   prompts' cosines, or, with key smoothing, class probabilities smoothed by key similarity.
   (Cell-level refinements belong here.)
4. :meth:`Readout.upsample` - bilinear to the padded pixel size the cells cover, cropped. The
   engine then stitches windows and resizes to the image (:mod:`.stitch`).
   :meth:`Readout.refine_pixels` - with ``pamr``, PAMR on these pixel scores (prompt cosines, or
   smoothed probabilities), guided by the image at the same size (as the official code does,
   before the softmax); then with ``tlp``, PEARL's text-aware propagation (:mod:`.tlp`).
5. :meth:`Readout.decide` - class probabilities (softmax over the active prompts at the user's
   temperature, max over synonyms; or the smoothed probabilities renormalised); with region
   voting each region's mean probabilities or label shares (:mod:`.regions`); argmax to label
   values, and the background threshold.

:meth:`Readout.__call__` runs 1-5 on a batch of whole crops with denoising decided per crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..classes import ClassSpec
from .pamr import pamr
from .refine import class_probabilities, denoise_keep, key_smoothing
from .regions import region_vote
from .settings import SegmentSettings
from .tlp import normalised_guide, text_diagonal, tlp

__all__ = [
    "DENOISE_SCALE",
    "PromptLayout",
    "ActiveClasses",
    "Decision",
    "Readout",
]

#: Prompt denoising's threshold is calibrated at CLIP's scale (paper and official code: 100), so
#: it is decided at that scale whatever temperature the user picks for the confidence maps.
DENOISE_SCALE = 100.0


def _consecutive_groups(sizes: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    groups, first = [], 0
    for size in sizes:
        groups.append(tuple(range(first, first + size)))
        first += size
    return tuple(groups)


@dataclass(frozen=True)
class PromptLayout:
    """Which prompts (synonyms) belong to which class, and each class's label value.

    Classes are the user's classes (label ``k + 1``) followed by background classes (label 0).
    """

    prompts: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]
    values: tuple[int, ...]
    names: tuple[str, ...]
    fg_count: int

    @classmethod
    def from_classes(cls, classes: Sequence[ClassSpec], background: Sequence[ClassSpec] = ()) -> "PromptLayout":
        specs = list(classes) + list(background)
        fg = len(classes)
        return cls(
            prompts=tuple(s for spec in specs for s in spec.synonyms),
            groups=_consecutive_groups([len(spec.synonyms) for spec in specs]),
            values=tuple(k + 1 if k < fg else 0 for k in range(len(specs))),
            names=tuple(spec.name for spec in specs),
            fg_count=fg,
        )

    def __len__(self) -> int:
        return len(self.groups)


@dataclass(frozen=True)
class ActiveClasses:
    """The classes that survived prompt denoising, and where their prompts are."""

    classes: tuple[int, ...]  # class indices into the layout
    prompts: tuple[int, ...]  # their prompts' indices into the layout's prompts
    groups: tuple[tuple[int, ...], ...]  # each active class's rows among ``prompts``

    @classmethod
    def of(cls, layout: PromptLayout, classes: Sequence[int]) -> "ActiveClasses":
        classes = tuple(int(k) for k in classes)
        return cls(
            classes=classes,
            prompts=tuple(q for k in classes for q in layout.groups[k]),
            groups=_consecutive_groups([len(layout.groups[k]) for k in classes]),
        )


@dataclass
class Decision:
    """Step 5's output for ``B`` maps of ``H x W`` pixels."""

    labels: torch.Tensor  # B x H x W, int64 label values
    confidence: torch.Tensor  # B x H x W, the winning class's probability
    probabilities: torch.Tensor  # B x K' x H x W, rows in ``classes`` order
    classes: tuple[int, ...]  # the K' active class indices


class Readout:
    """MaskCLIP's query-time read-out of one prompt layout under one set of settings.

    ``text`` holds one unit-norm embedding per prompt (``layout.prompts`` order). Only the query
    settings are read: ``denoise``, ``denoise_threshold``, ``key_smoothing``, ``ks_threshold``,
    ``logit_scale``, ``background_threshold``, ``pamr*``, ``tlp*``, ``regions`` (with the
    superpixel parameters and ``region_vote``) and the text-aware modes' query settings.
    ``guide_norm``: the model's (mean, std), with which TLP sees the guide as the model does.
    """

    def __init__(self, layout: PromptLayout, text: torch.Tensor, settings: SegmentSettings,
                 guide_norm: Optional[tuple[Sequence[float], Sequence[float]]] = None) -> None:
        if text.shape[0] != len(layout.prompts):
            raise ValueError(f"{text.shape[0]} embeddings for {len(layout.prompts)} prompts")
        self.layout = layout
        self.text = text
        self.settings = settings
        self.guide_norm = guide_norm
        self.all = ActiveClasses.of(layout, range(len(layout)))
        #: What a query derives from the text once (prompt clusters, TLP's text diagonal, ...).
        self.cache: dict[Any, Any] = {}

    # ---- 1. cosines --------------------------------------------------------------------------
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``B x D x h x w`` unit-norm features -> ``B x Q x h x w`` prompt cosines."""
        # In fp32 whatever the encoders' precision, so thresholds mean the same in every precision.
        text = self.text.to(device=features.device, dtype=torch.float32)
        return torch.einsum("bdhw,qd->bqhw", features.float(), text)

    # ---- 2. prompt denoising -----------------------------------------------------------------
    def class_max(self, logits: torch.Tensor) -> torch.Tensor:
        """``B x K``: each class's highest probability over the cells at :data:`DENOISE_SCALE`."""
        probs = class_probabilities(logits.flatten(2), self.all.groups, DENOISE_SCALE, dim=1)
        return probs.amax(dim=2)

    def select(self, class_max: Optional[torch.Tensor] = None) -> ActiveClasses:
        """The classes to read: all without denoising, else those that pass on ``class_max`` (K)."""
        if not self.settings.denoise or class_max is None:
            return self.all
        keep = denoise_keep(class_max.cpu(), self.settings.denoise_threshold)
        return ActiveClasses.of(self.layout, [k for k in range(len(self.layout)) if bool(keep[k])])

    # ---- 3. scores at patch resolution -------------------------------------------------------
    def cell_scores(
        self, logits: torch.Tensor, active: ActiveClasses, keys: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``B x Q x h x w`` cosines -> ``B x C x h x w`` scores of the active classes: their
        prompts' cosines (C = their prompts), or with key smoothing their smoothed probabilities
        (C = classes; ``keys`` ``B x (h*w) x C_k`` unit norm)."""
        index = torch.tensor(active.prompts, dtype=torch.long, device=logits.device)
        logits = logits.index_select(1, index)
        s = self.settings
        if not s.key_smoothing:
            return logits
        if keys is None:
            raise ValueError("key smoothing needs the attention keys")
        b, _, gh, gw = logits.shape
        probs = class_probabilities(logits.flatten(2), active.groups, s.logit_scale, dim=1)
        smoothed = [key_smoothing(probs[i], keys[i], threshold=s.ks_threshold) for i in range(b)]
        return torch.stack(smoothed).reshape(b, -1, gh, gw)

    # ---- 4. pixels ---------------------------------------------------------------------------
    @staticmethod
    def upsample(scores: torch.Tensor, patch: int, size: tuple[int, int],
                 stretch: bool = False) -> torch.Tensor:
        """``B x C x h x w`` cell scores -> ``B x C x H x W`` pixels: bilinear to the padded size
        the cells cover (``h*patch x w*patch``), cropped to ``size``; with ``stretch`` (windows
        whose partial last patch was dropped, as the reference code) bilinear to ``size``."""
        if stretch:
            return F.interpolate(scores.float(), size=tuple(size), mode="bilinear",
                                 align_corners=False)
        gh, gw = scores.shape[-2:]
        up = F.interpolate(scores.float(), size=(gh * patch, gw * patch), mode="bilinear",
                           align_corners=False)
        return up[:, :, :size[0], :size[1]]

    def refine_pixels(self, scores: torch.Tensor, guide: Optional[torch.Tensor],
                      active: Optional[ActiveClasses] = None) -> torch.Tensor:
        """PAMR on ``B x C x H x W`` pixel scores when ``pamr`` is on (``guide``: the image,
        ``B x channels x H x W``, 0..1), then TLP on the whole of each when ``tlp`` is on
        (``active``: whose channels the scores hold); unchanged otherwise."""
        s = self.settings
        if not (s.pamr or s.tlp):
            return scores
        if guide is None:
            raise ValueError("PAMR and TLP need the image as a guide")
        if s.pamr:
            scores = pamr(guide, scores, iterations=s.pamr_iterations, dilations=s.pamr_dilations)
        if s.tlp:
            scores = tlp(self.tlp_guide(guide.to(scores.device)), scores,
                         self.tlp_diagonal(active or self.all), iterations=s.tlp_iterations,
                         grid=s.tlp_grid)
        return scores

    def tlp_guide(self, guide: torch.Tensor) -> torch.Tensor:
        """A 0..1 guide (``... x channels x H x W``) as the model normalises it, for TLP."""
        mean, std = self.guide_norm or (None, None)
        return normalised_guide(guide, mean, std)

    def tlp_diagonal(self, active: ActiveClasses) -> torch.Tensor:
        """TLP's text diagonal for the score channels of ``active``: its prompts, or with key
        smoothing its classes (each the normalised mean of its prompts)."""
        key = ("tlp", active.prompts, self.settings.key_smoothing)
        if key not in self.cache:
            text = self.text.float()
            if self.settings.key_smoothing:
                rows = torch.stack([F.normalize(text[list(self.layout.groups[k])], dim=-1).mean(dim=0)
                                    for k in active.classes])
            else:
                rows = text[list(active.prompts)]
            self.cache[key] = text_diagonal(rows)
        return self.cache[key]

    # ---- 5. probabilities and labels ---------------------------------------------------------
    def probabilities(self, scores: torch.Tensor, active: ActiveClasses) -> torch.Tensor:
        """``B x C x H x W`` pixel scores -> ``B x K' x H x W`` class probabilities."""
        if self.settings.key_smoothing:
            return scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return class_probabilities(scores, active.groups, self.settings.logit_scale, dim=1)

    def decide(
        self, scores: torch.Tensor, active: ActiveClasses, regions: Optional[Sequence[Any]] = None
    ) -> Decision:
        """Pixel scores -> probabilities, label values (argmax) and the background threshold;
        with ``regions`` (one ``H x W`` id map per item, 0 = none) voted per region first."""
        probs = self.probabilities(scores, active)
        if regions is not None:
            rule = self.settings.region_vote
            probs = torch.stack([region_vote(probs[i], regions[i], rule=rule)
                                 for i in range(probs.shape[0])])
        return self.label(probs, active)

    def label(self, probs: torch.Tensor, active: ActiveClasses) -> Decision:
        """``B x K' x H x W`` class probabilities -> label values and the background threshold."""
        best_p, best = probs.max(dim=1)
        values = torch.tensor([self.layout.values[k] for k in active.classes], dtype=torch.long)
        labels = values.to(best.device)[best]
        if self.settings.background_threshold is not None:
            labels[best_p < self.settings.background_threshold] = 0
        return Decision(labels=labels, confidence=best_p, probabilities=probs, classes=active.classes)

    # ---- all steps on whole crops --------------------------------------------------------------
    def __call__(
        self,
        features: torch.Tensor,
        patch: int,
        size: tuple[int, int],
        keys: Optional[torch.Tensor] = None,
        guide: Optional[torch.Tensor] = None,
        regions: Optional[Sequence[Any]] = None,
        logits: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-5 on ``B`` crops, each read whole with prompt denoising decided per crop.

        ``guide`` (``B x channels x H x W``, the crops) is needed for PAMR and TLP, ``regions``
        (``B`` id maps) for region voting; ``logits`` replaces step 1 (a text-aware mode's,
        :mod:`.window_logits`). Returns labels and confidence (``B x H x W``). Crops whose
        denoising keeps the same classes are read together.
        """
        logits = self.logits(features) if logits is None else logits
        if self.settings.denoise:
            class_max = self.class_max(logits)
            actives = [self.select(class_max[i]) for i in range(logits.shape[0])]
        else:
            actives = [self.all] * logits.shape[0]
        b = logits.shape[0]
        labels = torch.zeros((b, *size), dtype=torch.long, device=logits.device)
        confidence = torch.zeros((b, *size), dtype=torch.float32, device=logits.device)
        for active in dict.fromkeys(actives):
            rows = [i for i in range(b) if actives[i] == active]
            index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            part_keys = None if keys is None else keys.index_select(0, index.to(keys.device))
            scores = self.cell_scores(logits.index_select(0, index), active, part_keys)
            pixels = self.upsample(scores, patch, size,
                                   stretch=self.settings.partial_patches == "drop")
            if self.settings.pamr or self.settings.tlp:
                pixels = self.refine_pixels(pixels, guide.index_select(0, index.to(guide.device)),
                                            active)
            part_regions = None if regions is None else [regions[i] for i in rows]
            decision = self.decide(pixels, active, part_regions)
            labels[index] = decision.labels
            confidence[index] = decision.confidence
        return labels, confidence
