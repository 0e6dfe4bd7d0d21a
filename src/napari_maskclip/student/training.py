"""Training a MaskCLIP+ student: a generator shared by the widget, the CLI and tests.

    gen = train_iter(["dataset/"], "student.safetensors", teacher="ViT-B-16", pretrained="openai")
    result = run_to_completion(gen, print)       # Progress("train", it, total, info={"loss": ...})

Per iteration (method.md section 6):

1. a batch of crops is drawn and augmented (random scale, crop, flip), reproducibly from
   ``(seed, iteration)``;
2. targets: a person's labels where given (trusted pixels); every other pixel gets the frozen
   MaskCLIP teacher's label on the same crop (teacher stage) or, after ``self_train_fraction`` of
   the schedule, the student's own prediction (self-training stage); ignored pixels (255 in the
   mask, padding, teacher pixels below the confidence threshold) do not count;
3. cross-entropy, one SGD step with poly decay.

Self-training follows the official MaskCLIP+ head: the student's own labels are the argmax of the
logits of the same (training-mode) forward pass, detached, so the stage costs no extra forward.

Validation mIoU is measured on held-out images, on their trusted pixels (a person's labels; the
teacher's own labels would only measure agreement with the teacher), every ``val_interval``
iterations and at the end. The checkpoint is saved every ``save_interval`` iterations, at the end,
and when the generator is closed (cancel): then it holds the last completed iteration, so nothing
is lost and ``resume=True`` continues from there. Because all randomness derives from
``(seed, iteration)`` and the optimiser state is saved, a resumed run reproduces an uninterrupted
one exactly (bit for bit on the CPU).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.device import resolve_device
from ..engine.loading import LoadedModel, load_clip
from ..engine.precision import autocast_context, resolve_autocast
from ..engine.segmenter import Segmenter
from ..engine.settings import SegmentSettings
from ..engine.text import TextEmbeddingCache
from ..errors import DatasetError, InvalidInputError, ModelLoadError
from ..progress import Progress, run_to_completion
from .checkpoint import (
    StudentCheckpoint,
    classes_to_json,
    load_checkpoint,
    save_checkpoint,
)
from .data import (
    IGNORE,
    Sample,
    TrainingData,
    augment_batch,
    batch_indices,
    compose_targets,
    iteration_rng,
    split_indices,
)
from .network import StudentNet, backbone_weights_iter, build_student, load_backbone_state
from .predict import StudentSegmenter, predict_logits_iter
from .settings import TrainSettings

__all__ = ["TrainResult", "train_iter", "train", "segmentation_loss", "poly_lr"]

DataLike = TrainingData | str | os.PathLike | Sequence[str | os.PathLike]
TeacherLike = Segmenter | LoadedModel | str | None
#: Settings a resumed run may change (they do not alter what is computed up to the end).
RESUME_OVERRIDES = ("iterations", "val_interval", "save_interval")


@dataclass
class TrainResult:
    """What a finished (or cancelled) run leaves: the network, where it is saved, its history."""

    net: StudentNet
    meta: dict[str, Any]
    checkpoint: Optional[Path]
    iteration: int
    complete: bool
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def val_miou(self) -> Optional[float]:
        """The last validation mIoU (None when there was no validation)."""
        values = [h["val_miou"] for h in self.history if h.get("val_miou") is not None]
        return values[-1] if values else None

    def segmenter(self, device: str = "auto", precision: str = "auto") -> StudentSegmenter:
        """A :class:`StudentSegmenter` on these weights (no file needed)."""
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        return StudentSegmenter(StudentCheckpoint(self.meta, state, None, self.checkpoint),
                                device=device, precision=precision)


def poly_lr(settings: TrainSettings, iteration: int) -> float:
    """The learning rate of ``iteration`` (0-based): ``lr (1 - it / total) ** power``."""
    return settings.lr * (1.0 - iteration / settings.iterations) ** settings.poly_power


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over pixels whose target is not :data:`~.data.IGNORE` (0 if none)."""
    if not bool((targets != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=IGNORE)


def _load_data(data: DataLike, settings: TrainSettings) -> TrainingData:
    if isinstance(data, TrainingData):
        return data
    from .data import load_training_data

    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    return load_training_data(paths, unknown_edits=settings.unknown_edits)


def _resolve_teacher_model(
    teacher: TeacherLike, pretrained: Optional[str], fallback: dict[str, Any], device: torch.device,
    precision: str = "auto",
) -> tuple[LoadedModel, Optional[SegmentSettings], dict[str, Any]]:
    """(loaded CLIP, its segmenter's settings if any, how to load it again)."""
    if isinstance(teacher, Segmenter):
        return teacher.loaded, teacher.settings, {}
    if isinstance(teacher, LoadedModel):
        return teacher, None, {}
    if teacher is None:
        if not fallback.get("model"):
            raise InvalidInputError(
                "Which CLIP model is the teacher? The data does not say: pass --model and "
                "--pretrained (the model that made the labels, e.g. ViT-B-16 openai, or demo)."
            )
        model, weights = str(fallback["model"]), fallback.get("pretrained")
        try:
            loaded = load_clip(model, weights, device=device, precision=precision)
        except ModelLoadError as exc:
            raise ModelLoadError(
                f"The recorded teacher (model {model!r}, weights {weights!r}) cannot be loaded "
                f"({exc}); pass --model and --pretrained."
            ) from exc
        return loaded, None, {"model": model, "pretrained": weights}
    loaded = load_clip(str(teacher), pretrained, device=device, precision=precision)
    return loaded, None, {"model": str(teacher), "pretrained": pretrained}


def _teacher_settings(
    settings: TrainSettings,
    resumed: Optional[dict[str, Any]],
    segmenter_settings: Optional[SegmentSettings],
    dataset: Optional[dict[str, Any]],
) -> SegmentSettings:
    """The teacher's MaskCLIP settings: explicit training settings, else those of the run being
    resumed (so it continues exactly), else the given Segmenter's, else the ones recorded in the
    dataset (what made its labels), else the engine's defaults."""
    for candidate in (settings.teacher_settings, resumed):
        if candidate is not None:
            return SegmentSettings.from_dict(candidate).validate()
    if segmenter_settings is not None:
        return segmenter_settings
    if dataset:
        return SegmentSettings.from_dict(dataset).validate()
    return SegmentSettings()


def _validate(net: StudentNet, samples: list[Sample], crop: int, device: torch.device) -> Optional[float]:
    """mIoU of the student on the trusted pixels of ``samples`` (None if there are none)."""
    from ..evaluate import confusion_matrix, scores_from_confusion

    n = net.num_classes
    confusion = np.zeros((n, n + 1), dtype=np.int64)
    was_training = net.training
    net.eval()
    try:
        for sample in samples:
            targets = np.where(sample.trusted_mask(), sample.labels, IGNORE)
            if not np.any(targets != IGNORE):
                continue
            logits = run_to_completion(
                predict_logits_iter(net, sample.image_float(), window=max(crop, 512), device=device)
            )
            pred = logits.argmax(dim=0).numpy()
            confusion += confusion_matrix(pred, targets, n, ignore_index=IGNORE)
    finally:
        net.train(was_training)
    if int(confusion.sum()) == 0:
        return None
    return scores_from_confusion(confusion).miou


def _check_resume(ckpt: StudentCheckpoint, data: TrainingData, names: dict[str, list[str]]) -> None:
    saved = [c.name for c in ckpt.classes]
    if saved != data.class_names:
        raise DatasetError(
            f"The checkpoint was trained on classes {saved}, the data has {data.class_names}; "
            "resume with the same datasets, or train a new student (--overwrite)."
        )
    split = ckpt.meta.get("split") or {}
    if split and (split.get("train") != names["train"] or split.get("val") != names["val"]):
        raise DatasetError(
            "The images differ from those the checkpoint was trained on, so the run cannot "
            "continue exactly; resume with the same datasets, or train anew (--overwrite)."
        )


def train_iter(
    data: DataLike,
    checkpoint: Optional[str | os.PathLike] = None,
    *,
    settings: Optional[TrainSettings] = None,
    teacher: TeacherLike = None,
    pretrained: Optional[str] = None,
    class_embeddings: Optional[torch.Tensor] = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device = "auto",
    text_cache: Optional[TextEmbeddingCache] | str = "default",
    precision: str = "auto",
    **overrides: Any,
) -> Generator[Progress, None, TrainResult]:
    """Train (or resume training) a student; yields ``Progress("train", it, total, info=...)``.

    Args:
        data: :class:`TrainingData`, or one or more exported dataset folders.
        checkpoint: where the checkpoint goes (``.safetensors``); None keeps it in memory only.
        settings: :class:`TrainSettings` (``overrides`` change single fields).
        teacher: the MaskCLIP teacher: a :class:`~napari_maskclip.engine.Segmenter` (its settings
            are the teacher's), a loaded CLIP, or a model name/config with ``pretrained``; None:
            the model recorded in the data (or the checkpoint when resuming). Only loaded when
            some pixels need pseudo-labels or the class embeddings must be computed.
        class_embeddings: ``(K+1) x D`` classifier weights (row 0 background) instead of the
            teacher's text embeddings (advanced; tests).
        resume: continue from ``checkpoint`` at its saved iteration (the settings come from the
            checkpoint; ``iterations``, ``val_interval`` and ``save_interval`` may change).
        overwrite: replace an existing checkpoint instead of refusing.
        device: ``auto``, ``cpu``, ``cuda``, ``mps``.
        precision: ``auto``, ``fp32``, ``bf16`` of the student's forward pass (autocast; the loss
            and the optimiser stay fp32) and of the teacher (``auto``: bf16 on a CPU with native
            bf16, fp32 on other CPUs; see :mod:`napari_maskclip.engine.precision`).

    Progress ``info``: ``loss``, ``lr``, ``stage`` ("teacher" / "self-training"), ``it_per_s``,
    and ``val_miou`` after a validation. Closing the generator saves the last completed iteration.
    """
    settings = settings or TrainSettings()
    ckpt: Optional[StudentCheckpoint] = None
    path = Path(checkpoint) if checkpoint is not None else None
    if resume:
        if path is None or not path.is_file():
            raise InvalidInputError(
                f"Nothing to resume: {path} does not exist. Start without --resume."
                if path is not None else "resume=True needs a checkpoint path."
            )
        ckpt = load_checkpoint(path)
        changes = {k: v for k, v in overrides.items() if k in RESUME_OVERRIDES}
        refused = sorted(set(overrides) - set(RESUME_OVERRIDES))
        if refused:
            raise InvalidInputError(
                f"A resumed run keeps its settings; {', '.join(refused)} cannot change "
                "(start a new run with --overwrite instead)."
            )
        settings = ckpt.settings.replace(**changes)
    else:
        if path is not None and path.exists() and not overwrite:
            raise InvalidInputError(
                f"{path} exists already: pass --resume to continue it or --overwrite to replace it."
            )
        settings = settings.replace(**overrides) if overrides else settings
    settings.validate()
    dev = resolve_device(device)
    student_precision = resolve_autocast(dev, precision, training=True)
    start = ckpt.iteration if ckpt is not None else 0
    total = settings.iterations
    if start > total:
        raise InvalidInputError(
            f"The checkpoint is at iteration {start}, beyond the {total} asked for; "
            "pass a larger --iterations."
        )

    yield Progress("setup", 0, 0, "reading the training data")
    data = _load_data(data, settings)
    if not data.samples:
        raise DatasetError("The datasets hold no images.")
    train_idx, val_idx = split_indices(len(data.samples), settings.val_fraction, settings.seed)
    train_samples = [data.samples[i] for i in train_idx]
    val_samples = [data.samples[i] for i in val_idx]
    names = {"train": [s.name for s in train_samples], "val": [s.name for s in val_samples]}
    if ckpt is not None:
        _check_resume(ckpt, data, names)
    self_start = settings.self_train_start
    needs_pseudo = any(s.needs_teacher for s in train_samples)
    needs_teacher = (needs_pseudo and start < self_start) or (
        ckpt is None and class_embeddings is None
    )

    teacher_obj = None
    teacher_record: Optional[dict[str, Any]] = ckpt.meta.get("teacher") if ckpt is not None else None
    if needs_teacher:
        yield Progress("setup", 0, 0, "loading the MaskCLIP teacher")
        fallback = teacher_record or data.provenance
        loaded, seg_settings, how = _resolve_teacher_model(teacher, pretrained, fallback, dev,
                                                           precision)
        if teacher_record and teacher_record.get("identity") not in (None, loaded.identity):
            raise InvalidInputError(
                f"The checkpoint was trained with teacher {teacher_record.get('model')} "
                f"({teacher_record.get('pretrained')}), not {loaded.describe()}; resume with "
                "the same teacher."
            )
        from .teacher import Teacher

        teacher_obj = Teacher(
            loaded, data.classes, data.background,
            _teacher_settings(settings, (teacher_record or {}).get("settings"), seg_settings,
                              data.provenance.get("settings")).replace(precision=precision),
            confidence_threshold=settings.confidence_threshold,
            text_cache=text_cache, record=how,
        )
        teacher_record = teacher_obj.record()

    # The network.
    if ckpt is not None:
        embeddings = ckpt.class_embeddings
        weights_note = ckpt.meta.get("backbone_weights", "from checkpoint")
    else:
        embeddings = class_embeddings if class_embeddings is not None else teacher_obj.class_embeddings()
        embeddings = embeddings.detach().float().cpu()
        if embeddings.ndim != 2 or embeddings.shape[0] != len(data.classes) + 1:
            raise InvalidInputError(
                f"class_embeddings must be {len(data.classes) + 1} x D (background + classes), "
                f"got {tuple(embeddings.shape)}."
            )
    net = build_student(settings.backbone, embeddings, normalize_features=settings.normalize_features,
                        feature_scale=settings.feature_scale, seed=settings.seed)
    if ckpt is not None:
        net.load_state_dict(ckpt.model_state, strict=True)
    else:
        yield Progress("setup", 0, 0, "finding the backbone's initial weights")
        state, weights_note = yield from backbone_weights_iter(settings.backbone, settings.backbone_weights)
        if state is not None:
            load_backbone_state(net, state, weights_note)
    yield Progress("setup", 0, 0, f"backbone {settings.backbone}: {weights_note}",
                   info={"backbone_weights": weights_note})
    net.to(dev).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    if ckpt is not None:
        if ckpt.optimizer_state is None:
            raise InvalidInputError(f"{path} holds no optimiser state, so training cannot resume.")
        optimizer.load_state_dict(ckpt.optimizer_state)

    history: list[dict[str, Any]] = list(ckpt.meta.get("history", [])) if ckpt is not None else []
    meta: dict[str, Any] = {
        "classes": classes_to_json(data.classes),
        "background": [b.text for b in data.background],
        "settings": settings.to_dict(),
        "teacher": teacher_record,
        "backbone_weights": weights_note,
        "split": names,
        "datasets": list(data.sources),
        "history": history,
        "precision": student_precision,
    }

    def snapshot(iteration: int) -> None:
        meta.update(iteration=iteration, complete=iteration >= total, history=history)
        if path is not None:
            save_checkpoint(path, net, meta, optimizer)

    it = start
    saved_at = start if ckpt is not None else -1
    if it >= total:
        meta.update(iteration=it, complete=True)
        yield Progress("train", it, total, "already trained to the end", info={"stage": "done"})
        return TrainResult(net.eval(), meta, path, it, True, history)

    stage_seen = None
    stepping = False
    tic = time.perf_counter()
    rate = None
    fork_devices = [dev] if dev.type == "cuda" else []
    yield Progress("train", it, total, f"training from iteration {it}",
                   info={"stage": "teacher" if it < self_start else "self-training"})
    try:
        while it < total:
            stage = "teacher" if it < self_start else "self-training"
            lr = poly_lr(settings, it)
            for group in optimizer.param_groups:
                group["lr"] = lr
            picked = [train_samples[i] for i in batch_indices(len(train_samples), settings.batch_size,
                                                              it, settings.seed)]
            batch = augment_batch(picked, iteration_rng(settings.seed, it), settings.crop_size,
                                  (settings.scale_min, settings.scale_max), settings.flip).to(dev)
            open_pixels = bool((~batch.trusted & batch.valid & (batch.labels != IGNORE)).any())
            pseudo = None
            if open_pixels and stage == "teacher":
                pseudo = teacher_obj.pseudo_labels(batch.images)
            with torch.random.fork_rng(devices=fork_devices):
                torch.manual_seed(int(iteration_rng(settings.seed, it, 1).integers(2**62)))
                with autocast_context(dev, student_precision):
                    logits = net(batch.images)
                logits = logits.float()  # the loss in fp32
                if open_pixels and stage == "self-training":
                    pseudo = logits.detach().argmax(dim=1)
                targets = compose_targets(batch.labels, batch.trusted, batch.valid, pseudo)
                loss = segmentation_loss(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise InvalidInputError(
                    f"The loss became {loss_value} at iteration {it + 1}; lower the learning rate "
                    "(--lr) and train anew."
                )
            stepping = True  # parameters change now: not a consistent state until it += 1
            optimizer.step()
            it += 1
            stepping = False
            elapsed = time.perf_counter() - tic
            rate = (it - start) / elapsed if elapsed > 0 else None
            record: dict[str, Any] = {"iteration": it, "loss": loss_value, "lr": lr, "stage": stage}
            validate_now = it == total or (settings.val_interval and it % settings.val_interval == 0)
            if validate_now and val_samples:
                record["val_miou"] = _validate(net, val_samples, settings.crop_size, dev)
            history.append(record)
            if (settings.save_interval and it % settings.save_interval == 0) or it == total:
                snapshot(it)
                saved_at = it
            info = dict(record, it_per_s=rate)
            message = f"iteration {it}/{total} ({stage}) loss {loss_value:.4f}"
            if record.get("val_miou") is not None:
                message += f", validation mIoU {record['val_miou']:.3f}"
            if stage != stage_seen and stage == "self-training":
                message += " - self-training: the student's own predictions replace the teacher's"
            stage_seen = stage
            yield Progress("train", it, total, message, info=info)
    except (GeneratorExit, KeyboardInterrupt):
        # Cancelled: keep what is done, as a consistent checkpoint of the last completed step
        # (not if Ctrl-C landed inside the optimiser step: then the last save stands).
        if path is not None and it > saved_at and it > start and not stepping:
            snapshot(it)
        raise
    meta.update(iteration=it, complete=True)
    return TrainResult(net.eval(), meta, path, it, True, history)


def train(data: DataLike, checkpoint: Optional[str | os.PathLike] = None, **kwargs: Any) -> TrainResult:
    """:func:`train_iter`, run to the end."""
    return run_to_completion(train_iter(data, checkpoint, **kwargs))
