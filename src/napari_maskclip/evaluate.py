"""Scoring label maps against ground truth: confusion matrix, per-class IoU, mIoU, pixel accuracy.

The pure part (numpy only, no torch) is shared by ``napari-maskclip evaluate``, the quality
benchmarks and the student's validation::

    cm = confusion_matrix(pred, gt, num_classes=3)            # accumulate: cm += ...
    scores = scores_from_confusion(cm, ["background", "cat", "dog"])
    scores.miou, scores.pixel_accuracy, scores.iou

Conventions:

* ``cm[g, p]`` counts pixels whose ground truth is ``g`` and prediction ``p``; it has one extra
  last column for predictions that are not a class (the ignore value, or out of range): those
  pixels are errors for their true class but a false positive for none.
* Ground-truth pixels equal to ``ignore_index`` (255; 65535 in uint16 masks) are not scored.
* IoU of class ``k`` = TP / (TP + FP + FN). A class absent from both the ground truth and the
  predictions has no IoU (NaN) and is **excluded from the mIoU**; a class predicted but absent
  from the ground truth scores 0 and counts. Pixel accuracy = correct / scored pixels.

The file-level part pairs prediction and ground-truth masks by file stem (``PRED_DIR`` may be a
``segment``/``predict`` output folder, a dataset, or a folder of masks; ``GT_DIR`` a dataset, its
``masks/`` folder, or a folder of masks) and, when both sides name their classes, maps predicted
labels onto the ground truth's classes by name.

A stack of masks (a ``segment``/``predict`` result of a z-stack or time series, or a ``T x Z x H
x W`` label TIFF in a folder of masks) counts as one mask per slice, named as ``export`` names
its samples (``<stem>_z0003``, ``<stem>_t0001_z0003``), so a stack's result pairs with its
exported dataset, a truth stack, or per-slice truth masks; each slice is read alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import numpy as np

from .array_checks import require_array, require_kind
from .errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    from .export.class_table import DatasetClasses

__all__ = [
    "confusion_matrix",
    "scores_from_confusion",
    "evaluate_arrays",
    "SegmentationScores",
    "FolderEvaluation",
    "evaluate_folders",
    "MaskSource",
    "find_masks",
    "MAX_EVAL_CLASSES",
]

#: The most classes scored (a uint16 label image's values): the confusion matrix is k x (k + 1).
MAX_EVAL_CLASSES = 65536


# ---- pure scoring --------------------------------------------------------------------------------
def confusion_matrix(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    *,
    ignore_index: Optional[int] = 255,
) -> np.ndarray:
    """``num_classes x (num_classes + 1)`` int64 counts: rows ground truth, columns prediction.

    The last column counts scored pixels whose prediction is not in ``0..num_classes-1``.
    Ground-truth values other than the classes and ``ignore_index`` are an error.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise InvalidInputError(f"num_classes must be a whole number, got {num_classes!r}.")
    k = int(num_classes)
    if not 1 <= k <= MAX_EVAL_CLASSES:
        raise InvalidInputError(
            f"num_classes must lie in 1..{MAX_EVAL_CLASSES} (background included), got {k}.")
    pred = np.asarray(require_array(pred, "The prediction"))
    gt = np.asarray(require_array(gt, "The ground truth"))
    require_kind(gt, "The ground truth", "biu", "integer labels")
    require_kind(pred, "The prediction", "biu", "integer labels")
    if pred.shape != gt.shape:
        raise InvalidInputError(f"Prediction {pred.shape} and ground truth {gt.shape} differ in shape.")
    g = gt.reshape(-1)
    p = pred.reshape(-1)
    if ignore_index is not None:
        keep = g != ignore_index
        if not keep.all():
            g = g[keep]
            p = p[keep]
    if g.size == 0:
        return np.zeros((k, k + 1), dtype=np.int64)
    lo, hi = int(g.min()), int(g.max())
    if lo < 0 or hi >= k:
        bad = hi if hi >= k else lo
        raise InvalidInputError(
            f"Ground-truth label {bad} is outside the {k} classes (0..{k - 1}) and is not the "
            f"ignore value {ignore_index}; give the class list (--classes) or the ignore index."
        )
    # Predictions outside 0..k-1 go to column k. Unsigned labels (the usual case) need no
    # negative check; everything stays one pass per step for speed on large images.
    if not np.issubdtype(p.dtype, np.integer):
        raise InvalidInputError(f"Predictions must be integer labels, got {p.dtype}.")
    if np.issubdtype(p.dtype, np.signedinteger):
        p = np.where(p < 0, k, p)
    index = g.astype(np.intp) * (k + 1)
    index += np.minimum(p, k)
    return np.bincount(index, minlength=k * (k + 1)).reshape(k, k + 1)


def _nan_to_none(value: float) -> Optional[float]:
    return None if value is None or math.isnan(value) else float(value)


@dataclass
class SegmentationScores:
    """Scores from a confusion matrix (see the module doc for the conventions)."""

    class_names: list[str]
    #: IoU per class; NaN for classes absent from both ground truth and prediction.
    iou: np.ndarray
    #: Recall per class (correct / ground-truth pixels); NaN for classes absent from the ground truth.
    accuracy: np.ndarray
    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    confusion: np.ndarray
    n_images: int = 0

    @property
    def n_pixels(self) -> int:
        return int(self.confusion.sum())

    @property
    def gt_pixels(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def pred_pixels(self) -> np.ndarray:
        k = self.confusion.shape[0]
        return self.confusion[:, :k].sum(axis=0)

    @property
    def unpredicted_pixels(self) -> int:
        """Scored pixels whose prediction was not a class (e.g. ignore)."""
        return int(self.confusion[:, -1].sum()) if self.confusion.shape[1] > self.confusion.shape[0] else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes null)."""
        return {
            "miou": _nan_to_none(self.miou),
            "pixel_accuracy": _nan_to_none(self.pixel_accuracy),
            "mean_accuracy": _nan_to_none(self.mean_accuracy),
            "per_class_iou": {n: _nan_to_none(v) for n, v in zip(self.class_names, self.iou)},
            "classes_scored": int(np.count_nonzero(~np.isnan(self.iou))),
            "n_images": int(self.n_images),
            "n_pixels": self.n_pixels,
            "unpredicted_pixels": self.unpredicted_pixels,
        }

    def table(self) -> str:
        """A plain-text table: per class IoU, accuracy and pixel counts, then the summary."""
        width = max([5, *(len(n) for n in self.class_names)])
        lines = [f"{'class':<{width}}  {'IoU':>6}  {'acc':>6}  {'gt px':>10}  {'pred px':>10}"]
        for name, iou, acc, n_gt, n_pred in zip(self.class_names, self.iou, self.accuracy,
                                                self.gt_pixels, self.pred_pixels):
            fmt = (lambda v: "     -" if math.isnan(v) else f"{100 * v:6.2f}")
            lines.append(f"{name:<{width}}  {fmt(iou)}  {fmt(acc)}  {int(n_gt):>10}  {int(n_pred):>10}")
        lines.append(f"mIoU {100 * self.miou:.2f}  pixel accuracy {100 * self.pixel_accuracy:.2f}  "
                     f"mean accuracy {100 * self.mean_accuracy:.2f}  "
                     f"({int(np.count_nonzero(~np.isnan(self.iou)))} of {len(self.class_names)} "
                     f"classes present; {self.n_images} image(s), {self.n_pixels} pixels)")
        return "\n".join(lines)


def scores_from_confusion(
    cm: np.ndarray, class_names: Optional[Sequence[str]] = None, *, n_images: int = 0
) -> SegmentationScores:
    """IoU per class, mIoU, pixel accuracy and mean class accuracy from ``cm``.

    ``cm`` is ``K x K`` or ``K x (K + 1)`` (as :func:`confusion_matrix` returns).
    """
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    if cm.ndim != 2 or cm.shape[1] not in (k, k + 1):
        raise InvalidInputError(f"A confusion matrix is K x K or K x (K+1), got {cm.shape}.")
    tp = np.diag(cm[:, :k]).astype(np.float64)
    gt = cm.sum(axis=1).astype(np.float64)
    pred = cm[:, :k].sum(axis=0).astype(np.float64)
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        accuracy = np.where(gt > 0, tp / gt, np.nan)
    total = gt.sum()
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(k)]
    if len(names) != k:
        raise InvalidInputError(f"{len(names)} class names for a {k}-class confusion matrix.")
    return SegmentationScores(
        class_names=names,
        iou=iou,
        accuracy=accuracy,
        miou=float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total > 0 else float("nan"),
        mean_accuracy=float(np.nanmean(accuracy)) if np.any(~np.isnan(accuracy)) else float("nan"),
        confusion=cm,
        n_images=n_images,
    )


def evaluate_arrays(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    *,
    ignore_index: Optional[int] = 255,
    class_names: Optional[Sequence[str]] = None,
) -> SegmentationScores:
    """Scores accumulated over ``(prediction, ground truth)`` pairs."""
    cm: Optional[np.ndarray] = None
    n = 0
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InvalidInputError(
                f"Item {n} of the pairs is {type(pair).__name__}; expected a (prediction, ground "
                "truth) pair of label arrays.")
        part = confusion_matrix(pair[0], pair[1], num_classes, ignore_index=ignore_index)
        cm = part if cm is None else cm + part
        n += 1
    if cm is None:
        cm = confusion_matrix(np.zeros(0, np.uint8), np.zeros(0, np.uint8), num_classes,
                              ignore_index=ignore_index)
    return scores_from_confusion(cm, class_names, n_images=n)


# ---- files ---------------------------------------------------------------------------------------
_MASK_SUFFIXES = (".png", ".tif", ".tiff")


@dataclass
class MaskSource:
    """Label masks found in a folder, by stem, with the class list when the folder names one."""

    folder: Path
    files: dict[str, Path]
    #: Per stem, the class table of a ``segment``/``predict`` result.
    classes: dict[str, "DatasetClasses"] = field(default_factory=dict)
    #: The class table of the whole folder (a dataset, or ``masks/`` beside ``classes.json``).
    shared_classes: Optional["DatasetClasses"] = None
    kind: str = "masks"
    #: Per stem, the dataset sample (its mask is read through the dataset's checked reader).
    samples: dict[str, Any] = field(default_factory=dict)
    #: Per slice name, the stack file and the slice's leading index (see the module doc).
    slices: dict[str, tuple[Path, tuple[int, ...]]] = field(default_factory=dict)

    def read(self, stem: str) -> np.ndarray:
        """The 2D mask of ``stem`` (checked: readable, 2D integers, the size its dataset says)."""
        if stem in self.samples:
            return self.samples[stem].read_mask()
        if stem in self.slices:
            return _read_slice(*self.slices[stem])
        return _read_mask(self.files[stem])

    def add_stack(self, stem: str, path: Path, lead: Sequence[int],
                  classes: Optional["DatasetClasses"] = None) -> None:
        """List each slice of the mask stack ``path`` (leading axes ``lead``) under its name."""
        from .export.layout import slice_name
        from .stacks import leading_axis_names, leading_indices

        lead = tuple(int(n) for n in lead)
        axes = leading_axis_names(len(lead))
        for index in leading_indices(lead + (1, 1)):
            name = slice_name(stem, index, axes, lead)
            if name in self.files:
                raise InvalidInputError(f"{self.folder} has two masks for {name!r}.")
            self.files[name] = path
            self.slices[name] = (path, index)
            if classes is not None:
                self.classes[name] = classes


def find_masks(folder: str | os.PathLike) -> MaskSource:
    """The masks of a dataset, a ``segment``/``predict`` output folder, or a folder of masks."""
    from .export.class_table import DatasetClasses, read_class_table
    from .export.layout import CLASSES_JSON
    from .export.reader import is_dataset, read_dataset
    from .result_files import LABELS_SUFFIX, find_results, read_result_table

    root = Path(folder)
    if not root.is_dir():
        raise InvalidInputError(f"Folder not found: {root}")
    if is_dataset(root):
        ds = read_dataset(root)
        return MaskSource(root, {s.name: s.mask_path for s in ds}, shared_classes=ds.classes,
                          kind="dataset", samples={s.name: s for s in ds})
    results = find_results(root)
    if results:
        files: dict[str, Path] = {}
        classes: dict[str, DatasetClasses] = {}
        source = MaskSource(root, files, classes=classes, kind="results")
        for path in results:
            table = read_result_table(path)
            stem = path.name[: -len("_classes.json")]
            label_name = (table.get("files") or {}).get("labels") or f"{stem}{LABELS_SUFFIX}.png"
            table_classes = DatasetClasses.from_json(table, source=str(path))
            stack = table.get("stack")
            if isinstance(stack, dict) and isinstance(stack.get("shape"), list) and stack["shape"]:
                source.add_stack(stem, path.parent / label_name, stack["shape"], table_classes)
                continue
            files[stem] = path.parent / label_name
            classes[stem] = table_classes
        return source
    shared = None
    if (root.parent / CLASSES_JSON).is_file() and root.name == "masks":
        shared = read_class_table(root.parent / CLASSES_JSON)
    source = MaskSource(root, {}, shared_classes=shared)
    files = source.files
    for path in sorted(root.iterdir()):
        if path.suffix.lower() not in _MASK_SUFFIXES or path.name.startswith("."):
            continue
        stem = path.stem
        if stem.endswith(LABELS_SUFFIX):
            stem = stem[: -len(LABELS_SUFFIX)]
        lead = _stack_lead(path)
        if lead:
            source.add_stack(stem, path, lead)
            continue
        if stem in files:
            raise InvalidInputError(f"{root} has two masks for {stem!r} ({files[stem].name}, {path.name}).")
        files[stem] = path
    if not files:
        raise InvalidInputError(f"No masks (*.png, *.tif) in {root}.")
    return source


def _stack_lead(path: Path) -> tuple[int, ...]:
    """The leading axes of a label TIFF holding a stack of masks (``Z x H x W`` or ``T x Z x H
    x W`` integers), else ``()`` (a 2D mask, or a file :func:`_read_mask` judges)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return ()
    from .stack_files import MAX_LOOP_AXES, TiffPlanes

    try:
        planes = TiffPlanes(path)
    except InvalidInputError:
        return ()
    if planes.axes.endswith("S") or not 2 < planes.ndim <= 2 + MAX_LOOP_AXES:
        return ()
    if not np.issubdtype(planes.dtype, np.integer):
        return ()
    return planes.shape[:-2]


def _read_slice(path: Path, index: tuple[int, ...]) -> np.ndarray:
    """One slice of a mask stack, read alone."""
    from .image_files import check_image_size
    from .stack_files import TiffPlanes

    planes = TiffPlanes(path)
    check_image_size(path, planes.shape[-2:], planes.dtype)
    mask = np.asarray(planes[index])
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise InvalidInputError(f"{path}: slice {index} is not a 2D label mask.")
    return mask


@dataclass
class FolderEvaluation:
    """The scores of a folder comparison, and how the files were paired."""

    scores: SegmentationScores
    matched: list[str]
    missing_predictions: list[str]
    unmatched_predictions: list[str]
    remapped_by_name: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = self.scores.to_dict()
        out.update(
            missing_predictions=self.missing_predictions,
            unmatched_predictions=len(self.unmatched_predictions),
            remapped_by_name=self.remapped_by_name,
        )
        return out


def _lut_onto(pred_classes: Any, gt_classes: Any, k: int) -> np.ndarray:
    """Predicted label -> ground-truth label by class name (unknown names -> ``k``: not a class)."""
    from .export.remap import match_class

    lut = np.full(len(pred_classes.classes) + 1, k, dtype=np.int64)
    lut[0] = 0
    for i, spec in enumerate(pred_classes.classes, start=1):
        j = match_class(spec, list(gt_classes.classes))
        if j is not None:
            lut[i] = j + 1
    return lut


def _read_mask(path: Path) -> np.ndarray:
    from .image_files import read_label_image

    mask = read_label_image(path)
    if mask.ndim != 2:
        raise InvalidInputError(f"{path} is not a 2D label mask (shape {mask.shape}).")
    return mask


def _default_ignore(mask: np.ndarray) -> int:
    return 255 if mask.dtype.itemsize == 1 else 65535


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    *,
    classes: Optional[str | os.PathLike] = None,
    ignore_index: Optional[int] = None,
) -> FolderEvaluation:
    """Score the predictions in ``pred_dir`` against the ground truth in ``gt_dir``, by stem.

    ``classes`` is a class table (a dataset's ``classes.json`` or a ``<stem>_classes.json``);
    without one, the ground truth's own (a dataset's) is used, and failing that label values are
    compared as they are, with as many classes as the largest value seen. ``ignore_index``
    defaults to 255 for uint8 ground truth and 65535 otherwise.
    """
    from .export.class_table import read_class_table

    if Path(pred_dir).is_dir() and Path(pred_dir).resolve() == Path(gt_dir).resolve():
        raise InvalidInputError(
            f"The predictions and the ground truth are the same folder ({Path(gt_dir).resolve()}): "
            "masks scored against themselves always give 100 %. Pass two different folders."
        )
    pred = find_masks(pred_dir)
    gt = find_masks(gt_dir)
    gt_classes = read_class_table(classes) if classes is not None else gt.shared_classes
    if gt_classes is None and pred.shared_classes is not None:
        gt_classes = pred.shared_classes
    if gt_classes is None and pred.classes:
        tables = list(pred.classes.values())
        if all(t.all_names == tables[0].all_names for t in tables):
            gt_classes = tables[0]
    matched = sorted(set(gt.files) & set(pred.files))
    missing = sorted(set(gt.files) - set(pred.files))
    unmatched = sorted(set(pred.files) - set(gt.files))
    if not matched:
        raise InvalidInputError(
            f"No prediction in {pred.folder} has the stem of a ground-truth mask in {gt.folder} "
            f"(e.g. {next(iter(gt.files), '?')!r}); masks are paired by file name."
        )

    same = [stem for stem in matched if pred.files[stem].resolve() == gt.files[stem].resolve()]
    if same:
        raise InvalidInputError(
            f"The prediction and the ground truth of {same[0]!r} are the same file "
            f"({gt.files[same[0]].resolve()}): a mask scored against itself always gives 100 %. "
            "Pass the predictions and the ground truth as two different folders."
        )
    k = len(gt_classes) if gt_classes is not None else 0
    cm = np.zeros((k, k + 1), dtype=np.int64)
    remapped = False
    for stem in matched:
        g = gt.read(stem)
        p = pred.read(stem)
        if g.shape != p.shape:
            raise InvalidInputError(
                f"{stem}: the prediction is {p.shape[1]}x{p.shape[0]} px but the ground truth is "
                f"{g.shape[1]}x{g.shape[0]}."
            )
        ignore = _default_ignore(g) if ignore_index is None else int(ignore_index)
        p = p.astype(np.int64)
        table = pred.classes.get(stem) or pred.shared_classes
        if gt_classes is not None and table is not None and table.all_names != gt_classes.all_names:
            lut = _lut_onto(table, gt_classes, k)
            p = np.where((p >= 0) & (p < lut.size), lut[np.clip(p, 0, lut.size - 1)], k)
            remapped = True
        if gt_classes is None:  # grow the matrix to the largest label seen
            valid = g[g != ignore]
            top = max(int(valid.max()) if valid.size else 0,
                      int(p[p != ignore].max()) if np.any(p != ignore) else 0) + 1
            if top > k:
                grown = np.zeros((top, top + 1), dtype=np.int64)
                grown[:k, :k] = cm[:, :k]
                grown[:k, top] = cm[:, k]
                cm, k = grown, top
        cm += confusion_matrix(p, g, k, ignore_index=ignore)
    names = gt_classes.all_names if gt_classes is not None else [f"class {i}" for i in range(k)]
    scores = scores_from_confusion(cm, names, n_images=len(matched))
    notes = []
    if remapped:
        notes.append("predicted labels were mapped onto the ground truth's classes by name")
    if missing:
        notes.append(f"{len(missing)} ground-truth mask(s) have no prediction and were skipped")
    if unmatched:
        notes.append(f"{len(unmatched)} prediction(s) have no ground truth and were skipped")
    return FolderEvaluation(scores, matched, missing, unmatched, remapped, notes)
