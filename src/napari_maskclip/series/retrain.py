"""Retrain as you go: continue the student on the dataset so far, keep it only if it is better.

While a person works through a folder, every saved image adds to the dataset. After every K saved
images (:class:`RetrainPolicy`), :func:`retrain_iter` continues the student from its checkpoint
(or starts one) on the dataset as it is now, exactly as ``napari-maskclip train`` trains: a
person's pixels are targets as they are, every other pixel gets the MaskCLIP teacher's label
(then the student's own, in the self-training stage). Then it measures the new student and the
model in use now on the same held-out images and promotes the new one only when it is better.

Choices, and why:

* **Warm start, fresh schedule.** The new run starts from the current student's weights (not
  its optimiser state: the data changed, so a resumed schedule would be a different run) and
  runs a bounded number of iterations with the usual poly decay. Without a checkpoint, or when
  the dataset's classes changed since, it starts from scratch.
* **A stable validation split on human pixels.** Only pixels a person labelled (edited, or
  every pixel of a reviewed image) measure a model; the teacher's labels would only measure
  agreement with the teacher. The held-out images are picked by a hash of their sample name
  (about ``val_fraction`` of the images with human pixels), so an image once held out stays
  held out as the dataset grows: no round trains on the images a later round validates on, and
  the current student never saw them either. While no image falls under the hash threshold, the
  one with the smallest hash is held out (a new image can take its place, an image trained on
  never becomes a held-out one).
* **Promote only when strictly better.** The page keeps its model unless the new student's mIoU
  on the held-out human pixels beats the current model's (the current student, or - before the
  first student - whatever labels the images now, passed as ``current``). Without held-out human
  pixels, or without a current model to compare with, nothing is promoted (the outcome says why).
* **Files.** Nothing is written until the end: the new student is trained in memory and only a
  promoted one is saved, atomically, to ``output`` (by default over the current checkpoint),
  which must be a student checkpoint if it exists (see :mod:`napari_maskclip.student.output`: its
  lock admits one writer, a failed save leaves the old file). Cancelling (closing the generator)
  therefore leaves the old checkpoint exactly as it was.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Optional, Sequence

import numpy as np

from ..errors import InvalidInputError, OutputError
from ..progress import Progress

__all__ = ["RetrainPolicy", "RetrainOutcome", "retrain_iter", "split_for_validation"]

#: What labels an image with the model in use now (before the first student): image -> labels
#: (0 background, k the dataset's class k).
CurrentModel = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RetrainPolicy:
    """When to retrain: after every ``every_k`` saved images (0 = never), for ``iterations``
    student iterations each time."""

    every_k: int = 20
    iterations: int = 300

    def __post_init__(self) -> None:
        for name in ("every_k", "iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInputError(f"{name} must be a whole number >= 0, got {value!r}.")
        if self.every_k and not self.iterations:
            raise InvalidInputError("Retraining needs at least one iteration.")

    def due(self, saved: int, saved_at_last: int = 0) -> bool:
        """Whether ``saved`` images call for a retrain when the last one ran at ``saved_at_last``."""
        return bool(self.every_k) and saved - saved_at_last >= self.every_k


@dataclass(frozen=True)
class RetrainOutcome:
    """What one retrain round gives.

    ``checkpoint``: the student to use from now on - the new one's file when ``promoted``, else
    the current checkpoint (None: no student yet). ``miou_new`` / ``miou_current``: mIoU of the
    new student and of the current model on the held-out human pixels (None: not measurable).
    """

    checkpoint: Optional[Path]
    miou_new: Optional[float]
    miou_current: Optional[float]
    promoted: bool
    #: Why it was (not) promoted, in one line.
    reason: str = ""
    #: Iterations of this round, and of the new student in all (its rounds added up).
    iterations: int = 0
    total_iterations: int = 0
    #: Sample names held out for validation, and how many human pixels they hold.
    validation: list[str] = field(default_factory=list)
    validation_pixels: int = 0
    #: Whether the new student continued the current one (False: trained from scratch).
    warm_start: bool = False
    #: The new student in memory (a ``TrainResult``), promoted or not (for benchmarks).
    result: Any = None


def _name_hash(name: str) -> float:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_for_validation(
    names: Sequence[str], human: Sequence[bool], val_fraction: float
) -> tuple[list[int], list[int]]:
    """(training, held-out) positions: held out are images with human pixels whose name hashes
    below ``val_fraction`` (at least one when two or more images exist and one has human pixels);
    see the module doc for why the split is by name."""
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidInputError(f"val_fraction must lie in 0..1, got {val_fraction}.")
    if val_fraction == 0.0:
        return list(range(len(names))), []
    hashes = [_name_hash(n) for n in names]
    candidates = [i for i in range(len(names)) if human[i]]
    val = [i for i in candidates if hashes[i] < val_fraction]
    if not val and candidates and len(names) >= 2:
        val = [min(candidates, key=lambda i: hashes[i])]
    if len(val) == len(names):  # keep one image to train on
        val = val[:-1]
    held = set(val)
    return [i for i in range(len(names)) if i not in held], sorted(val)


def _confusion_add(confusion: np.ndarray, pred: np.ndarray, labels: np.ndarray,
                   human: np.ndarray) -> None:
    from ..evaluate import confusion_matrix
    from ..student.data import IGNORE

    targets = np.where(human, labels, IGNORE)
    confusion += confusion_matrix(pred, targets, confusion.shape[0], ignore_index=IGNORE)


def _miou(confusion: np.ndarray) -> Optional[float]:
    from ..evaluate import scores_from_confusion

    if int(confusion.sum()) == 0:
        return None
    return float(scores_from_confusion(confusion).miou)


def _student_labels(net: Any, image_unit: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """A student's labels of a prepared image, mapped onto the dataset's class values."""
    from ..progress import run_to_completion
    from ..student.predict import predict_logits_iter

    logits = run_to_completion(predict_logits_iter(net, image_unit, window=512))
    return lut[logits.argmax(dim=0).numpy()]


def _class_lut(student_names: Sequence[str], data_names: Sequence[str]) -> np.ndarray:
    """Student label k -> dataset label (by class name); a class the dataset lacks maps to a value
    that is no class (scored as an error)."""
    index = {n.casefold(): k for k, n in enumerate(data_names, start=1)}
    missing = len(data_names) + 1
    return np.array([0] + [index.get(n.casefold(), missing) for n in student_names], np.int64)


def retrain_iter(
    dataset_dir: str | os.PathLike | Sequence[str | os.PathLike],
    checkpoint: Optional[str | os.PathLike],
    output: Optional[str | os.PathLike] = None,
    *,
    iterations: int = 300,
    settings: Any = None,
    teacher: Any = None,
    pretrained: Optional[str] = None,
    current: Optional[CurrentModel] = None,
    class_embeddings: Any = None,
    val_fraction: float = 0.2,
    unknown_edits: str = "labels",
    device: str = "auto",
    precision: str = "auto",
    text_cache: Any = "default",
) -> Generator[Progress, None, RetrainOutcome]:
    """Train a new student on the dataset so far and promote it only if it beats the current model.

    Args:
        dataset_dir: the series' dataset folder (or several).
        checkpoint: the current student (continued from), or None (a new student from scratch).
        output: where a promoted student is saved (default: over ``checkpoint``).
        iterations: iterations of this round.
        settings: :class:`~napari_maskclip.student.TrainSettings` of a new student (default: the
            checkpoint's, else the defaults); ``iterations`` and validation fields are set here.
        teacher, pretrained: the MaskCLIP teacher for pixels no person labelled, as for
            :func:`~napari_maskclip.student.train_iter` (None: the model recorded in the data).
        current: labels of the model in use now, for the comparison when there is no checkpoint
            (e.g. the page's MaskCLIP); ignored when ``checkpoint`` is given.
        class_embeddings: ``(K+1) x D`` classifier of a student from scratch (tests; default:
            the teacher's text embeddings).
        val_fraction: share of the images with human pixels held out (see the module doc).

    Yields ``Progress`` of the stages ``setup``, ``train`` (per iteration, as ``train_iter``)
    and ``validate`` (per held-out image); closing the generator cancels between iterations or
    images and writes nothing. Returns a :class:`RetrainOutcome`.
    """
    import torch

    from ..student.checkpoint import is_student_checkpoint, load_checkpoint
    from ..student.data import IGNORE, TrainingData, load_training_data
    from ..student.output import CheckpointOutput
    from ..student.settings import TrainSettings
    from ..student.training import train_iter

    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise InvalidInputError(f"iterations must be a whole number >= 1, got {iterations!r}.")
    current_path = Path(checkpoint) if checkpoint is not None else None
    out_path = Path(output) if output is not None else current_path
    if out_path is None:
        raise InvalidInputError(
            "Where should the new student go? Pass an output checkpoint path (e.g. student.safetensors)."
        )
    if out_path.exists() and not is_student_checkpoint(out_path):
        raise OutputError(
            f"{out_path} exists and is not a student checkpoint; napari-maskclip replaces only "
            "its own files: choose another path."
        )

    yield Progress("setup", 0, 0, "reading the dataset")
    paths = [dataset_dir] if isinstance(dataset_dir, (str, os.PathLike)) else list(dataset_dir)
    data = load_training_data(paths, unknown_edits=unknown_edits)
    human = [bool((s.trusted_mask() & (s.labels != IGNORE)).any()) for s in data.samples]
    train_pos, val_pos = split_for_validation([s.name for s in data.samples], human, val_fraction)
    train_samples = [data.samples[i] for i in train_pos]
    val_samples = [data.samples[i] for i in val_pos]

    ckpt = load_checkpoint(current_path, with_optimizer=False) if current_path is not None else None
    warm = ckpt is not None and [c.name.casefold() for c in ckpt.classes] == [
        c.casefold() for c in data.class_names]
    base = settings if settings is not None else (ckpt.settings if ckpt is not None else TrainSettings())
    run_settings = base.replace(iterations=iterations, val_fraction=0.0, val_interval=0,
                                save_interval=0).validate()
    train_data = TrainingData(samples=train_samples, classes=data.classes,
                              background=data.background, provenance=data.provenance,
                              sources=data.sources)
    extra: dict[str, Any] = {}
    if warm:
        extra.update(class_embeddings=ckpt.class_embeddings, init_weights=ckpt.model_state)
    elif class_embeddings is not None:
        extra.update(class_embeddings=class_embeddings)
    if teacher is None and ckpt is not None and (ckpt.meta.get("teacher") or {}).get("model") \
            and not data.provenance.get("model"):
        teacher = ckpt.meta["teacher"]["model"]
        pretrained = ckpt.meta["teacher"].get("pretrained")

    output_file = CheckpointOutput(out_path)
    output_file.open()  # locked for the round: one writer; a bad place is refused before training
    try:
        result = yield from train_iter(
            train_data, None, settings=run_settings, teacher=teacher, pretrained=pretrained,
            device=device, precision=precision, text_cache=text_cache, **extra,
        )
        net = result.net.eval()
        n_val = len(val_samples)
        confusion_new = np.zeros((len(data.classes) + 1, len(data.classes) + 2), np.int64)
        confusion_cur = confusion_new.copy()
        current_net = ckpt.build_network().to(next(net.parameters()).device) if ckpt is not None else None
        lut_new = _class_lut(data.class_names, data.class_names)
        lut_cur = (_class_lut([c.name for c in ckpt.classes], data.class_names)
                   if ckpt is not None else None)
        pixels = 0
        with torch.no_grad():
            for done, sample in enumerate(val_samples):
                yield Progress("validate", done, n_val, f"validating on {sample.name}")
                trusted = sample.trusted_mask() & (sample.labels != IGNORE)
                pixels += int(trusted.sum())
                unit = sample.image_float()
                _confusion_add(confusion_new, _student_labels(net, unit, lut_new), sample.labels,
                               trusted)
                if current_net is not None:
                    pred = _student_labels(current_net, unit, lut_cur)
                elif current is not None:
                    pred = np.asarray(current(_as_uint8(sample)))
                else:
                    pred = None
                if pred is not None:
                    _confusion_add(confusion_cur, pred, sample.labels, trusted)
        miou_new = _miou(confusion_new)
        has_current = current_net is not None or current is not None
        miou_cur = _miou(confusion_cur) if has_current else None
        if miou_new is None:
            promoted, reason = False, "no held-out image has pixels a person labelled"
        elif miou_cur is None:
            promoted, reason = False, "there is no current model to compare with"
        elif miou_new > miou_cur:
            promoted, reason = True, f"new {miou_new:.3f} beats current {miou_cur:.3f}"
        else:
            promoted, reason = False, f"new {miou_new:.3f} does not beat current {miou_cur:.3f}"
        before = ckpt.iteration if warm else 0
        total = before + result.iteration
        if promoted:
            meta = _promoted_meta(result, ckpt if warm else None, total, val_samples, miou_new,
                                  miou_cur)
            yield Progress("save", 0, 1, f"saving the new student to {out_path}")
            output_file.save(net.cpu(), meta, None, total)
            yield Progress("save", 1, 1, f"saved the new student ({reason})")
        chosen = out_path if promoted else current_path
        return RetrainOutcome(
            checkpoint=chosen, miou_new=miou_new, miou_current=miou_cur, promoted=promoted,
            reason=reason, iterations=result.iteration, total_iterations=total,
            validation=[s.name for s in val_samples], validation_pixels=pixels,
            warm_start=warm, result=result,
        )
    finally:
        output_file.close()


def _as_uint8(sample: Any) -> np.ndarray:
    """A held-out sample's image for a model that takes images as read (0..255 RGB)."""
    image = sample.image
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def _promoted_meta(result: Any, previous: Any, total: int, val_samples: list, miou_new: float,
                   miou_cur: Optional[float]) -> dict[str, Any]:
    """The new checkpoint's description: iterations and history add up over the rounds (so the
    page can say "student (iteration 600)"), and the round's validation is recorded."""
    meta = dict(result.meta)
    settings = dict(meta["settings"])
    settings["iterations"] = total
    history = []
    before = 0
    if previous is not None:
        history = list(previous.meta.get("history", []))
        before = previous.iteration
        if previous.meta.get("teacher") and not meta.get("teacher"):
            meta["teacher"] = previous.meta["teacher"]
    history += [dict(h, iteration=h["iteration"] + before) for h in result.history]
    rounds = list((previous.meta.get("retrain") or {}).get("rounds", [])) if previous is not None else []
    rounds.append({"iterations": result.iteration, "total_iterations": total,
                   "val": [s.name for s in val_samples], "val_miou_new": miou_new,
                   "val_miou_current": miou_cur})
    meta.update(settings=settings, iteration=total, complete=True, history=history,
                retrain={"rounds": rounds[-100:]})
    return meta
