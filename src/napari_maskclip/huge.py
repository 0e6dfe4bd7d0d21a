"""Huge images: ``segment BIG --out OUT.zarr``, tile by tile, on dask workers or here.

Scale: huge images are segmented at their native resolution (``short_side`` must be off; pick a
coarser OME-Zarr/TIFF pyramid level for a coarser scale) with sliding windows always, of the
settings' ``window`` (default ``auto_window`` or twice the model's input size) every ``stride``
(default half the window), laid out exactly as the single-process engine lays them out over the
whole image (:func:`~napari_maskclip.engine.windows.window_boxes`). The result equals
``Segmenter(..., window=W, stride=S)`` on the whole image in memory: labels exactly, confidence
within float16 rounding.

Output chunks are the tiles (``chunk`` px, by default a multiple of the stride near 1024). Two
passes of dask tasks, one task per tile:

1. *encode*: the windows that start in the tile are encoded from the source region they cover
   (the tile plus one window: a halo of ``window - stride`` px), their prompt cosines stored in
   the temporary store (one zarr chunk per window), and the tile's per-class maximum returned.
   Prompt denoising needs every window's maximum, so the classes kept are decided on the client
   from all tiles' maxima, as the engine decides them over the whole image.
2. *segment*: the cosines of every window overlapping the tile (its own and its neighbours': the
   halo) are read, turned into scores, summed in the engine's window order and divided by the
   engine's coverage, so every pixel gets the same arithmetic as in the whole-image run; labels
   (uint8, or uint16 past 255 classes) and confidence (float16, classes x H x W) are written to
   the tile's chunks.

Memory: a task holds its tile plus the halo, never the image; the client holds one number per
tile and class. Atomic at the store level: everything is written into a temporary store beside
``OUT.zarr`` (``.tmp-OUT.zarr-<pid>-<random>.zarr``) that becomes ``OUT.zarr`` by one rename.
Each finished tile leaves a marker; a run that was killed is resumed by the next run of the same
request (its temporary store claimed, finished tiles kept). A finished ``OUT.zarr`` of the same
request is reported done; one of another request is replaced only with ``overwrite``; anything
napari-maskclip did not make is refused. PAMR, TLP and region voting (which need whole-image
scores) are refused, and so is RF-CLIP's whole-image global embedding (each window's own works).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Optional, Sequence

import numpy as np

from .atomic import TEMP_PREFIX, _process_alive, atomic_write_text
from .errors import InvalidInputError, OutputError
from .lazy_source import SourceSpec, plan_source
from .progress import Progress
from .segment_batch import SegmentRun

__all__ = ["Grid", "LargeResult", "segment_large", "FORMAT", "read_large_meta", "DEFAULT_CHUNK"]

FORMAT = "napari-maskclip-segment-large"
FORMAT_VERSION = 1
_KEY = "napari_maskclip"
_WORK = "_work"
#: Temporary stores that a running :func:`segment_large` of this process writes.
_IN_USE: set[str] = set()
#: Tiles (chunks) are about this many pixels a side, rounded to a multiple of the stride.
DEFAULT_CHUNK = 1024


# ---- geometry --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """The engine's sliding windows over the image, and the tiles (= output chunks)."""

    height: int
    width: int
    window: int
    stride: int
    chunk: tuple[int, int]

    @property
    def ys(self) -> list[int]:
        from .engine.windows import axis_starts

        return axis_starts(self.height, self.window, self.stride)

    @property
    def xs(self) -> list[int]:
        from .engine.windows import axis_starts

        return axis_starts(self.width, self.window, self.stride)

    @property
    def tiles_shape(self) -> tuple[int, int]:
        return -(-self.height // self.chunk[0]), -(-self.width // self.chunk[1])

    def tiles(self) -> list[tuple[int, int]]:
        ny, nx = self.tiles_shape
        return [(ty, tx) for ty in range(ny) for tx in range(nx)]

    def tile_box(self, tile: tuple[int, int]) -> tuple[int, int, int, int]:
        """``y0, y1, x0, x1`` of a tile."""
        ty, tx = tile
        ch, cw = self.chunk
        return ty * ch, min(self.height, (ty + 1) * ch), tx * cw, min(self.width, (tx + 1) * cw)

    def window_box(self, iy: int, ix: int) -> tuple[int, int, int, int]:
        y, x = self.ys[iy], self.xs[ix]
        return y, min(y + self.window, self.height), x, min(x + self.window, self.width)

    def owned(self, tile: tuple[int, int]) -> tuple[range, range]:
        """The window rows and columns whose windows start inside ``tile`` (pass 1's share)."""
        y0, y1, x0, x1 = self.tile_box(tile)
        ys, xs = self.ys, self.xs
        return (range(_first(ys, y0), _first(ys, y1)), range(_first(xs, x0), _first(xs, x1)))

    def overlapping(self, tile: tuple[int, int]) -> tuple[list[int], list[int]]:
        """The window rows and columns that cover some pixel of ``tile`` (pass 2's input)."""
        y0, y1, x0, x1 = self.tile_box(tile)
        rows = [i for i, y in enumerate(self.ys) if y < y1 and min(y + self.window, self.height) > y0]
        cols = [i for i, x in enumerate(self.xs) if x < x1 and min(x + self.window, self.width) > x0]
        return rows, cols

    def owner(self, iy: int, ix: int) -> tuple[int, int]:
        """The tile where window ``(iy, ix)`` starts."""
        return self.ys[iy] // self.chunk[0], self.xs[ix] // self.chunk[1]


def _first(starts: Sequence[int], value: int) -> int:
    """Index of the first start >= value (starts are sorted)."""
    for i, s in enumerate(starts):
        if s >= value:
            return i
    return len(starts)


def _grid(shape: tuple[int, int], settings: Any, native: Optional[int], patch: Optional[int],
          chunk: Optional[int | Sequence[int]]) -> Grid:
    """The windows the engine would use with sliding windows forced, and the tiles."""
    height, width = shape
    window = settings.window or settings.auto_window or (2 * native if native else None)
    if window is None:
        raise InvalidInputError("Give --window PX for this model (its input size is unknown).")
    if patch and min(height, width) < patch:
        raise InvalidInputError(f"The image ({width}x{height} px) is smaller than one {patch}-px "
                                "patch of the model.")
    if patch and window < patch:
        raise InvalidInputError(f"The window ({window} px) is smaller than one patch ({patch} px).")
    stride = settings.stride or max(patch or 1, window // 2)
    stride = min(stride, window)
    if chunk is None:
        size = stride * max(1, round(DEFAULT_CHUNK / stride))
        chunks = (size, size)
    else:
        chunks = (int(chunk), int(chunk)) if isinstance(chunk, (int, np.integer)) else tuple(
            int(c) for c in chunk)
        if len(chunks) != 2 or min(chunks) < 1:
            raise InvalidInputError(f"chunk must be one or two positive sizes, got {chunk!r}.")
    return Grid(height, width, window, stride, (min(chunks[0], height), min(chunks[1], width)))


# ---- the work of one tile (runs on a worker) ---------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """What every tile task shares: small (names, settings, the intensity rule; no weights)."""

    run: SegmentRun
    source: SourceSpec
    mode: Any
    rule: Any
    grid: Grid
    store: str
    fg_count: int
    confidence: bool

    def segmenter(self):
        return self.run.segmenter()

    def query(self):
        """The classes' read-out (text embeddings computed once per process)."""
        from .distributed import worker_cached

        seg = self.segmenter()

        def make():
            s = seg.settings
            fg, bg = seg._class_lists(self.run.classes, self.run.background or None)
            return seg._query(fg, bg, s, seg.precision(s))

        return worker_cached(("huge-query", self.run.key(), repr(self.run.classes),
                              repr(self.run.background)), make)

    def logits_path(self, tile: tuple[int, int]) -> str:
        return os.path.join(self.store, _WORK, f"logits_{tile[0]}_{tile[1]}")


@dataclass
class TileStats:
    """What a task touched: the largest source region it read (pixels), windows read (the
    memory a task needs is bounded by these)."""

    read_pixels: int = 0
    windows: int = 0
    class_max: Optional[list[float]] = None
    #: The process that ran the task.
    worker: int = field(default_factory=os.getpid)


def _read_region(job: _Job, boxes: Sequence[tuple[int, int, int, int]], stats: TileStats):
    """The source over the union of ``boxes``, prepared (0..1 rule), and its corner."""
    from .engine.preprocess import PreparedImage

    y0 = min(b[0] for b in boxes)
    y1 = max(b[1] for b in boxes)
    x0 = min(b[2] for b in boxes)
    x1 = max(b[3] for b in boxes)
    raw = job.source.open().read(y0, y1, x0, x1)
    stats.read_pixels = max(stats.read_pixels, (y1 - y0) * (x1 - x0))
    return PreparedImage(raw, job.mode, job.rule), y0, x0


def _encoder(job: _Job, boxes: list[tuple[int, int, int, int]], stats: TileStats,
             with_keys: bool) -> Iterator[tuple[Any, Any]]:
    """``(window box, WindowFeatures)`` of ``boxes``, encoded as the engine encodes them."""
    from .engine.windows import Box

    seg = job.segmenter()
    s = seg.settings
    prepared, ry, rx = _read_region(job, boxes, stats)
    engine_boxes = [Box(b[0], b[2], b[1], b[3]) for b in boxes]

    def crop(box: Box):
        unit = prepared.window(box.y0 - ry, box.y1 - ry, box.x0 - rx, box.x1 - rx)
        return seg._pixels(unit, (box.height, box.width))

    batch = 1 if with_keys else s.window_batch
    for group in seg._encoded(engine_boxes, crop, s.mode, with_keys, batch, seg.precision(s)):
        yield from ((w.box, w) for w in group)


def encode_tile(job: _Job, tile: tuple[int, int]) -> TileStats:
    """Pass 1: encode the windows starting in ``tile``, store their cosines, return the tile's
    per-class maximum at the denoising scale (-1 where it owns no window)."""
    import torch
    import zarr

    from .engine.settings import ENCODE_FIELDS

    stats = TileStats()
    query = job.query()
    readout = query.readout
    class_max = torch.full((len(readout.layout),), -1.0)
    rows, cols = job.grid.owned(tile)
    if len(rows) and len(cols):
        boxes = [job.grid.window_box(iy, ix) for iy in rows for ix in cols]
        store = None
        seg = job.segmenter()
        s = seg.settings
        encoded = {name: getattr(s, name) for name in ENCODE_FIELDS} | {"precision": seg.precision(s)}
        for k, (_, window) in enumerate(_encoder(job, boxes, stats, with_keys=False)):
            logits = seg._window_logits(query, window, encoded)  # 1 x Q x gh x gw
            class_max = torch.maximum(class_max, readout.class_max(logits)[0].cpu())
            values = logits[0].cpu().numpy()
            if store is None:
                store = zarr.open_array(job.logits_path(tile), mode="w",
                                        shape=(len(rows), len(cols), *values.shape),
                                        chunks=(1, 1, *values.shape), dtype="float32")
            store[k // len(cols), k % len(cols)] = values
            stats.windows += 1
    stats.class_max = [float(v) for v in class_max]
    return stats


def segment_tile(job: _Job, tile: tuple[int, int], classes: Sequence[int]) -> TileStats:
    """Pass 2: stitch the windows over ``tile`` (the engine's sums and coverage), write its
    labels and confidence chunks."""
    import torch
    import zarr

    from .engine.readout import ActiveClasses
    from .engine.segmenter import _Outputs
    from .engine.windows import coverage

    stats = TileStats()
    seg = job.segmenter()
    s = seg.settings
    query = job.query()
    readout = query.readout
    active = ActiveClasses.of(readout.layout, classes)
    grid = job.grid
    y0, y1, x0, x1 = grid.tile_box(tile)
    rows, cols = grid.overlapping(tile)
    device = readout.text.device
    channels = len(active.classes) if s.key_smoothing else len(active.prompts)
    band = torch.zeros(channels, y1 - y0, x1 - x0, dtype=torch.float32, device=device)
    keys: dict[tuple[int, int], Any] = {}
    if s.key_smoothing:  # the keys are not stored: encode the windows again (as streaming does)
        boxes = [grid.window_box(iy, ix) for iy in rows for ix in cols]
        for box, window in _encoder(job, boxes, stats, with_keys=True):
            keys[(box.y0, box.x0)] = window.keys
    opened: dict[tuple[int, int], Any] = {}
    for iy in rows:
        for ix in cols:
            owner = grid.owner(iy, ix)
            if owner not in opened:
                opened[owner] = zarr.open_array(job.logits_path(owner), mode="r")
            own_rows, own_cols = grid.owned(owner)
            lg = torch.from_numpy(np.asarray(
                opened[owner][iy - own_rows.start, ix - own_cols.start]))[None].to(device)
            wy0, wy1, wx0, wx1 = grid.window_box(iy, ix)
            key = keys.get((wy0, wx0))
            cells = readout.cell_scores(lg, active, None if key is None else key[None])
            up = readout.upsample(cells, seg.loaded.patch_size, (wy1 - wy0, wx1 - wx0))[0]
            a0, a1, b0, b1 = max(wy0, y0), min(wy1, y1), max(wx0, x0), min(wx1, x1)
            band[:, a0 - y0:a1 - y0, b0 - x0:b1 - x0] += up[:, a0 - wy0:a1 - wy0, b0 - wx0:b1 - wx0]
            stats.windows += 1
    cov_rows = torch.from_numpy(coverage(grid.height, grid.window, grid.stride)[y0:y1]).to(device)
    cov_cols = torch.from_numpy(coverage(grid.width, grid.window, grid.stride)[x0:x1]).to(device)
    band /= cov_rows[None, :, None] * cov_cols[None, None, :]
    out = _Outputs((y1 - y0, x1 - x0), readout, active, job.confidence)
    out.finish(0, y1 - y0, band)
    root = zarr.open_group(job.store, mode="r+")
    root["labels"][y0:y1, x0:x1] = out.labels
    if job.confidence:
        root["confidence"][:, y0:y1, x0:x1] = out.probabilities.astype(np.float16)
    return stats


# ---- the output store --------------------------------------------------------------------------
def _temp_prefix(out: Path) -> str:
    name = out.name
    if len(name.encode("utf-8")) > 64:
        import hashlib

        name = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
    return f"{TEMP_PREFIX}{name}-"


def _new_temp(out: Path) -> Path:
    return out.parent / f"{_temp_prefix(out)}{os.getpid()}-{secrets.token_hex(8)}.zarr"


def read_large_meta(path: str | Path) -> Optional[dict[str, Any]]:
    """The napari-maskclip record of a zarr store this module made, or None (not ours)."""
    meta = Path(path) / "zarr.json"
    try:
        if Path(path).is_symlink() or meta.stat().st_size > (4 << 20):
            return None
        record = json.loads(meta.read_text()).get("attributes", {}).get(_KEY)
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    if isinstance(record, dict) and record.get("format") == FORMAT:
        return record
    return None


def _stale_temps(out: Path) -> list[Path]:
    pattern = re.compile(re.escape(_temp_prefix(out)) + r"(\d+)-[0-9a-f]{16}\.zarr")
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(out.parent):
            match = pattern.fullmatch(entry.name)
            if match is None or not entry.is_dir(follow_symlinks=False):
                continue
            pid = int(match.group(1))
            # A dead run's store, or one of this process that no running generator holds (a
            # run stopped from Python).
            idle = entry.path not in _IN_USE if pid == os.getpid() else not _process_alive(pid)
            if idle:
                found.append(Path(entry.path))
    return found


def _claim(out: Path, request_digest: str) -> Optional[Path]:
    """A killed run's temporary store of the same request, renamed to this process; the
    killed runs' other temporary stores (of this module) are removed."""
    claimed = None
    for old in _stale_temps(out):
        record = read_large_meta(old)
        if record is None:
            continue  # not ours after all: leave it alone
        if claimed is None and record.get("request_digest") == request_digest:
            mine = _new_temp(out)
            try:
                os.rename(old, mine)  # atomic: two runs cannot both claim it
            except OSError:
                continue
            claimed = mine
        else:
            shutil.rmtree(old, ignore_errors=True)
    return claimed


def _done_tiles(store: Path, name: str) -> dict[tuple[int, int], Any]:
    folder = store / _WORK / name
    done: dict[tuple[int, int], Any] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = re.fullmatch(r"(\d+)_(\d+)\.json", entry.name)
            if match:
                with contextlib.suppress(OSError, ValueError):
                    done[(int(match.group(1)), int(match.group(2)))] = json.loads(
                        Path(entry.path).read_text())
    return done


def _mark(store: Path, name: str, tile: tuple[int, int], value: Any) -> None:
    atomic_write_text(store / _WORK / name / f"{tile[0]}_{tile[1]}.json", json.dumps(value))


# ---- the run -----------------------------------------------------------------------------------
@dataclass
class LargeResult:
    """What :func:`segment_large` made: the store, its shape and classes, tiles done."""

    out: Path
    shape: tuple[int, int]
    classes: list[str]
    removed_classes: list[str] = field(default_factory=list)
    tiles: int = 0
    resumed: int = 0
    already_done: bool = False

    def line(self) -> str:
        if self.already_done:
            return f"{self.out.name}: already done (same request); nothing to do."
        note = f", removed by denoising: {', '.join(self.removed_classes)}" \
            if self.removed_classes else ""
        resumed = f", {self.resumed} resumed" if self.resumed else ""
        h, w = self.shape
        return f"{self.out.name}: {w}x{h} px in {self.tiles} tile(s){resumed}{note}"


def segment_large(
    source: str | Path,
    out: str | Path,
    *,
    classes: Any,
    background: Any = None,
    model: str = "ViT-B-16",
    pretrained: Optional[str] = None,
    device: str = "auto",
    precision: str = "auto",
    settings: Any = None,
    level: Optional[int] = None,
    channel_axis: Optional[int] = None,
    channels: Optional[Sequence[int]] = None,
    chunk: Optional[int | Sequence[int]] = None,
    confidence: bool = True,
    overwrite: bool = False,
    client: Any = None,
    window: Optional[int] = None,
    on_load: Optional[Callable[[Any], None]] = None,
) -> Generator[Progress, None, LargeResult]:
    """Segment the huge image at ``source`` (zarr array, OME-Zarr group, TIFF) into the zarr
    store ``out`` (``labels`` H x W, ``confidence`` classes x H x W float16), tile by tile.

    Yields :class:`~napari_maskclip.progress.Progress` per tile (stages ``encode`` and
    ``segment``) and returns a :class:`LargeResult`. With a dask ``client`` the tiles run on its
    workers (at most ``window``, default twice the workers, in flight), else here one by one.
    Every worker must see ``source`` and ``out`` at the same paths. See the module doc for the
    scale, the tiles, resuming and what is refused.
    """
    from .classes import parse_classes
    from .engine.names import default_pretrained
    from .engine.settings import SegmentSettings
    from .result_files import request_digest

    fg = parse_classes(classes)
    bg = parse_classes(background, allow_empty=True) if background else []
    parse_classes(fg + bg)
    settings = (settings or SegmentSettings()).validate()
    if settings.short_side is not None:
        raise InvalidInputError(
            "Huge images are segmented at their native resolution: drop --short-side (for a "
            "coarser scale use a lower-resolution pyramid level, --level N).")
    if settings.pamr or settings.tlp or settings.regions is not None:
        raise InvalidInputError("PAMR, TLP and region voting need the whole image's scores: turn "
                                "them off for huge images.")
    if settings.mode == "rfclip" and settings.rfclip_global == "image":
        raise InvalidInputError("RF-CLIP's global embedding of the whole image needs the whole "
                                "image at once: use rfclip_global 'window' (--rfclip-global "
                                "window) for huge images.")
    out = Path(os.path.abspath(out))
    if out.suffix != ".zarr":
        raise InvalidInputError(f"--out {out}: a huge image's result is a zarr store; name it "
                                "*.zarr.")
    if (out.exists() or out.is_symlink()) and (read_large_meta(out) is None or not out.is_dir()):
        raise OutputError(f"{out} exists and napari-maskclip did not make it: move it away or "
                          "choose another --out.")
    spec = SourceSpec.of(source, level, channel_axis)
    src = spec.open()
    pretrained = default_pretrained(model, pretrained)
    run = SegmentRun(model, pretrained, device, precision, settings, fg, bg, on_load=on_load)
    native, patch = _model_geometry(run, client)
    grid = _grid(src.shape, settings, native, patch, chunk)
    request = {
        "source": spec.path, "level": level, "shape": list(src.shape), "dtype": str(src.dtype),
        "model": model, "pretrained": pretrained, "precision": precision,
        "classes": [c.text for c in fg], "background": [c.text for c in bg],
        "settings": settings.to_dict(), "channel_axis": channel_axis,
        "channels": list(channels) if channels is not None else None,
        "chunk": list(grid.chunk), "window": grid.window, "stride": grid.stride,
        "confidence": confidence,
    }
    digest = request_digest(request)

    existing = out.exists() or out.is_symlink()
    if existing:
        record = read_large_meta(out)
        if record.get("request_digest") == digest and record.get("state") == "complete":
            return LargeResult(out, src.shape, [c.name for c in fg], already_done=True)
        if not overwrite:
            raise OutputError(f"{out} holds a result of another request (other input, classes "
                              "or settings): pass --overwrite to replace it, or choose another "
                              "--out.")
    out.parent.mkdir(parents=True, exist_ok=True)

    mode, rule = plan_source(src, channels)
    store = _claim(out, digest)
    resumed = store is not None
    if store is None:
        store = _new_temp(out)
        _create_store(store, grid, fg, digest, request, confidence)
    job = _Job(run, spec, mode, rule, grid, str(store), len(fg), confidence)
    tiles = grid.tiles()
    # On an error or Ctrl-C the temporary store stays: the next run resumes it.
    _IN_USE.add(str(store))
    try:
        # Pass 1: encode, per-tile class maxima (kept in markers for a resume).
        maxima = _done_tiles(store, "encoded")
        yield Progress("encode", len(maxima), len(tiles), f"encoding {len(tiles)} tile(s)")
        todo = [t for t in tiles if t not in maxima]
        for tile, stats in _run(client, encode_tile, job, todo, (), window):
            _mark(store, "encoded", tile, stats.class_max)
            maxima[tile] = stats.class_max
            yield Progress("encode", len(maxima), len(tiles), f"tile {len(maxima)}/{len(tiles)}",
                           info={"stats": stats})
        active, removed = _active(fg, bg, settings, maxima.values())
        # Pass 2: segment every tile with the classes kept.
        segmented = _done_tiles(store, "segmented")
        done_before = len(segmented)
        yield Progress("segment", len(segmented), len(tiles), "segmenting tiles")
        todo = [t for t in tiles if t not in segmented]
        for tile, stats in _run(client, segment_tile, job, todo, (active,), window):
            _mark(store, "segmented", tile, True)
            segmented[tile] = True
            yield Progress("segment", len(segmented), len(tiles),
                           f"tile {len(segmented)}/{len(tiles)}", info={"stats": stats})
    finally:
        _IN_USE.discard(str(store))
    _finish(store, out, fg, removed, settings, grid, overwrite=existing)
    return LargeResult(out, src.shape, [c.name for c in fg], removed, len(tiles),
                       resumed=done_before if resumed else 0)


def _model_geometry(run: SegmentRun, client: Any) -> tuple[int, int]:
    """The model's native input size and patch, where the tiles run (loading it there once)."""
    if client is None:
        return _geometry(run)
    return client.submit(_geometry, run, pure=False).result()


def _geometry(run: SegmentRun) -> tuple[int, int]:
    loaded = run.segmenter().loaded
    return int(max(loaded.native_size)), int(loaded.patch_size)


def _active(fg, bg, settings, maxima) -> tuple[tuple[int, ...], list[str]]:
    """The classes prompt denoising keeps, from every tile's maxima (as over the whole image)."""
    import torch

    from .engine.readout import PromptLayout
    from .engine.refine import denoise_keep

    layout = PromptLayout.from_classes(fg, bg)
    if not settings.denoise:
        return tuple(range(len(layout))), []
    class_max = torch.full((len(layout),), -1.0)
    for values in maxima:
        class_max = torch.maximum(class_max, torch.tensor(values, dtype=torch.float32))
    keep = denoise_keep(class_max, settings.denoise_threshold)
    kept = tuple(k for k in range(len(layout)) if bool(keep[k]))
    return kept, [layout.names[k] for k in range(len(layout)) if k not in kept]


def _create_store(store: Path, grid: Grid, fg, digest: str, request: dict, confidence: bool
                  ) -> None:
    import zarr

    root = zarr.open_group(str(store), mode="w-")
    root.attrs[_KEY] = {"format": FORMAT, "version": FORMAT_VERSION, "state": "partial",
                        "request_digest": digest, "request": request}
    label_dtype = "uint8" if len(fg) <= 255 else "uint16"
    root.create_array("labels", shape=(grid.height, grid.width), chunks=grid.chunk,
                      dtype=label_dtype, fill_value=0)
    if confidence:
        root.create_array("confidence", shape=(len(fg), grid.height, grid.width),
                          chunks=(1, *grid.chunk), dtype="float16", fill_value=0)
    (store / _WORK).mkdir()


def _finish(store: Path, out: Path, fg, removed: list[str], settings: Any, grid: Grid, *,
            overwrite: bool) -> None:
    """Drop the work files, record the result, and rename the store into place."""
    import zarr

    from .classes import class_colors

    shutil.rmtree(store / _WORK)
    root = zarr.open_group(str(store), mode="r+")
    record = dict(root.attrs[_KEY])
    colors = class_colors([c.name for c in fg])
    record.update(state="complete", removed_classes=removed,
                  classes=[{"index": i, "name": c.name, "synonyms": list(c.synonyms),
                            "color": list(color)}
                           for i, (c, color) in enumerate(zip(fg, colors), start=1)],
                  scale="native resolution (level given in the request)",
                  window=grid.window, stride=grid.stride)
    root.attrs[_KEY] = record
    if overwrite:
        old = out.parent / f"{_temp_prefix(out)}{os.getpid()}-{secrets.token_hex(8)}.zarr"
        os.rename(out, old)
        os.rename(store, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(store, out)
        except OSError as exc:
            raise OutputError(f"{out} appeared while this run was writing; the result is kept in "
                              f"{store.name}.") from exc


def _run(client: Any, fn: Callable, job: _Job, tiles: list[tuple[int, int]], extra: tuple,
         window: Optional[int]) -> Iterator[tuple[tuple[int, int], TileStats]]:
    """``fn(job, tile, *extra)`` for every tile, here or on ``client``'s workers, as they end."""
    if client is None:
        for tile in tiles:
            yield tile, fn(job, tile, *extra)
        return
    from .distributed import stream_futures

    tag = secrets.token_hex(4)
    job_future = client.scatter(job, broadcast=True, hash=False)
    yield from stream_futures(
        client, tiles,
        lambda tile: client.submit(fn, job_future, tile, *extra, pure=False,
                                   key=f"maskclip-{fn.__name__}-{tag}-{tile[0]}-{tile[1]}"),
        window=window,
    )
