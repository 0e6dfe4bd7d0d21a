"""How unsure the current model is about an image, so a person can label the hardest first.

The score is the **mean top-two margin uncertainty** over the image's pixels::

    u = mean over pixels of 1 - (p1 - p2)

where ``p1`` and ``p2`` are the two largest class probabilities of the pixel, with background
taken as a class of its own: the engine's and the student's probability maps cover the user's
classes only (``C x H x W``), so background gets the remaining mass ``1 - sum(P)``. ``u`` lies in
0..1: 0 when every pixel is certain, 1 when every pixel is a tie between two classes.

Why this score:

* **margin, not entropy or the top probability alone**: the label shown is the argmax, and what
  decides whether it flips is the gap between the best and the second-best class. Entropy also
  grows with how the leftover mass spreads over the many unlikely classes (12 classes in the
  demo), which says little about whether the shown label is wrong; the top probability alone
  mixes the two. Margin ("best versus second best") is the usual choice of active learning for
  classification and segmentation, and it costs one partial sort per pixel.
* **background as a class**: a pixel split 50/50 between "cell" and background is exactly the
  kind a person must fix, but without background in the comparison it would look certain.
* **mean over pixels**: the work a person has to do on an image grows with the area of doubtful
  pixels, not with its single worst pixel (a max would rank every image with one noisy pixel top).

Scoring runs in the background (a generator, like every long job here) and can be cancelled
between images; images that cannot be read or predicted are left out of the scores and so come
last in :func:`hardest_first`.
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Iterable, Mapping, Optional, Protocol, Sequence, Union

import numpy as np

from ..errors import Cancelled, InvalidInputError, MaskClipError
from ..progress import Progress

__all__ = ["margin_uncertainty", "hardest_first", "score_iter", "Predicts"]

#: Rows handled at a time, so that scoring a large image needs little memory beyond its maps.
_ROW_BLOCK = 256


def margin_uncertainty(probabilities: np.ndarray, background_mass: bool = True) -> float:
    """Mean over pixels of ``1 - (p1 - p2)`` (see the module doc); ``probabilities`` is
    ``C x H x W`` for the user's classes. With ``background_mass`` the background's probability
    ``1 - sum(P)`` (clipped at 0) competes as one more class."""
    probs = np.asarray(probabilities)
    if probs.ndim != 3:
        raise InvalidInputError(
            f"Probabilities must be a C x H x W stack, got shape {probs.shape}."
        )
    channels, height, width = probs.shape
    pixels = height * width
    if pixels == 0:
        raise InvalidInputError("The probability maps are empty (0 pixels); nothing to score.")
    if channels + int(background_mass) < 2:
        return 0.0  # one class only: nothing to confuse it with
    total = 0.0
    for y0 in range(0, height, _ROW_BLOCK):
        block = probs[:, y0:y0 + _ROW_BLOCK].astype(np.float32, copy=False)
        if background_mass:
            rest = np.clip(1.0 - block.sum(axis=0, dtype=np.float32), 0.0, 1.0)
            block = np.concatenate([rest[None], block], axis=0)
        # The two largest per pixel, without a full sort.
        top2 = np.partition(block, block.shape[0] - 2, axis=0)[-2:]
        margin = top2[1] - top2[0]
        total += float(np.sum(1.0 - margin, dtype=np.float64))
    return float(np.clip(total / pixels, 0.0, 1.0))


def hardest_first(indices: Iterable[int], scores: Mapping[int, Optional[float]]) -> list[int]:
    """``indices`` ordered by score, highest (most uncertain) first; ties keep their given order
    and indices without a score (unreadable, not yet scored) come last, in their given order."""
    order = list(indices)
    scored = [i for i in order if scores.get(i) is not None]
    unscored = [i for i in order if scores.get(i) is None]
    scored.sort(key=lambda i: -float(scores[i]))  # stable: ties keep their order
    return scored + unscored


class Predicts(Protocol):
    """What :func:`score_iter` needs of a predictor (e.g. ``series.predictor.SeriesPredictor``)."""

    def predict(self, image: np.ndarray) -> Any:  # returns an object with ``.probabilities``
        ...


ImageSource = Union[Callable[[int], np.ndarray], Any]


def _reader(source: ImageSource) -> Callable[[int], np.ndarray]:
    reader = getattr(source, "read_image", None)
    if callable(reader):
        return reader
    if callable(source):
        return source
    raise InvalidInputError(
        "score_iter needs a series session (with read_image) or a function index -> image."
    )


def score_iter(
    source: ImageSource,
    predictor: Predicts,
    indices: Sequence[int],
    *,
    background_mass: bool = True,
) -> Generator[Progress, None, dict[int, float]]:
    """Score images ``indices`` by :func:`margin_uncertainty` of ``predictor``'s probabilities.

    ``source`` is a series session (its ``read_image(i)``) or any function ``i -> image``.
    Yields ``Progress("score", done, total)`` before each image and after it (``info``: ``index``
    and ``score``, or ``error`` for an image that could not be read or predicted - it is left out,
    so it comes last in :func:`hardest_first`); closing the generator stops it before the next
    image. Returns ``{index: score}``.
    """
    read = _reader(source)
    todo = list(indices)
    total = len(todo)
    scores: dict[int, float] = {}
    for done, index in enumerate(todo):
        yield Progress("score", done, total, f"scoring image {done + 1} of {total}",
                       info={"index": index})
        try:
            image = read(index)
            prediction = predictor.predict(image)
            probabilities = getattr(prediction, "probabilities", None)
            if probabilities is None:
                raise InvalidInputError(
                    "the model gave no class probabilities, so its uncertainty is unknown"
                )
            score = margin_uncertainty(probabilities, background_mass=background_mass)
        except Cancelled:
            raise
        except MaskClipError as exc:  # this image only: the others are still scored
            yield Progress("score", done + 1, total, f"image {index} not scored: {exc}",
                           info={"index": index, "error": str(exc)})
            continue
        scores[index] = score
        yield Progress("score", done + 1, total, f"image {index}: uncertainty {score:.3f}",
                       info={"index": index, "score": score})
    return scores
