"""Stitching window scores into the image, a band of rows at a time (bounded memory).

The read-out sums each window's upsampled scores into the image and divides by how many windows
cover each pixel. Holding those sums for the whole image costs ``C x H x W`` floats (13 GB for 13
prompts on a 16000^2 image), so :class:`RowStitcher` keeps only the rows still open: windows
arrive row by row (see :func:`~napari_maskclip.engine.windows.window_boxes`), so once a window
starting at row ``y`` arrives, every row above ``y`` is complete. Complete rows are divided by
their coverage and handed out as blocks of output rows (resized to the image size when the image
was resized for inference), exactly the blocks a whole-image buffer would give: the sums are
added in the same window order and every block is computed by the same operations on the same
shapes, so the result is bit for bit the same.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .windows import Box, coverage

__all__ = ["RowStitcher", "ROW_BLOCK"]

#: Output rows turned into probabilities and labels at a time.
ROW_BLOCK = 256


class RowStitcher:
    """Sums ``C x h x w`` window scores at processing size and yields finished output blocks.

    ``plan`` is the encoding plan (``inference``, ``window``, ``stride``); ``out_shape`` the size
    the blocks are resized to (the image size). :meth:`add` and :meth:`close` yield
    ``(y0, y1, block)`` with ``block`` ``C x (y1 - y0) x W`` for consecutive ``ROW_BLOCK`` blocks.
    """

    def __init__(
        self,
        channels: int,
        proc_shape: tuple[int, int],
        out_shape: tuple[int, int],
        plan: dict,
        device: torch.device | str = "cpu",
    ) -> None:
        self.channels = channels
        self.proc_h, self.proc_w = proc_shape
        self.height, self.width = out_shape
        self.device = device
        self.resize = (self.proc_h, self.proc_w) != (self.height, self.width)
        self.cov_rows: Optional[torch.Tensor] = None
        if plan.get("inference") == "sliding":
            window, stride = plan["window"], plan["stride"]
            self.cov_rows = torch.from_numpy(coverage(self.proc_h, window, stride)).to(device)
            self.cov_cols = torch.from_numpy(coverage(self.proc_w, window, stride)).to(device)
        # Output block b needs processing rows [_first[b], _last[b]] (inclusive).
        starts = list(range(0, self.height, ROW_BLOCK))
        self._blocks = [(y0, min(self.height, y0 + ROW_BLOCK)) for y0 in starts]
        self._first = [self._source_rows(y0, y1)[0] for y0, y1 in self._blocks]
        self._last = [self._source_rows(y0, y1)[1] for y0, y1 in self._blocks]
        self._next_block = 0
        self._base = 0  # processing row of band[:, 0]
        self._band = torch.zeros(channels, 0, self.proc_w, dtype=torch.float32, device=device)
        self._complete = 0  # rows below this are summed and divided
        self._last_y0 = 0

    def _source_rows(self, y0: int, y1: int) -> tuple[int, int]:
        if not self.resize:
            return y0, y1 - 1
        top, bottom, _ = _row_weights(y0, y1, self.proc_h, self.height)
        return int(top.min()), int(bottom.max())

    @property
    def band_rows(self) -> int:
        """Rows held now (for tests and memory checks)."""
        return int(self._band.shape[1])

    def add(self, box: Box, up: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Add window ``box``'s ``C x box.height x box.width`` scores; yield blocks now finished."""
        if box.y0 < self._last_y0:
            raise ValueError("windows must arrive row by row (top to bottom)")
        self._last_y0 = box.y0
        yield from self._advance(box.y0)
        end = box.y1 - self._base
        if end > self._band.shape[1]:
            grow = torch.zeros(self.channels, end - self._band.shape[1], self.proc_w,
                               dtype=torch.float32, device=self.device)
            self._band = torch.cat([self._band, grow], dim=1)
        self._band[:, box.y0 - self._base:box.y1 - self._base, box.x0:box.x1] += up

    def close(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """All windows are in: yield the remaining blocks."""
        yield from self._advance(self.proc_h)

    def _advance(self, complete: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Rows below ``complete`` will get no more windows: divide them, hand out blocks."""
        complete = min(complete, self.proc_h)
        if complete > self._complete:
            # Rows nobody wrote yet (below every window so far) are zeros: grow the band to them.
            if complete - self._base > self._band.shape[1]:
                grow = torch.zeros(self.channels, complete - self._base - self._band.shape[1],
                                   self.proc_w, dtype=torch.float32, device=self.device)
                self._band = torch.cat([self._band, grow], dim=1)
            if self.cov_rows is not None:
                lo, hi = self._complete - self._base, complete - self._base
                rows = self.cov_rows[self._complete:complete]
                self._band[:, lo:hi] /= rows[None, :, None] * self.cov_cols[None, None, :]
            self._complete = complete
        while self._next_block < len(self._blocks) and self._last[self._next_block] < self._complete:
            y0, y1 = self._blocks[self._next_block]
            yield y0, y1, self._block(y0, y1)
            self._next_block += 1
            if self._next_block < len(self._blocks):
                drop = self._first[self._next_block] - self._base
                if drop > 0:
                    self._band = self._band[:, drop:].clone()
                    self._base += drop

    def _block(self, y0: int, y1: int) -> torch.Tensor:
        if not self.resize:
            return self._band[:, y0 - self._base:y1 - self._base]
        return _resize_band(self._band, self._base, y0, y1, self.proc_h, self.height, self.width)


def _row_weights(y0: int, y1: int, src_h: int, height: int):
    """Source rows and weights of output rows ``y0..y1`` (bilinear, align_corners=False)."""
    scale = src_h / height
    ys = (torch.arange(y0, y1, dtype=torch.float64) + 0.5) * scale - 0.5
    ys = ys.clamp(min=0.0)
    top = ys.floor().long().clamp(max=src_h - 1)
    bottom = (top + 1).clamp(max=src_h - 1)
    frac = (ys - top.double()).float()
    return top, bottom, frac


def _resize_band(
    band: torch.Tensor, base: int, y0: int, y1: int, src_h: int, height: int, width: int
) -> torch.Tensor:
    """Output rows ``y0..y1`` of the bilinear resize of the full ``src_h``-row map to
    ``height x width``, from the band of its rows starting at ``base`` (the same arithmetic as
    resizing the whole map)."""
    top, bottom, frac = _row_weights(y0, y1, src_h, height)
    frac = frac.to(band.device)
    rows_top = band[:, (top - base).to(band.device)]
    rows_bottom = band[:, (bottom - base).to(band.device)]
    rows = rows_top + (rows_bottom - rows_top) * frac[None, :, None]
    return resize_cols(rows, width)


def resize_cols(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Bilinear resize of the last axis to ``width`` (align_corners=False)."""
    src_w = rows.shape[-1]
    if src_w == width:
        return rows
    scale = src_w / width
    xs = ((torch.arange(width, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
    left = xs.floor().long().clamp(max=src_w - 1)
    right = (left + 1).clamp(max=src_w - 1)
    frac = (xs - left.double()).float().to(rows.device)
    a = rows[..., left.to(rows.device)]
    b = rows[..., right.to(rows.device)]
    return a + (b - a) * frac
