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
and when the generator is closed (cancel) or Ctrl-C is pressed: then it holds the last completed
iteration, so nothing is lost and ``resume=True`` continues from there. Because all randomness
derives from ``(seed, iteration)`` and the optimiser state is saved, a resumed run reproduces an
uninterrupted one exactly (bit for bit on the CPU).

The code is a prepare-the-run step (:func:`_prepare_iter`: settings, the checkpoint's place - see
:mod:`.output` - data, teacher, network, optimiser) and a step loop (:func:`_steps_iter`), whose
unit is one whole iteration (:func:`_iteration`: :func:`_train_step`, whose forward pass and loss
are :func:`_forward_loss`, then validation and saving when due). Ctrl-C is held back until the
unit is complete (:mod:`napari_maskclip.interrupts`), so a saved state is never half a step.

Under ``torchrun`` (a process group is initialised, see :mod:`.distributed`) the same code trains
data-parallel: each rank computes its share of every global batch, DDP averages the gradients,
and rank 0 alone locks, validates and saves; the ranks agree after every iteration whether one of
them was interrupted, so all stop after the same iteration.
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
from ..interrupts import interrupts_deferred
from ..progress import Progress, run_to_completion
from . import distributed
from .checkpoint import StudentCheckpoint, classes_to_json, load_checkpoint
from .data import (
    IGNORE,
    Batch,
    Sample,
    TrainingData,
    augment_batch,
    batch_indices,
    compose_targets,
    iteration_rng,
    split_indices,
)
from .network import StudentNet, backbone_weights_iter, build_student, load_backbone_state
from .output import CheckpointOutput
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


def segmentation_loss(
    logits: torch.Tensor, targets: torch.Tensor, pixels: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean cross-entropy over pixels whose target is not :data:`~.data.IGNORE` (0 if none).

    With ``pixels`` the sum is divided by that count instead of this batch's own: a data-parallel
    rank divides by the global count, so that the ranks' losses add up to the global mean."""
    if pixels is None:
        if not bool((targets != IGNORE).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, targets, ignore_index=IGNORE)
    if not bool(pixels > 0):
        return logits.sum() * 0.0
    summed = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return summed / pixels.to(summed.dtype)


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
        recorded = SegmentSettings.from_dict(dataset)
        if recorded.regions == "labels":  # a user's label image made them; random crops have none
            recorded = recorded.replace(regions=None)
        return recorded.validate()
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


def _restore(net: StudentNet, optimizer: torch.optim.Optimizer, ckpt: StudentCheckpoint) -> None:
    """Load a checkpoint's weights and optimiser state into a fresh network and optimiser; a
    checkpoint whose tensors do not fit gives one :class:`ModelLoadError` naming it."""
    where = ckpt.path or "the checkpoint"
    backbone = ckpt.settings.backbone
    try:
        net.load_state_dict(ckpt.model_state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"The weights in {where} do not fit a {backbone} student: {str(exc).splitlines()[0]}"
        ) from exc
    if ckpt.optimizer_state is None:
        raise InvalidInputError(f"{where} holds no optimiser state, so training cannot resume.")
    params = list(net.parameters())
    groups = ckpt.optimizer_state["param_groups"]
    if len(groups[0]["params"]) != len(params):
        raise ModelLoadError(
            f"The optimiser state in {where} is for {len(groups[0]['params'])} parameters, the "
            f"{backbone} student has {len(params)}; the checkpoint is damaged."
        )
    for index, entries in ckpt.optimizer_state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor) and (
                value.shape != params[index].shape or value.dtype != params[index].dtype
            ):
                raise ModelLoadError(
                    f"The optimiser state optimizer/{index}/{name} in {where} does not fit its "
                    f"parameter ({tuple(value.shape)} {value.dtype}, expected "
                    f"{tuple(params[index].shape)} {params[index].dtype}); the checkpoint is damaged."
                )
    try:
        optimizer.load_state_dict(ckpt.optimizer_state)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"The optimiser state in {where} cannot be used: {exc}") from exc


def _checkpoint_bytes(net: StudentNet, iterations: int) -> int:
    """About how large the checkpoint of ``net`` grows: weights and statistics, one momentum
    buffer per trained parameter, and the description (its history grows per iteration)."""
    state = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    return state + momentum + 200 * iterations + 2**20


@dataclass
class _Run:
    """A run prepared by :func:`_prepare_iter`: everything the step loop needs."""

    settings: TrainSettings
    device: torch.device
    net: StudentNet
    optimizer: torch.optim.Optimizer
    teacher: Any  # a .teacher.Teacher, or None when no pixel needs pseudo-labels from it
    train_samples: list[Sample]
    val_samples: list[Sample]
    meta: dict[str, Any]
    history: list[dict[str, Any]]
    start: int
    output: Optional[CheckpointOutput]  # None on ranks other than 0
    ranks: distributed.Ranks = field(default_factory=distributed.Ranks)
    model: Optional[torch.nn.Module] = None  # what the step runs: DDP(net) on several ranks
    precision: str = "fp32"  # of the student's forward pass (autocast), resolved

    @property
    def forward(self) -> torch.nn.Module:
        return self.model if self.model is not None else self.net

    @property
    def total(self) -> int:
        return self.settings.iterations

    @property
    def path(self) -> Optional[Path]:
        return self.output.path if self.output is not None else None

    def stage(self, iteration: int) -> str:
        return "teacher" if iteration < self.settings.self_train_start else "self-training"

    def save(self, iteration: int) -> None:
        """Record ``iteration`` completed steps in the description and save the checkpoint."""
        self.meta.update(iteration=iteration, complete=iteration >= self.total, history=self.history)
        if self.output is not None:
            self.output.save(self.net, self.meta, self.optimizer, iteration)

    def result(self, iteration: int) -> TrainResult:
        self.meta.update(iteration=iteration, complete=True)
        self.ranks.barrier()  # the others wait for rank 0's last validation and save
        return TrainResult(self.net.eval(), self.meta, self.path, iteration, True, self.history)


def train_iter(
    data: DataLike,
    checkpoint: Optional[str | os.PathLike] = None,
    *,
    settings: Optional[TrainSettings] = None,
    teacher: TeacherLike = None,
    pretrained: Optional[str] = None,
    class_embeddings: Optional[torch.Tensor] = None,
    init_weights: Optional[dict[str, torch.Tensor]] = None,
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
        init_weights: a new run starts from this student state dict (e.g. an earlier
            checkpoint's ``model_state``, with its ``class_embeddings``) instead of backbone
            weights: a warm start on other data, with a fresh optimiser and schedule.
        resume: continue from ``checkpoint`` at its saved iteration (the settings come from the
            checkpoint; ``iterations``, ``val_interval`` and ``save_interval`` may change).
        overwrite: replace an existing checkpoint instead of refusing.
        device: ``auto``, ``cpu``, ``cuda``, ``mps``.
        precision: ``auto``, ``fp32``, ``bf16`` of the student's forward pass (autocast; the loss
            and the optimiser stay fp32) and of the teacher (``auto``: bf16 on a CPU with native
            bf16, fp32 on other CPUs; see :mod:`napari_maskclip.engine.precision`).

    Progress ``info``: ``loss``, ``lr``, ``stage`` ("teacher" / "self-training"), ``it_per_s``,
    and ``val_miou`` after a validation. Closing the generator saves the last completed iteration.
    The checkpoint is locked for the whole run and checked before the first iteration (see
    :mod:`.output`); Ctrl-C takes effect between iterations only.
    """
    output = CheckpointOutput(checkpoint) if checkpoint is not None else None
    try:
        run = yield from _prepare_iter(
            data, output, settings=settings, teacher=teacher, pretrained=pretrained,
            class_embeddings=class_embeddings, init_weights=init_weights, resume=resume,
            overwrite=overwrite, device=device,
            text_cache=text_cache, precision=precision, overrides=overrides,
        )
        return (yield from _steps_iter(run))
    finally:
        if output is not None:
            output.close()


def _prepare_iter(
    data: DataLike,
    output: Optional[CheckpointOutput],
    *,
    settings: Optional[TrainSettings],
    teacher: TeacherLike,
    pretrained: Optional[str],
    class_embeddings: Optional[torch.Tensor],
    resume: bool,
    init_weights: Optional[dict[str, torch.Tensor]] = None,
    overwrite: bool,
    device: str | torch.device,
    text_cache: Optional[TextEmbeddingCache] | str,
    precision: str,
    overrides: dict[str, Any],
) -> Generator[Progress, None, _Run]:
    """Everything before the first iteration: settings, the checkpoint's place (locked, proven
    writable), data and split, teacher, network and optimiser (restored when resuming)."""
    settings = settings or TrainSettings()
    ranks = distributed.current()
    path = output.path if output is not None else None
    if not ranks.main:
        # Rank 0 prepares first: it checks and locks the output, fills the caches, downloads;
        # the others neither lock nor write (their output is None), they read what rank 0 wrote.
        ranks.barrier()
        output = None
    if resume and path is None:
        raise InvalidInputError("resume=True needs a checkpoint path.")
    if resume:
        refused = sorted(set(overrides) - set(RESUME_OVERRIDES))
        if refused:
            raise InvalidInputError(
                f"A resumed run keeps its settings; {', '.join(refused)} cannot change "
                "(start a new run with --overwrite instead)."
            )
    else:
        settings = (settings.replace(**overrides) if overrides else settings).validate()
    if output is not None:
        output.open()  # folder, lock, a killed run's temporary files, probe
    ckpt: Optional[StudentCheckpoint] = None
    if resume:
        if not path.is_file():
            raise InvalidInputError(f"Nothing to resume: {path} does not exist. Start without --resume.")
        ckpt = load_checkpoint(path)
        if output is not None:
            output.saved = ckpt.iteration
        settings = ckpt.settings.replace(**overrides)
    elif path is not None and path.exists() and not overwrite:
        raise InvalidInputError(
            f"{path} exists already: pass --resume to continue it or --overwrite to replace it."
        )
    settings.validate()
    if settings.batch_size % ranks.world_size:
        raise InvalidInputError(
            f"The batch of {settings.batch_size} crops does not split evenly over "
            f"{ranks.world_size} processes; use a batch size divisible by {ranks.world_size} "
            "(a resumed run keeps its batch size: start a number of processes that divides it)."
        )
    per_rank = settings.batch_size // ranks.world_size
    if per_rank < 2 and settings.backbone != "tiny" and not settings.frozen_batch_norm:
        raise InvalidInputError(
            f"Each of the {ranks.world_size} processes would get {per_rank} crop per step, too "
            "few for batch norm; use a larger batch, fewer processes, or --frozen-batch-norm."
        )
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
    needs_pseudo = any(s.needs_teacher for s in train_samples)
    needs_teacher = (needs_pseudo and start < settings.self_train_start) or (
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
    if ckpt is None and init_weights is not None:
        try:
            net.load_state_dict(init_weights, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"The initial weights do not fit a {settings.backbone} student: "
                f"{str(exc).splitlines()[0]}"
            ) from exc
        weights_note = "from an earlier student"
    elif ckpt is None:
        yield Progress("setup", 0, 0, "finding the backbone's initial weights")
        state, weights_note = yield from backbone_weights_iter(settings.backbone, settings.backbone_weights)
        if state is not None:
            load_backbone_state(net, state, weights_note)
    yield Progress("setup", 0, 0, f"backbone {settings.backbone}: {weights_note}",
                   info={"backbone_weights": weights_note})
    if ranks.active and dev.type == "cuda" and not settings.frozen_batch_norm:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # statistics of the global batch
    net.to(dev)
    _train_mode(net, settings)
    optimizer = torch.optim.SGD(net.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    if ckpt is not None:
        _restore(net, optimizer, ckpt)
    if output is not None:
        output.require_space(_checkpoint_bytes(net, total))
    model = None
    if ranks.active:
        if ranks.main:
            ranks.barrier()  # now the others prepare (from the caches rank 0 filled)
        from torch.nn.parallel import DistributedDataParallel

        ids = None
        if dev.type == "cuda":
            ids = [dev.index if dev.index is not None else torch.cuda.current_device()]
        model = DistributedDataParallel(net, device_ids=ids)  # checks that all ranks agree

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
        "world_size": ranks.world_size,
        "precision": student_precision,
    }
    return _Run(settings, dev, net, optimizer, teacher_obj, train_samples, val_samples, meta,
                history, start, output, ranks, model, student_precision)


def _train_mode(net: StudentNet, settings: TrainSettings) -> None:
    """Training mode, with the batch-norm layers in eval mode when they are frozen."""
    net.train()
    if settings.frozen_batch_norm:
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def _steps_iter(run: _Run) -> Generator[Progress, None, TrainResult]:
    """The step loop: one whole iteration at a time (:func:`_iteration`), progress between them.

    Ctrl-C is held back until the iteration in progress is complete (:func:`interrupts_deferred`)
    and closing the generator acts at a ``yield``, so a cancelled run saves a state in which the
    weights, the batch-norm statistics and the optimiser all belong to the same iteration."""
    total, it = run.total, run.start
    if it >= total:
        yield Progress("train", it, total, "already trained to the end", info={"stage": "done"})
        return run.result(it)
    stage_seen = None
    tic = time.perf_counter()
    whole = True  # the state is that of a completed iteration
    yield Progress("train", it, total, f"training from iteration {it}", info={"stage": run.stage(it)})
    try:
        while it < total:
            whole = False
            with interrupts_deferred() as held:
                record = _iteration(run, it)
                it += 1
                whole = True
                # Data-parallel: all ranks stop after the iteration in which one was interrupted.
                stop = run.ranks.active and run.ranks.any(bool(held), run.device)
            if stop:
                raise KeyboardInterrupt
            elapsed = time.perf_counter() - tic
            rate = (it - run.start) / elapsed if elapsed > 0 else None
            stage = record["stage"]
            message = f"iteration {it}/{total} ({stage}) loss {record['loss']:.4f}"
            if record.get("val_miou") is not None:
                message += f", validation mIoU {record['val_miou']:.3f}"
            if stage != stage_seen and stage == "self-training":
                message += " - self-training: the student's own predictions replace the teacher's"
            stage_seen = stage
            yield Progress("train", it, total, message, info=dict(record, it_per_s=rate))
    except (GeneratorExit, KeyboardInterrupt):
        # Cancelled: keep what is done. Not if a second Ctrl-C broke into an iteration (the
        # state is half-updated): then the last save stands.
        saved = run.output.saved if run.output is not None else None
        if run.output is not None and whole and it > run.start and it != saved:
            run.save(it)
        raise
    return run.result(it)


def _iteration(run: _Run, it: int) -> dict[str, Any]:
    """Iteration ``it`` (0-based) in full: the optimiser step, validation and the checkpoint
    when due; returns its history record."""
    settings = run.settings
    record = _train_step(run, it)
    done = it + 1
    due = settings.val_interval and done % settings.val_interval == 0
    validate = bool((done == run.total or due) and run.val_samples)
    if validate and run.ranks.main:
        record["val_miou"] = _validate(run.net, run.val_samples, settings.crop_size, run.device)
        _train_mode(run.net, settings)
    run.history.append(record)
    save = bool(settings.save_interval and done % settings.save_interval == 0) or done == run.total
    if save:
        run.save(done)  # on rank 0 only: the others have no output
    if (validate or save) and done < run.total:
        run.ranks.barrier()  # the others wait for rank 0 (after the last one, in result())
    return record


def _train_step(run: _Run, it: int) -> dict[str, Any]:
    """One SGD step on the batch of iteration ``it``; everything random derives from
    ``(seed, it)``. Returns the record ``iteration``, ``loss``, ``lr``, ``stage``."""
    settings = run.settings
    stage = run.stage(it)
    lr = poly_lr(settings, it)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    # The global batch (the crops one process draws), of which this rank computes its share.
    picked = [run.train_samples[i]
              for i in batch_indices(len(run.train_samples), settings.batch_size, it, settings.seed)]
    batch = augment_batch(picked, iteration_rng(settings.seed, it), settings.crop_size,
                          (settings.scale_min, settings.scale_max), settings.flip,
                          keep=run.ranks.share(settings.batch_size)).to(run.device)
    open_pixels = bool((~batch.trusted & batch.valid & (batch.labels != IGNORE)).any())
    teacher_labels = None
    if open_pixels and stage == "teacher":
        teacher_labels = run.teacher.pseudo_labels(batch.images)
    fork_devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        # Rank 0 draws what one process draws; other ranks their own (dropout is not shared).
        stream = 1 if run.ranks.main else (1 << 16) + run.ranks.rank
        torch.manual_seed(int(iteration_rng(settings.seed, it, stream).integers(2**62)))
        loss = _forward_loss(run.forward, batch, teacher_labels,
                             self_training=open_pixels and stage == "self-training",
                             ranks=run.ranks, precision=run.precision)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP: all-reduces (averages) the gradients
    # The global batch's loss: the ranks' shares add up to it, times W (see _forward_loss).
    loss_value = float(run.ranks.sum(loss.detach())) / run.ranks.world_size
    if not math.isfinite(loss_value):
        raise InvalidInputError(
            f"The loss became {loss_value} at iteration {it + 1}; lower the learning rate "
            "(--lr) and train anew."
        )
    run.optimizer.step()
    return {"iteration": it + 1, "loss": loss_value, "lr": lr, "stage": stage}


def _forward_loss(
    net: torch.nn.Module, batch: Batch, pseudo: Optional[torch.Tensor], *, self_training: bool,
    ranks: distributed.Ranks = distributed.Ranks(), precision: str = "fp32",
) -> torch.Tensor:
    """The student's forward pass and loss on one batch.

    Targets: a person's labels where trusted, else ``pseudo`` (the teacher's labels), or in the
    self-training stage the student's own: the argmax of this same forward pass, detached, as in
    the official MaskCLIP+ head (so the stage costs no extra forward); ignored pixels do not count.

    On several ranks the loss is the rank's summed cross-entropy divided by the global batch's
    number of counted pixels, times the number of ranks: DDP averages the gradients over the
    ranks, so the update is that of the global batch's mean (ranks count different pixels).

    The forward pass runs under autocast to ``precision``; the loss is fp32 in every precision.
    """
    with autocast_context(batch.images.device, precision):
        logits = net(batch.images)
    logits = logits.float()
    if self_training:
        pseudo = logits.detach().argmax(dim=1)
    targets = compose_targets(batch.labels, batch.trusted, batch.valid, pseudo)
    if not ranks.active:
        return segmentation_loss(logits, targets)
    counted = ranks.sum((targets != IGNORE).sum())
    return segmentation_loss(logits, targets, counted) * ranks.world_size


def train(data: DataLike, checkpoint: Optional[str | os.PathLike] = None, **kwargs: Any) -> TrainResult:
    """:func:`train_iter`, run to the end."""
    return run_to_completion(train_iter(data, checkpoint, **kwargs))
