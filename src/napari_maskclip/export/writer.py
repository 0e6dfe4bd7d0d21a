"""Exporting labels (2D or stacks) into a dataset folder, safely.

:func:`export_sample_iter` is the one exporter: the widget's Export button, napari's Save
(``plugin.writer``), the CLI and Python all call it (or :func:`export_sample`, which runs it to the end).
It yields :class:`~napari_maskclip.progress.Progress` per slice and returns an
:class:`ExportReport`. It is a one-call :class:`ExportSession`; many samples (``import``, the CLI
``export`` of many inputs) go through one session, which takes the lock, reads ``dataset.json``,
settles leftovers and removes stale temp files once, and rewrites the index about once a second
instead of twice per sample (a per-sample export costs time that grows with the dataset).

Safety, in order:

1. **Everything is checked before anything is written**: shapes, label values (for in-memory
   arrays), the class list against the dataset's (see :mod:`.remap`), that no listed sample
   would be replaced without ``overwrite``, and that the folder and the paths the new samples use
   hold nothing the exporter did not make (see :mod:`.ownership`: it only ever creates, replaces or
   deletes files its own ``dataset.json`` lists, and its own temp and lock files).
2. **One export at a time**: the dataset's lock file (:mod:`.lock`) makes a concurrent export
   wait (up to ``lock_timeout`` seconds, then it is refused with one line).
3. **A journal first**: before any sample file is written, ``dataset.json`` lists the paths the
   export may create (``"pending"``) and drops the samples it replaces. A crash therefore leaves
   only files the index accounts for; the next export removes the unlisted pending ones. A
   session journals the samples announced with :meth:`ExportSession.expect` ahead, a bounded
   number at a time, so most samples need no commit of their own.
4. **A sample's files are committed together**: each is written to a temporary file beside its
   target; only when all are complete are they renamed into place. They are flushed to disk
   (fsync, many files at once) before any index that lists them is committed.
5. **``dataset.json`` is rewritten (atomically) after the files it lists**, about once a
   second (:data:`COMMIT_INTERVAL_S`) and at the end (close, cancel). A crash leaves either the
   old index or the new one, never a listed sample with missing or partial files. Replacing a
   sample first drops it from the index, so an interrupted overwrite loses the old version (which
   was being replaced; in a session, those of the samples journaled ahead) but never pairs an old
   mask with a new image. A session that stops (close, cancel, error) lists again the replaced
   samples it had not started.

Closing the generator stops after the current slice; the slices already exported stay (each is a
complete sample) and are listed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from .. import __version__
from ..atomic import atomic_write, atomic_write_text
from ..classes import ClassesLike
from ..errors import DatasetError, InvalidInputError
from ..progress import ProgressGenerator, Progress, run_to_completion
from . import files as _files
from .class_table import DEFAULT_BACKGROUND, DatasetClasses, read_class_table
from .layout import (
    CLASSES_JSON,
    DATASET_FORMAT,
    DATASET_JSON,
    FORMAT_VERSION,
    ignore_index,
    sample_file_slots,
    sample_paths,
)
from .lock import LOCK_TIMEOUT_S, DatasetLock
from .ownership import (
    check_dataset_folder,
    files_in_the_way,
    own_file,
    remove_own_files,
    remove_stale_temps,
)
from .pixels import prepare_mask
from .reader import read_index
from .remap import ClassMapping, plan_class_mapping
from .slices import EditedLike, SliceData, plan_stack

__all__ = [
    "ExportReport",
    "ExportSession",
    "export_sample_iter",
    "export_sample",
    "export_result",
    "check_export_target",
]

#: Shortest time between two rewrites of dataset.json while samples are exported (a stack, or an
#: :class:`ExportSession`); 0 commits after every sample.
COMMIT_INTERVAL_S = 1.0
#: How many announced samples (:meth:`ExportSession.expect`) a commit journals ahead, at least.
JOURNAL_AHEAD = 64
#: Threads that flush a session's new files to disk before a commit.
SYNC_THREADS = 8
#: Key of ``dataset.json`` that journals the files an export is creating (see :mod:`.ownership`).
PENDING_KEY = "pending"
_FILE_KEYS = ("image", "mask", "confidence", "edited")


@dataclass
class ExportReport:
    """What an export did."""

    dataset: Path
    #: Names of the samples written, in order.
    samples: list[str] = field(default_factory=list)
    #: Every file written (sample files, classes.json, dataset.json).
    files: list[Path] = field(default_factory=list)
    #: Samples that replaced existing ones (``overwrite``).
    overwritten: list[str] = field(default_factory=list)
    classes: Optional[DatasetClasses] = None
    #: Classes appended to the dataset's list (``remap`` + ``add_classes``).
    classes_added: list[str] = field(default_factory=list)
    #: The sample's label -> the dataset's label, when remapped (None: unchanged).
    class_mapping: Optional[dict[int, int]] = None
    ignored_low_confidence: int = 0
    #: True when the export was stopped before its last slice.
    cancelled: bool = False

    def summary(self) -> str:
        parts = [f"{len(self.samples)} sample(s) -> {self.dataset}"]
        if self.overwritten:
            parts.append(f"{len(self.overwritten)} replaced")
        if self.classes_added:
            parts.append(f"classes added: {', '.join(self.classes_added)}")
        if self.class_mapping:
            parts.append("labels remapped by class name")
        if self.ignored_low_confidence:
            parts.append(f"{self.ignored_low_confidence} low-confidence pixels set to ignore")
        if self.cancelled:
            parts.append("stopped early")
        return "; ".join(parts)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    return str(value)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_jsonable, ensure_ascii=False) + "\n"


def _provenance(provenance: Optional[dict[str, Any]]) -> dict[str, Any]:
    record = dict(provenance or {})
    settings = record.get("settings")
    if isinstance(settings, dict):
        for key in ("model", "pretrained"):
            if key not in record and key in settings:
                record[key] = settings[key]
    record.setdefault("model", None)
    record.setdefault("pretrained", None)
    record["napari_maskclip_version"] = __version__
    record["exported_at"] = _now()
    return record


class _Index:
    """``dataset.json`` in memory; :meth:`commit` writes it atomically.

    Samples are kept by name with the set of files they list and each one's encoded line, so
    adding a sample, asking whether a file is listed and rewriting the index cost no rescan of
    every sample (a batch adds thousands)."""

    def __init__(self, root: Path, info: Optional[dict[str, Any]]):
        self.root = root
        now = _now()
        self.info = info or {
            "format": DATASET_FORMAT,
            "format_version": FORMAT_VERSION,
            "created_with": f"napari-maskclip {__version__}",
            "created": now,
            "samples": [],
        }
        self.info["format_version"] = FORMAT_VERSION
        stored = self.info.pop(PENDING_KEY, None)
        #: Files an export journaled (may be creating); the exporter's even while unlisted.
        self.pending: set[str] = set()
        if isinstance(stored, list):
            self.pending = {p for p in stored if isinstance(p, str)}
        samples = self.info.pop("samples", None) or []
        self._entries: dict[str, dict[str, Any]] = {}
        self._rows: dict[str, str] = {}
        self._listed: Counter[str] = Counter()
        self._folded: dict[str, str] = {}
        for entry in samples:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise DatasetError(
                    f"{root / DATASET_JSON}: a sample entry is malformed (no name); restore the "
                    "file, or export into another folder."
                )
            if entry["name"] in self._entries:
                raise DatasetError(f"{root / DATASET_JSON} lists sample {entry['name']!r} twice.")
            self.add(entry)

    @property
    def entries(self) -> list[dict[str, Any]]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> Optional[dict[str, Any]]:
        return self._entries.get(name)

    def names(self) -> list[str]:
        return list(self._entries)

    def same_but_case(self, name: str) -> Optional[str]:
        """A listed name that differs from ``name`` in letter case only (their files collide on
        macOS and Windows)."""
        other = self._folded.get(name.casefold())
        return other if other is not None and other != name else None

    @staticmethod
    def _files(entry: dict[str, Any]) -> list[str]:
        return [entry[k] for k in _FILE_KEYS if isinstance(entry.get(k), str)]

    def files_of(self, names: Iterable[str]) -> set[str]:
        """Relative paths the entries of ``names`` list."""
        return {rel for n in names if n in self._entries for rel in self._files(self._entries[n])}

    def listed_files(self) -> set[str]:
        return set(self._listed)

    def is_listed(self, rel: str) -> bool:
        return self._listed.get(rel, 0) > 0

    def drop(self, names: Iterable[str]) -> None:
        for name in names:
            entry = self._entries.pop(name, None)
            if entry is None:
                continue
            self._rows.pop(name, None)
            self._folded.pop(name.casefold(), None)
            for rel in self._files(entry):
                self._listed[rel] -= 1
                if self._listed[rel] <= 0:
                    del self._listed[rel]

    def add(self, entry: dict[str, Any]) -> None:
        name = str(entry["name"])
        self.drop([name])
        self._entries[name] = entry
        self._folded[name.casefold()] = name
        self._listed.update(self._files(entry))

    def settle(self, deletable: Optional[set[str]] = None) -> None:
        """Delete the pending files no sample lists (a stopped or killed export's, or a replaced
        sample's old ones); keep journaling those that cannot be deleted. With ``deletable``, the
        other unlisted pending paths (journaled ahead, never written) leave the journal untouched."""
        stale = sorted(p for p in self.pending if not self.is_listed(p))
        if deletable is not None:
            stale = [p for p in stale if p in deletable]
        self.pending = set(remove_own_files(self.root, stale))

    def text(self) -> str:
        self.info["modified"] = _now()
        self.info["modified_with"] = f"napari-maskclip {__version__}"
        head = dict(self.info)
        pending = sorted(p for p in self.pending if not self.is_listed(p))
        if pending:
            head[PENDING_KEY] = pending
        rows = []
        for name, entry in self._entries.items():
            row = self._rows.get(name)
            if row is None:
                row = self._rows[name] = json.dumps(entry, default=_jsonable, ensure_ascii=False)
            rows.append(row)
        return _index_text_rows(head, rows)

    def commit(self) -> Path:
        return _commit_index(self.root / DATASET_JSON, self.text())


def _index_text(info: dict[str, Any]) -> str:
    """dataset.json: the header indented, then one line per sample. json's ``indent`` falls back to
    its pure-Python encoder; each export rewrites the index (twice), so at 1200 samples that cost
    0.19 s per rewrite, 0.06 s with one C-encoded line per sample (measured on 2 busy cores)."""
    rows = [json.dumps(e, default=_jsonable, ensure_ascii=False) for e in info["samples"]]
    return _index_text_rows({k: v for k, v in info.items() if k != "samples"}, rows)


def _index_text_rows(head_info: dict[str, Any], rows: list[str]) -> str:
    head = _dumps(head_info).rstrip()[:-1].rstrip()
    body = ",\n    ".join(rows)
    samples = f'[\n    {body}\n  ]' if rows else "[]"
    return f'{head}{"," if head != "{" else ""}\n  "samples": {samples}\n}}\n'


def _in_the_way(root: Path, blocked: list[str]) -> DatasetError:
    more = f" (and {len(blocked) - 1} more)" if len(blocked) > 1 else ""
    return DatasetError(
        f"{root / blocked[0]} is in the way of a new sample{more}: dataset.json does not list it, "
        "so napari-maskclip did not write it and never replaces it (overwrite replaces listed "
        "samples only). Move it out of the dataset, or choose another sample name."
    )


def check_export_target(dataset_dir: Union[str, os.PathLike], names: Iterable[str]) -> None:
    """Refuse now what exporting samples ``names`` into ``dataset_dir`` would refuse for the folder
    (not a dataset and not empty, links) and its files (in the way), before anything is written.

    For batch exports (the CLI) that check every input before the first one is exported; the
    export itself checks again under the dataset's lock. (Names the dataset lists already are
    refused without overwrite by the export, not here.)
    """
    root = Path(dataset_dir)
    if not check_dataset_folder(root):
        return
    index = _Index(root, read_index(root))
    listed = set(index.names())
    names = list(names)
    replacing = [n for n in names if n in listed]
    owned = {rel for rel in index.files_of(replacing) | index.pending if own_file(root, rel)}
    blocked = files_in_the_way(root, names, owned)
    if blocked:
        raise _in_the_way(root, blocked)


def _commit_index(path: Path, text: str) -> Path:
    """The commit point of every export (a separate function, so tests can interrupt it)."""
    return atomic_write_text(path, text)


def _write_sample_files(
    root: Path, jobs: Sequence[tuple[str, Any]], *, sync: bool = True
) -> list[Path]:
    """Write every file of one sample to temp files, then rename them all into place.

    ``sync=False`` leaves the fsync to the caller, who must :func:`_sync_files` them before an
    index that lists them is committed (a session syncs many files at once, before each commit)."""
    written = []
    with contextlib.ExitStack() as stack:
        for rel, write in jobs:
            target = root / rel
            tmp = stack.enter_context(atomic_write(target, fsync=sync))
            write(tmp)
            written.append(target)
    return written


def _sync_one(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    except FileNotFoundError:  # replaced meanwhile: its successor is synced too
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_files(paths: Sequence[Path]) -> None:
    """Flush renamed sample files to disk, several at once: the disk groups the flushes, so 100
    files cost a few flushes instead of 100 (one fsync took 6 ms on the build machine)."""
    if len(paths) <= 1:
        for path in paths:
            _sync_one(path)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(SYNC_THREADS, len(paths))) as pool:
        list(pool.map(_sync_one, paths))


@dataclass
class _Prepared:
    """One export call checked on its own (before the dataset is looked at)."""

    plan: Any
    classes: DatasetClasses
    in_ignore: int
    min_confidence: Optional[float]
    save_confidence: bool
    overwrite: bool
    remap: bool
    add_classes: bool
    provenance: Optional[dict[str, Any]]
    source: Optional[dict[str, Any]]

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.plan.slices]


def _prepare(
    name: str,
    image: Any,
    labels: Any,
    classes: ClassesLike,
    *,
    background: Optional[ClassesLike] = DEFAULT_BACKGROUND,
    probabilities: Any = None,
    edited: EditedLike = None,
    min_confidence: Optional[float] = None,
    save_confidence: bool = True,
    overwrite: bool = False,
    remap: bool = False,
    add_classes: bool = False,
    provenance: Optional[dict[str, Any]] = None,
    source: Optional[dict[str, Any]] = None,
    input_ignore: Optional[int] = None,
    channel_axis: Optional[int] = None,
    slices: Optional[Iterable[Union[int, Sequence[int]]]] = None,
    axis_names: Optional[Sequence[str]] = None,
) -> _Prepared:
    """Check the arguments of one export (shapes, label values, confidence) and plan its slices."""
    if min_confidence is not None and not 0.0 <= float(min_confidence) <= 1.0:
        raise InvalidInputError(f"min_confidence must lie in 0..1, got {min_confidence}.")
    if min_confidence is not None and probabilities is None:
        raise InvalidInputError(
            "A minimum confidence needs the probability maps (confidence) of the labels; pass "
            "them, or export without the threshold."
        )
    new_classes = DatasetClasses.from_user(classes, background)
    m = len(new_classes.classes)
    plan = plan_stack(name, image, labels, probabilities=probabilities, edited=edited,
                      channel_axis=channel_axis, slices=slices, axis_names=axis_names)
    if plan.n_probability_channels is not None and plan.n_probability_channels != m:
        raise InvalidInputError(
            f"{plan.n_probability_channels} probability maps for {m} classes; give one map per "
            "class, in class order (background is not a map)."
        )
    in_ignore = ignore_index(m) if input_ignore is None else int(input_ignore)
    if isinstance(plan.labels, np.ndarray) and plan.labels.size:
        valid = plan.labels[plan.labels != in_ignore]
        if valid.size and (valid.min() < 0 or valid.max() > m):
            bad = int(valid.max()) if valid.max() > m else int(valid.min())
            raise InvalidInputError(
                f"Label value {bad} is not a class (0 = background, 1..{m} = "
                f"{', '.join(new_classes.names[:5])}{', ...' if m > 5 else ''}; {in_ignore} = "
                "ignore). Paint it with a listed class, or add the class to the list."
            )
    return _Prepared(plan, new_classes, in_ignore, min_confidence, save_confidence, overwrite,
                     remap, add_classes, provenance, source)


def export_sample_iter(
    dataset_dir: Union[str, os.PathLike],
    name: str,
    image: Any,
    labels: Any,
    classes: ClassesLike,
    *,
    background: Optional[ClassesLike] = DEFAULT_BACKGROUND,
    probabilities: Any = None,
    edited: EditedLike = None,
    min_confidence: Optional[float] = None,
    save_confidence: bool = True,
    overwrite: bool = False,
    remap: bool = False,
    add_classes: bool = False,
    provenance: Optional[dict[str, Any]] = None,
    source: Optional[dict[str, Any]] = None,
    input_ignore: Optional[int] = None,
    channel_axis: Optional[int] = None,
    slices: Optional[Iterable[Union[int, Sequence[int]]]] = None,
    axis_names: Optional[Sequence[str]] = None,
    lock_timeout: Optional[float] = None,
) -> ProgressGenerator[ExportReport]:
    """Export ``labels`` (and ``image``) as sample(s) ``name`` of the dataset ``dataset_dir``.

    * ``image``: ``H x W [x C]`` or a stack matching the labels (``channel_axis`` says where the
      channels are if not last); None writes a mask-only sample (``"image": null``).
    * ``labels``: ``H x W`` ints (0 background, k = ``classes[k-1]``, ``input_ignore`` = ignore,
      default 255, or 65535 beyond 254 classes), or a stack: one sample per slice, named
      ``<name>_z0003`` / ``<name>_t0001_z0003`` (``slices`` picks some, ``axis_names`` renames).
    * ``classes`` / ``background``: as typed (``"cat, dog; puppy"``) or ClassSpec lists.
    * ``probabilities``: ``C x ...labels.shape`` floats (one map per class) or a list of ``C``
      maps; saved as ``confidence/<name>.tif`` (float16) unless ``save_confidence`` is False.
    * ``edited``: bool mask shaped like the labels (True = a person painted it), True/False for
      all pixels, or None (unknown: recorded as ``"edited": null``).
    * ``min_confidence``: unedited pixels whose label has a probability below it become ignore.
    * ``overwrite``: replace listed samples of the same name (otherwise refused).
    * ``remap`` / ``add_classes``: fit a different class list to the dataset's (see :mod:`.remap`).
    * ``provenance``: ``{"model", "pretrained", "settings", ...}`` (``SegmentationResult.settings``
      carries model and pretrained); ``source``: free-form origin (file path, layer name).
    * ``lock_timeout``: seconds to wait for another export writing to the same dataset (default
      :data:`~napari_maskclip.export.lock.LOCK_TIMEOUT_S`), then refuse.

    One export is a one-call :class:`ExportSession`; many samples go faster through one session.
    """
    prepared = _prepare(
        name, image, labels, classes, background=background, probabilities=probabilities,
        edited=edited, min_confidence=min_confidence, save_confidence=save_confidence,
        overwrite=overwrite, remap=remap, add_classes=add_classes, provenance=provenance,
        source=source, input_ignore=input_ignore, channel_axis=channel_axis, slices=slices,
        axis_names=axis_names,
    )
    session = ExportSession(dataset_dir, lock_timeout=lock_timeout)
    yield from session.open_iter(total=len(prepared.plan.slices))
    try:
        report = yield from session._export_iter(prepared)
    finally:
        committed = session.close()
    if committed is not None:
        report.files.append(committed)
    report.files = list(dict.fromkeys(report.files))  # dataset.json is committed more than once
    return report


class ExportSession:
    """Many exports into one dataset under one hold of its lock: the batch writer.

    :meth:`open_iter` takes the lock, reads ``dataset.json`` once, settles a killed export's
    leftovers and removes stale temp files once; :meth:`export_iter` then exports sample after
    sample with every check and guarantee of :func:`export_sample_iter`; :meth:`close` settles
    and commits. ``dataset.json`` is rewritten at most about once a second
    (:data:`COMMIT_INTERVAL_S`, longer when one rewrite takes a noticeable share of it) and on
    close, instead of twice per sample.

    The journal runs ahead: at each commit, ``"pending"`` also lists the files of the next samples
    announced with :meth:`expect`, so most samples need no commit of their own before their files
    are written (a sample that is not journaled yet forces one). With ``overwrite`` those samples,
    if listed, leave the index in that commit (never pairing an old file with a new one); a killed
    session therefore loses the old versions of the samples journaled but not listed again by a
    commit (the journal ahead plus about a second of work), and :meth:`close` lists again those it
    never reached.

    Use as ``with ExportSession(root) as session: session.export(...)``, or from a generator:
    ``yield from session.open_iter()`` then ``try: ... finally: session.close()``.
    """

    def __init__(self, dataset_dir: Union[str, os.PathLike], *, lock_timeout: Optional[float] = None):
        self.root = Path(dataset_dir)
        self.lock_timeout = LOCK_TIMEOUT_S if lock_timeout is None else float(lock_timeout)
        #: Names of the samples exported, in order.
        self.samples: list[str] = []
        self._exported: set[str] = set()
        #: How many times ``dataset.json`` was written.
        self.commits = 0
        self._lock: Optional[DatasetLock] = None
        self._index: Optional[_Index] = None
        self._closed = False
        self._dirty = False
        self._ahead: deque[tuple[str, bool]] = deque()  # announced, not journaled yet
        self._journaled: set[str] = set()  # in the committed journal (and dropped if replaced)
        self._in_journal: set[str] = set()  # in the in-memory journal
        self._journal_folded: dict[str, str] = {}
        self._replaced: dict[str, tuple[dict[str, Any], set[str]]] = {}
        self._deletable: set[str] = set()  # pending paths this session may have written
        self._classes: Optional[DatasetClasses] = None
        self._classes_text: Optional[str] = None
        self._last_commit = time.monotonic()
        self._commit_s = 0.0
        self._since_commit = 0
        self._unsynced: list[Path] = []  # renamed into place, not flushed to disk yet

    # ---- opening and closing ---------------------------------------------------------------------
    def open_iter(self, total: int = 0) -> ProgressGenerator[None]:
        """Take the dataset's lock (yielding a message while another export holds it), read the
        index and clean a killed export's leftovers."""
        if self._lock is not None or self._closed:
            raise RuntimeError("An ExportSession is opened once.")
        root = self.root
        check_dataset_folder(root)  # refuse a foreign folder before creating anything in it
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatasetError(
                f"Cannot create the dataset folder {root} ({exc.strerror or exc}); choose a folder "
                "you can write to."
            ) from exc
        lock = DatasetLock(root)
        try:
            for message in lock.acquire_iter(self.lock_timeout):
                yield Progress("export", 0, total, message)
            is_dataset = check_dataset_folder(root)  # again: another export may have made it
            index = _Index(root, read_index(root) if is_dataset else None)
            # A killed export's leftovers: its journaled files that no sample lists, its temp files.
            before = set(index.pending)
            index.settle()
            self._dirty = index.pending != before
            remove_stale_temps(root)
            self._deletable = set(index.pending)  # could not be deleted now: retried on close
            if len(index):
                self._classes = read_class_table(root / CLASSES_JSON)
        except BaseException:
            lock.release()
            raise
        self._lock, self._index = lock, index
        self._last_commit = time.monotonic()

    @property
    def opened(self) -> bool:
        """True once :meth:`open_iter` has taken the lock (also after :meth:`close`)."""
        return self._index is not None

    def __enter__(self) -> "ExportSession":
        run_to_completion(self.open_iter())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> Optional[Path]:
        """List what is complete, remove the files of what is not, commit, release the lock.
        Returns ``dataset.json`` when it was written. Safe to call more than once."""
        if self._closed:
            return None
        self._closed = True
        index, lock = self._index, self._lock
        if index is None or lock is None:
            return None
        try:
            for name, (entry, _owned) in self._replaced.items():  # never reached: keep the old one
                if name not in index:
                    index.add(entry)
                    self._dirty = True
            self._replaced.clear()
            before = set(index.pending)
            index.settle(self._deletable)
            self._dirty = self._dirty or index.pending != before
            if self._dirty:
                return self._commit(journal=False)
            return None
        finally:
            lock.release()

    # ---- the journal -----------------------------------------------------------------------------
    def expect(self, names: Iterable[str], *, overwrite: bool = False) -> None:
        """Announce samples exported next (in that order), so the journal can list their files
        ahead; ``overwrite`` as they will be exported with (it lets a commit drop listed ones)."""
        self._ahead.extend((str(n), bool(overwrite)) for n in names)

    def _journal(self, name: str, overwrite: bool) -> bool:
        """Add sample ``name``'s paths to the in-memory journal (and drop the listed sample it
        replaces); False when it would be refused (the export then says why)."""
        if name in self._in_journal:
            return True
        index = self._index
        assert index is not None
        if self._same_but_case(name):
            return False
        owned: set[str] = set()
        if name in index:
            if not overwrite:
                return False
            owned = {rel for rel in index.files_of([name]) if own_file(self.root, rel) is not None}
        if files_in_the_way(self.root, [name], owned):
            return False
        if name in index:
            self._replaced[name] = (index.get(name), owned)  # type: ignore[assignment]
            index.drop([name])
        index.pending |= owned | set(sample_file_slots(name))
        self._deletable |= owned
        self._in_journal.add(name)
        self._journal_folded[name.casefold()] = name
        self._dirty = True
        return True

    def _commit(self, journal: bool = True) -> Path:
        """Write ``dataset.json``; first extend the journal by the next announced samples."""
        index = self._index
        assert index is not None
        if journal:
            # Journaled but not written yet: at most this many (with overwrite, the old versions
            # a kill would lose); enough that a sample rarely waits for a commit of its own.
            ahead = max(JOURNAL_AHEAD, 2 * self._since_commit)
            while self._ahead and len(self._in_journal) < ahead:
                name, overwrite = self._ahead.popleft()
                if name not in self._in_journal and name not in self._exported:
                    self._journal(name, overwrite)
        start = time.monotonic()
        # The files this commit may list are on disk before it (power loss: never a listed sample
        # with a partial file; until then they are unlisted, and journaled).
        _sync_files(self._unsynced)
        self._unsynced = []
        path = index.commit()
        self._commit_s = time.monotonic() - start
        self._journaled = set(self._in_journal)
        self._last_commit = time.monotonic()
        self._since_commit = 0
        self._dirty = False
        self.commits += 1
        return path

    def _commit_due(self) -> bool:
        interval = COMMIT_INTERVAL_S
        if interval > 0:  # a rewrite of a huge index takes a while: keep it under ~1/4 of the time
            interval = max(interval, 4.0 * self._commit_s)
        return time.monotonic() - self._last_commit >= interval

    def _same_but_case(self, name: str) -> Optional[str]:
        """A listed or journaled sample whose name differs from ``name`` in letter case only."""
        assert self._index is not None
        journaled = self._journal_folded.get(name.casefold())
        return self._index.same_but_case(name) or (journaled if journaled not in (None, name) else None)

    # ---- exporting -------------------------------------------------------------------------------
    def export_iter(
        self, name: str, image: Any, labels: Any, classes: ClassesLike, **options: Any
    ) -> ProgressGenerator[ExportReport]:
        """Export like :func:`export_sample_iter` (same arguments but ``lock_timeout``), in this
        session; its report lists ``dataset.json`` only if it was committed meanwhile."""
        return self._export_iter(_prepare(name, image, labels, classes, **options))

    def export(self, name: str, image: Any, labels: Any, classes: ClassesLike, *,
               progress: Optional[Any] = None, **options: Any) -> ExportReport:
        """:meth:`export_iter` run to the end."""
        return run_to_completion(self.export_iter(name, image, labels, classes, **options), progress)

    def _export_iter(self, prepared: _Prepared) -> ProgressGenerator[ExportReport]:
        index = self._index
        if index is None or self._closed:
            raise RuntimeError("Open the ExportSession (open_iter or with) before exporting.")
        root, plan = self.root, prepared.plan
        mapping: ClassMapping = plan_class_mapping(
            self._classes if len(index) or self._replaced else None, prepared.classes,
            remap=prepared.remap, add_classes=prepared.add_classes,
        )
        mapping.target = mapping.target.with_colors()  # classes.json and every mask palette agree
        names = prepared.names
        clashes = [(n, self._same_but_case(n)) for n in names if self._same_but_case(n)]
        if clashes:
            new, old = clashes[0]
            raise DatasetError(
                f"Sample {new!r} differs only in letter case from the existing sample {old!r}; "
                "their files would collide on macOS and Windows. Choose another name."
            )
        replacing = [n for n in names if n in index or n in self._replaced]
        if replacing and not prepared.overwrite:
            shown = ", ".join(replacing[:3]) + (f" and {len(replacing) - 3} more" if len(replacing) > 3 else "")
            raise DatasetError(
                f"The dataset already has sample(s) {shown}. Choose another name, or allow "
                "overwriting (Python: overwrite=True; CLI: --overwrite)."
            )
        # Files the exporter may replace: those the replaced samples list (and that are plain
        # files inside the dataset). Anything else at a path a new sample may use is someone else's.
        owned = {rel for rel in index.files_of(replacing) if own_file(root, rel) is not None}
        for n in replacing:
            if n in self._replaced:
                owned |= self._replaced[n][1]
        blocked = files_in_the_way(root, names, owned)
        if blocked:
            raise _in_the_way(root, blocked)

        report = ExportReport(dataset=root, overwritten=replacing, classes=mapping.target,
                              classes_added=list(mapping.added),
                              class_mapping=None if mapping.identity else mapping.as_dict())
        total = len(plan.slices)
        yield Progress("export", 0, total, f"exporting {total} sample(s) to {root}")
        # The journal: the slices not journaled yet go first (a stack's all at once).
        missing = [n for n in names if n not in self._journaled]
        if missing:
            for n in missing:
                if not self._journal(n, prepared.overwrite):  # checked above: cannot happen
                    raise DatasetError(f"Sample {n!r} cannot be journaled in {root}.")
            report.files.append(self._commit())
        classes_text = _dumps(mapping.target.to_json())
        if self._classes_text is None:
            classes_path = root / CLASSES_JSON
            if classes_path.is_file():
                self._classes_text = classes_path.read_text(encoding="utf-8")
        if classes_text != self._classes_text:
            report.files.append(atomic_write_text(root / CLASSES_JSON, classes_text))
            self._classes_text = classes_text
        self._classes = mapping.target

        prov = _provenance(prepared.provenance)
        m = len(prepared.classes.classes)
        completed = False
        try:
            for i in range(total):
                piece = plan.get(i)
                slots = set(sample_file_slots(piece.name))
                self._deletable |= slots
                # Started: the replaced version is gone for good (close restores unstarted ones).
                old = self._replaced.pop(piece.name, (None, set()))[1]
                entry, written = _export_one(root, piece, mapping, m, prepared.in_ignore,
                                             prepared.min_confidence, prepared.save_confidence,
                                             prov, prepared.source, report)
                self._unsynced.extend(written)
                report.files.extend(written)
                index.add(entry)
                self._dirty = True
                self._in_journal.discard(piece.name)
                self._journaled.discard(piece.name)
                # The replaced version's files that the new one does not reuse go now; unused
                # paths of this sample leave the journal (nothing is there).
                stale = {rel for rel in slots | old if not index.is_listed(rel)}
                index.pending -= stale
                index.pending |= set(remove_own_files(root, sorted(stale & old)))
                report.samples.append(piece.name)
                self.samples.append(piece.name)
                self._exported.add(piece.name)
                self._since_commit += 1
                if self._commit_due():
                    report.files.append(self._commit())
                yield Progress("export", i + 1, total, piece.name)
            completed = True
        finally:
            report.cancelled = not completed
        report.files = list(dict.fromkeys(report.files))
        return report


def _export_one(
    root: Path,
    piece: SliceData,
    mapping: ClassMapping,
    m: int,
    in_ignore: int,
    min_confidence: Optional[float],
    save_confidence: bool,
    provenance: dict[str, Any],
    source: Optional[dict[str, Any]],
    report: ExportReport,
) -> tuple[dict[str, Any], list[Path]]:
    """Write one 2D sample's files (all or none) and return its index entry."""
    probabilities = None if piece.probabilities is None else np.asarray(piece.probabilities, dtype=np.float32)
    mask, stats = prepare_mask(
        piece.labels, n_classes=m, input_ignore=in_ignore, mapping=mapping,
        probabilities=probabilities, edited=piece.edited, min_confidence=min_confidence,
        name=piece.name,
    )
    report.ignored_low_confidence += stats.ignored_low_confidence
    image = piece.image
    if image is not None and image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    n_target = len(mapping.target.classes)
    keep_confidence = save_confidence and probabilities is not None
    paths = sample_paths(piece.name, image=image, n_classes=n_target,
                         confidence=keep_confidence, edited=piece.edited is not None)
    colors = mapping.target.colors
    jobs: list[tuple[str, Any]] = []
    if paths.image:
        jobs.append((paths.image, lambda p: _files.write_image_file(p, image)))
    jobs.append((paths.mask, lambda p: _files.write_mask_file(p, mask, colors)))
    if paths.confidence:
        conf = mapping.apply_confidence(probabilities)
        jobs.append((paths.confidence, lambda p: _files.write_confidence_file(p, conf)))
    if paths.edited:
        jobs.append((paths.edited, lambda p: _files.write_edited_file(p, piece.edited)))
    written = _write_sample_files(root, jobs, sync=False)  # synced before the commit listing them

    origin = dict(source or {})
    if piece.index:
        origin["index"] = list(piece.index)
    entry = {
        "name": piece.name,
        "image": paths.image,
        "mask": paths.mask,
        "confidence": paths.confidence,
        "edited": paths.edited,
        "shape": [int(mask.shape[0]), int(mask.shape[1])],
        "num_classes": n_target,
        "image_dtype": None if image is None else str(image.dtype),
        "image_shape": None if image is None else [int(s) for s in image.shape],
        "min_confidence": None if min_confidence is None else float(min_confidence),
        "pixels": stats.to_json(),
        "class_mapping": None if mapping.identity else {str(k): v for k, v in mapping.as_dict().items()},
        "source": origin,
        "provenance": provenance,
    }
    return entry, written


def export_sample(
    dataset_dir: Union[str, os.PathLike],
    name: str,
    image: Any,
    labels: Any,
    classes: ClassesLike,
    *,
    progress: Optional[Any] = None,
    **options: Any,
) -> ExportReport:
    """:func:`export_sample_iter` run to the end (``progress``: called with each Progress)."""
    return run_to_completion(
        export_sample_iter(dataset_dir, name, image, labels, classes, **options), progress
    )


def export_result(
    dataset_dir: Union[str, os.PathLike],
    name: str,
    image: Any,
    result: Any,
    *,
    labels: Any = None,
    **options: Any,
) -> ExportReport:
    """Export an engine :class:`~napari_maskclip.engine.SegmentationResult` (classes,
    background, probabilities and provenance taken from it). ``labels`` replaces
    ``result.labels`` (e.g. after editing); pass ``edited`` to say which pixels changed.
    """
    background = [spec.text for spec in getattr(result, "background", [])] or DEFAULT_BACKGROUND
    settings = dict(getattr(result, "settings", {}) or {})
    provenance = {
        "model": settings.get("model"),
        "pretrained": settings.get("pretrained"),
        "settings": settings,
        "removed_by_denoising": list(getattr(result, "removed_classes", [])),
        **(options.pop("provenance", None) or {}),
    }
    options.setdefault("probabilities", result.probabilities)
    options.setdefault("background", background)
    return export_sample(
        dataset_dir, name, image, result.labels if labels is None else labels,
        list(result.classes), provenance=provenance, **options,
    )
