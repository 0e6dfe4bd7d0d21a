"""COCO masks: RLE encoding of instances, and safe decoding of what a COCO file declares.

COCO stores a mask as run-length encoding over the image in column-major order (``counts``: the
lengths of alternating runs of 0 and 1, starting with 0), either as a list ("uncompressed") or
as pycocotools' compressed string; or as polygons (lists ``x0, y0, x1, y1, ...`` in pixel
coordinates) that pycocotools rasterises.

Why not hand everything to pycocotools: its C code trusts its input. A ``counts`` list whose sum
exceeds the image overran the buffer in older versions, and a polygon coordinate like ``1e12``
crashes the process (measured: segmentation fault in 2.0.11). So counts are parsed and checked
here (sum must equal height * width) and decoded with numpy. Polygons go to pycocotools as they
are when they stay within one image size of the image (pycocotools itself clips them to the image,
so the masks equal every other COCO tool's); a polygon reaching further is first clipped to that
margin (Sutherland-Hodgman, in arithmetic that cannot overflow for any finite coordinate), which
can move its edge by a pixel where it was cut. An annotation's total outline is bounded by the
image's size (:func:`outline_limit`), so no number in a file sets how much is allocated.
Encoding runs only over an instance's bounding box, not the image.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "require_pycocotools",
    "encode_instance",
    "encode_mask",
    "counts_from_string",
    "counts_to_string",
    "decode_counts",
    "rle_area",
    "rle_counts",
    "polygons_to_mask",
    "MalformedSegmentation",
    "MAX_POLYGON_OUTLINE",
    "outline_limit",
]

_HINT = "pip install 'napari-maskclip[coco]' (or pip install pycocotools)"


class MalformedSegmentation(ValueError):
    """A declared segmentation cannot be turned into a mask (the caller says which and skips)."""


def require_pycocotools() -> Any:
    """``pycocotools.mask``, or a one-line error saying how to install it."""
    try:
        from pycocotools import mask
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InvalidInputError(
            f"COCO files need pycocotools, which is not installed: {_HINT}."
        ) from exc
    return mask


# ---- encoding ------------------------------------------------------------------------------------
def _runs_to_counts(starts: np.ndarray, ends: np.ndarray, total: int) -> list[int]:
    """Global run [start, end) positions (sorted, column-major) -> COCO counts (0-run first)."""
    if starts.size:
        # Runs that touch (end of one column = start of the next) are one run.
        joined = np.flatnonzero(starts[1:] == ends[:-1])
        if joined.size:
            keep_start = np.ones(starts.size, bool)
            keep_start[joined + 1] = False
            keep_end = np.ones(ends.size, bool)
            keep_end[joined] = False
            starts, ends = starts[keep_start], ends[keep_end]
    edges = np.empty(2 * starts.size + 2, dtype=np.int64)
    edges[0] = 0
    edges[1:-1:2] = starts
    edges[2:-1:2] = ends
    edges[-1] = total
    counts = np.diff(edges).tolist()
    if len(counts) > 1 and counts[-1] == 0:
        counts.pop()  # a mask that ends with a 1-run: pycocotools writes no empty last 0-run
    return counts


def encode_instance(
    box: tuple[slice, slice], inside: np.ndarray, shape: tuple[int, int]
) -> list[int]:
    """Uncompressed COCO counts of a mask given by its bounding box and the mask inside it."""
    h = int(shape[0])
    r0, c0 = int(box[0].start), int(box[1].start)
    bh, bw = inside.shape
    # Column-major with one padding row per column, so no run crosses a column.
    padded = np.zeros((bw, bh + 1), dtype=np.int8)
    padded[:, :bh] = inside.T
    flat = padded.ravel()
    change = np.diff(flat, prepend=np.int8(0))
    local_starts = np.flatnonzero(change == 1)
    local_ends = np.flatnonzero(change == -1)

    def to_global(local: np.ndarray) -> np.ndarray:
        col, row = np.divmod(local, bh + 1)
        return (c0 + col).astype(np.int64) * h + r0 + row

    return _runs_to_counts(to_global(local_starts), to_global(local_ends), h * int(shape[1]))


def encode_mask(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO counts of a whole ``H x W`` bool mask."""
    mask = np.asarray(mask, dtype=bool)
    return encode_instance((slice(0, mask.shape[0]), slice(0, mask.shape[1])), mask, mask.shape)


def counts_to_string(counts: Sequence[int], shape: tuple[int, int]) -> str:
    """pycocotools' compressed string of checked counts (what COCO files normally hold)."""
    mask_api = require_pycocotools()
    rle = mask_api.frPyObjects(
        {"size": [int(shape[0]), int(shape[1])], "counts": list(counts)},
        int(shape[0]),
        int(shape[1]),
    )
    counts_out = rle["counts"]
    return counts_out.decode("ascii") if isinstance(counts_out, bytes) else str(counts_out)


# ---- decoding ------------------------------------------------------------------------------------
def counts_from_string(text: str, limit: int) -> list[int]:
    """Parse pycocotools' compressed counts (a port of ``rleFrString``), refusing bad strings.

    ``limit`` (height * width) bounds every count, so a crafted string cannot ask for more.
    """
    counts: list[int] = []
    data = text.encode("ascii", errors="strict") if isinstance(text, str) else bytes(text)
    p, n = 0, len(data)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n or k > 12:
                raise MalformedSegmentation("compressed RLE string ends inside a number")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise MalformedSegmentation(
                    "compressed RLE string holds a character outside its alphabet"
                )
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0 or x > limit:
            raise MalformedSegmentation("compressed RLE string decodes to an impossible run length")
        counts.append(x)
    return counts


def _check_counts(counts: Any, shape: tuple[int, int]) -> list[int]:
    total = int(shape[0]) * int(shape[1])
    if not isinstance(counts, list):
        raise MalformedSegmentation("RLE counts must be a list or a string")
    out: list[int] = []
    running = 0
    for c in counts:
        if (
            isinstance(c, bool)
            or not isinstance(c, (int, float))
            or not math.isfinite(c)
            or c < 0
            or int(c) != c
        ):
            raise MalformedSegmentation("RLE counts must be non-negative whole numbers")
        running += int(c)
        if running > total:
            raise MalformedSegmentation(
                f"RLE counts add up to more than the image's {total} pixels"
            )
        out.append(int(c))
    if running != total:
        raise MalformedSegmentation(
            f"RLE counts add up to {running}, not the image's {total} pixels"
        )
    return out


def rle_counts(segmentation: dict[str, Any], shape: tuple[int, int]) -> list[int]:
    """Checked counts of an RLE segmentation (``{"size": [h, w], "counts": ...}``) for ``shape``."""
    size = segmentation.get("size")
    want = [int(shape[0]), int(shape[1])]
    if not isinstance(size, (list, tuple)) or list(size) != want:
        raise MalformedSegmentation(f"RLE size {size!r} is not the image's [height, width] {want}")
    counts = segmentation.get("counts")
    if isinstance(counts, (str, bytes)):
        try:
            counts = counts_from_string(counts, int(shape[0]) * int(shape[1]))
        except UnicodeEncodeError as exc:
            raise MalformedSegmentation("compressed RLE string is not ASCII") from exc
    return _check_counts(counts, shape)


def decode_counts(counts: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """``H x W`` bool mask of checked counts (column-major runs, 0 first)."""
    h, w = int(shape[0]), int(shape[1])
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, np.asarray(counts, dtype=np.int64))
    return flat.reshape(w, h).T


def rle_area(counts: Sequence[int]) -> int:
    return int(sum(counts[1::2]))


def _clip_polygon(
    points: list[tuple[float, float]], x0: float, y0: float, x1: float, y1: float
) -> list[tuple[float, float]]:
    """Sutherland-Hodgman clipping of a polygon to the rectangle [x0, x1] x [y0, y1]."""

    def clip(pts: list[tuple[float, float]], inside, cross) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(cross(prev, cur))
                out.append(cur)
            elif inside(prev):
                out.append(cross(prev, cur))
        return out

    # Written so that no intermediate overflows for any finite input (coordinates up to 1.8e308):
    # differences of halves, and the crossing as a convex combination of the two ends.
    def between(u: float, v: float, t: float) -> float:
        return (1.0 - t) * u + t * v

    def fraction(edge: float, u: float, v: float) -> float:
        return min(1.0, max(0.0, (edge * 0.5 - u * 0.5) / (v * 0.5 - u * 0.5)))

    def at_x(x: float):
        return lambda a, b: (x, between(a[1], b[1], fraction(x, a[0], b[0])))

    def at_y(y: float):
        return lambda a, b: (between(a[0], b[0], fraction(y, a[1], b[1])), y)

    pts = points
    for inside, cross in (
        (lambda p: p[0] >= x0, at_x(x0)),
        (lambda p: p[0] <= x1, at_x(x1)),
        (lambda p: p[1] >= y0, at_y(y0)),
        (lambda p: p[1] <= y1, at_y(y1)),
    ):
        if not pts:
            break
        pts = clip(pts, inside, cross)
    return pts


#: Longest total polygon outline (pixels) rasterised for one annotation: pycocotools allocates
#: 5 points per pixel of outline (about 50 bytes, measured), so this caps that at ~200 MB.
MAX_POLYGON_OUTLINE = 4_000_000


def outline_limit(shape: tuple[int, int]) -> int:
    """The longest outline accepted on an image of ``shape``: one that runs around every pixel
    (4 per pixel) plus the border margin's, at most :data:`MAX_POLYGON_OUTLINE`. So the memory a
    polygon can ask for follows the image, not the numbers in the file: clipped to the margin, a
    zigzag between -1e300 and 1e300 still has a long outline, and is refused here."""
    h, w = int(shape[0]), int(shape[1])
    return int(min(MAX_POLYGON_OUTLINE, 4 * h * w + 64 * (h + w)))


def polygons_to_mask(polygons: Any, shape: tuple[int, int]) -> Optional[np.ndarray]:
    """``H x W`` bool mask of COCO polygons, or None when they cover nothing (fewer than 3
    points). pycocotools rasterises them as every COCO tool does, clipping to the image; a
    polygon reaching further than the image's size beyond its border is first clipped to that
    margin (pycocotools crashes on far-away coordinates)."""
    if not isinstance(polygons, list) or not polygons:
        raise MalformedSegmentation("a polygon segmentation must be a non-empty list of polygons")
    h, w = int(shape[0]), int(shape[1])
    margin = float(max(h, w))
    x0, y0, x1, y1 = -margin, -margin, w + margin, h + margin
    kept: list[list[float]] = []
    outline = 0.0
    for poly in polygons:
        if not isinstance(poly, list):
            raise MalformedSegmentation(
                "each polygon must be a list of numbers x0, y0, x1, y1, ..."
            )
        if len(poly) % 2:
            raise MalformedSegmentation("a polygon has an odd number of coordinates")
        for v in poly:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise MalformedSegmentation("polygon coordinates must be finite numbers")
        if len(poly) < 6:
            continue  # fewer than 3 points enclose no area
        xs = np.asarray(poly[0::2], dtype=np.float64)
        ys = np.asarray(poly[1::2], dtype=np.float64)
        if xs.min() < x0 or xs.max() > x1 or ys.min() < y0 or ys.max() > y1:
            points = _clip_polygon(list(zip(xs.tolist(), ys.tolist())), x0, y0, x1, y1)
            if len(points) < 3:
                continue
            xs = np.asarray([p[0] for p in points])
            ys = np.asarray([p[1] for p in points])
        outline += float(
            np.maximum(np.abs(np.diff(xs, append=xs[:1])), np.abs(np.diff(ys, append=ys[:1]))).sum()
        )
        kept.append(np.stack([xs, ys], axis=1).ravel().tolist())
    limit = outline_limit((h, w))
    if outline > limit:
        raise MalformedSegmentation(
            f"its polygons' outline is {outline:.0f} px long, more than a {w} x {h} image can "
            f"hold ({limit} px)"
        )
    if not kept:
        return None
    mask_api = require_pycocotools()
    merged = mask_api.merge(mask_api.frPyObjects(kept, h, w))
    # Decoded here rather than with mask_api.decode (which warns under numpy 2).
    return decode_counts(counts_from_string(merged["counts"], h * w), (h, w))
