"""TLP: PEARL's text-aware Laplacian propagation (Pei et al., CVPR 2026), a query-time refinement.

Written from the math of the authors' code (PGSmall/PEARL, ``pearl/prop.py`` and its use in
``pearl_ovss.py``, read only; the paper's wording alone leaves the constants open). For class
scores ``Z`` (``C x H x W`` at image size: prompt cosines, or key-smoothed probabilities; after
PAMR when both are on) and the image:

1. *Grid*: ``s_h = max(1, round(H / G))``, ``s_w`` likewise (``G = tlp_grid``, 80); ``Z`` and the
   image are average-pooled in ``s_h x s_w`` cells (the last ``H mod s_h`` rows and ``W mod s_w``
   columns are left out), giving ``h x w`` cells; ``s_h = s_w = 1``: the pixels themselves.
2. *Data trust*: ``P = softmax_c(Z)`` per cell (no temperature), ``conf = max_c P``. With the
   unit text embeddings ``t_c`` of the channels: ``S = rownorm(softmax_row(T T^T / 0.5) + 10 I)``
   and ``d_c = S_cc``: the code's ``einsum("cc,bcij->bcij", S, P)`` reads only S's diagonal,
   and so does this one. ``agree = clamp(sum_c d_c P_c^2, 0, 1)``,
   ``c = max(conf, 0.05)^2 (1 + agree)``.
3. *Edges* between 4-neighbour cells ``a, b``: ``gray = 0.299 R + 0.587 G + 0.114 B`` of the image
   as the model normalises it (``(x - mean) / std``); ``g = |gray_a - gray_b| / (mean g + 1e-6)``,
   the mean over all horizontal (resp. vertical) edges of the image;
   ``w_ab = clamp(exp(-5 g) (1 + clamp(sum_c d_c P_c(a) P_c(b), 0, 1)), 0, 1)``.
4. *Solve* ``(diag(c) + L_w) F = diag(c) Z`` (``L_w`` the weighted graph Laplacian,
   ``(L F)_a = sum_b w_ab (F_a - F_b)``; tau = 1) by conjugate gradients from ``F_0 = Z``:
   ``tlp_iterations`` steps (25), one CG over all channels and cells of the image (its inner
   products sum over both; ``1e-12`` guards the divisions, as the code).
5. ``F`` upsampled bilinearly (``align_corners=False``) back to ``H x W`` when pooled; it
   replaces the scores.

The system matrix is symmetric positive definite (``c > 0``, ``L_w`` a Laplacian), so CG
converges to its unique solution; constant scores are a fixed point (``L_w`` removes
constants). A constant image does *not* leave scores unchanged: every edge then has weight 1 and
the propagation is strongest.

Memory: the solve holds ``O(C h w)`` floats, ``h, w <= ~1.5 G`` whatever the image size. Pooling
(:meth:`TLPGrid.add`) and upsampling (:meth:`TLPGrid.rows`) run on blocks of rows: block starts at
multiples of ``s_h`` pool exactly the cells the whole image gives, and an upsampled block reads
only the grid rows its pixels interpolate from, so blocks equal the whole image.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["TLP_ITERATIONS", "TLP_GRID", "TLPGrid", "text_diagonal", "tlp", "tlp_factors",
           "tlp_solve"]

TLP_ITERATIONS = 25
TLP_GRID = 80
_TAU_S = 0.5  # temperature of the text similarity softmax
_DIAG_BOOST = 10.0
_EDGE_K = 5.0  # image-gradient gate: exp(-5 g)
_CONF_FLOOR = 0.05
_EPS = 1e-6
_GRAY = (0.299, 0.587, 0.114)


def tlp_factors(height: int, width: int, grid: int = TLP_GRID) -> tuple[int, int]:
    """Pooling factors ``(s_h, s_w)`` of an ``height x width`` image (Python's ``round``)."""
    return max(1, round(height / float(grid))), max(1, round(width / float(grid)))


def text_diagonal(text: torch.Tensor) -> torch.Tensor:
    """``d_c = S_cc`` (see the module doc) of ``C x D`` text embeddings (normalised here)."""
    t = F.normalize(text.float(), dim=-1)
    s = torch.softmax((t @ t.t()) / _TAU_S, dim=1)
    s = s + _DIAG_BOOST * torch.eye(s.shape[0], device=s.device, dtype=s.dtype)
    s = s / (s.sum(dim=1, keepdim=True) + _EPS)
    return s.diagonal().clone()


def _gray(image: torch.Tensor) -> torch.Tensor:
    """``... x C x h x w`` -> ``... x 1 x h x w``: luma of an RGB image, else its first channel."""
    if image.shape[-3] == 3:
        r, g, b = image[..., 0:1, :, :], image[..., 1:2, :, :], image[..., 2:3, :, :]
        return _GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b
    return image[..., :1, :, :]


def _laplacian(x: torch.Tensor, w_h: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """``(L_w x)_a = sum_b w_ab (x_a - x_b)`` over 4-neighbours; ``w_h``: ``1 x h x (w-1)``
    weights between horizontal neighbours, ``w_v``: ``1 x (h-1) x w``."""
    out = torch.zeros_like(x)
    d_h = (x[..., :, 1:] - x[..., :, :-1]) * w_h
    out[..., :, 1:] += d_h
    out[..., :, :-1] -= d_h
    d_v = (x[..., 1:, :] - x[..., :-1, :]) * w_v
    out[..., 1:, :] += d_v
    out[..., :-1, :] -= d_v
    return out


def tlp_solve(scores: torch.Tensor, gray: torch.Tensor, diag: torch.Tensor,
              iterations: int = TLP_ITERATIONS) -> torch.Tensor:
    """Steps 2-4 on one image's cells: ``C x h x w`` scores, ``1 x h x w`` gray guide, ``C``
    text diagonal -> the CG solution ``C x h x w`` (in the scores' dtype, at least float32)."""
    dtype = torch.promote_types(scores.dtype, torch.float32)
    z = scores.to(dtype)
    gray = gray.to(dtype)
    d = diag.to(device=z.device, dtype=dtype)[:, None, None]
    probs = torch.softmax(z, dim=0)
    conf = probs.amax(dim=0, keepdim=True)
    agree = (d * probs * probs).sum(dim=0, keepdim=True).clamp(0.0, 1.0)
    weight = conf.clamp_min(_CONF_FLOOR) ** 2 * (1.0 + agree)  # 1 x h x w
    g_h = (gray[..., :, 1:] - gray[..., :, :-1]).abs()
    g_v = (gray[..., 1:, :] - gray[..., :-1, :]).abs()
    g_h = g_h / (g_h.mean() + _EPS)
    g_v = g_v / (g_v.mean() + _EPS)
    gain_h = (d * probs[:, :, 1:] * probs[:, :, :-1]).sum(dim=0, keepdim=True).clamp(0.0, 1.0)
    gain_v = (d * probs[:, 1:, :] * probs[:, :-1, :]).sum(dim=0, keepdim=True).clamp(0.0, 1.0)
    w_h = (torch.exp(-_EDGE_K * g_h) * (1.0 + gain_h)).clamp(0.0, 1.0)
    w_v = (torch.exp(-_EDGE_K * g_v) * (1.0 + gain_v)).clamp(0.0, 1.0)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return weight * x + _laplacian(x, w_h, w_v)

    x = z.clone()
    r = weight * z - apply(x)
    p = r.clone()
    rs_old = (r * r).sum()
    for _ in range(int(iterations)):
        ap = apply(p)
        alpha = rs_old / ((p * ap).sum() + 1e-12)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum()
        p = r + (rs_new / (rs_old + 1e-12)) * p
        rs_old = rs_new
    return x


class TLPGrid:
    """TLP on one ``height x width`` image in blocks of rows: :meth:`add` every block of scores
    and guide (block starts at multiples of :attr:`factors`\\ ``[0]``), :meth:`solve`, then
    :meth:`rows` gives any block of refined scores."""

    def __init__(self, height: int, width: int, channels: int, *, grid: int = TLP_GRID,
                 device=None, dtype=torch.float32) -> None:
        self.size = (int(height), int(width))
        self.factors = tlp_factors(height, width, grid)
        sh, sw = self.factors
        self.cells = (height // sh, width // sw)
        self.scores = torch.zeros(channels, *self.cells, device=device, dtype=dtype)
        self.guide: Optional[torch.Tensor] = None
        self.solution: Optional[torch.Tensor] = None

    @property
    def pooled(self) -> bool:
        return self.factors != (1, 1)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pooled:
            return x
        return F.avg_pool2d(x[None], kernel_size=self.factors, stride=self.factors,
                            ceil_mode=False, count_include_pad=False)[0]

    def add(self, scores: torch.Tensor, guide: torch.Tensor, y0: int) -> None:
        """Scores ``C x rows x W`` and the normalised guide ``channels x rows x W`` of image rows
        ``y0..``; ``y0`` must be a multiple of the row factor."""
        sh = self.factors[0]
        if y0 % sh:
            raise ValueError(f"TLP blocks must start at multiples of {sh}, not {y0}")
        if scores.shape[1] < sh:  # the last rows short of a cell: left out, as by the whole pool
            return
        pooled = self._pool(scores.to(self.scores.dtype))
        g = self._pool(guide.to(device=self.scores.device, dtype=self.scores.dtype))
        if self.guide is None:
            self.guide = torch.zeros(g.shape[0], *self.cells, device=self.scores.device,
                                     dtype=self.scores.dtype)
        c0 = y0 // sh
        c1 = min(self.cells[0], c0 + pooled.shape[1])
        self.scores[:, c0:c1] = pooled[:, :c1 - c0]
        self.guide[:, c0:c1] = g[:, :c1 - c0]

    def solve(self, diag: torch.Tensor, iterations: int = TLP_ITERATIONS) -> torch.Tensor:
        """The CG solution on the cells (``C x h x w``); kept for :meth:`rows`."""
        if self.guide is None:
            raise ValueError("TLP needs the scores and the guide of every row first")
        self.solution = tlp_solve(self.scores, _gray(self.guide), diag, iterations)
        return self.solution

    def rows(self, y0: int, y1: int) -> torch.Tensor:
        """Refined scores ``C x (y1 - y0) x W`` of image rows ``y0..y1`` (bilinear from the
        cells, ``align_corners=False``, the source row ``(y + 0.5) h / H - 0.5`` clamped at 0)."""
        if self.solution is None:
            raise ValueError("call solve() first")
        sol = self.solution
        height, width = self.size
        if not self.pooled:
            return sol[:, y0:y1]
        h = sol.shape[1]
        scale = torch.tensor(h, dtype=torch.float32) / height
        ys = torch.arange(y0, y1, dtype=torch.float32)
        src = ((ys + 0.5) * scale - 0.5).clamp_min(0.0)
        i0 = src.floor().long().clamp(max=h - 1)
        i1 = torch.where(i0 < h - 1, i0 + 1, i0)
        lam = (src - i0.float()).to(device=sol.device, dtype=sol.dtype)
        lo, hi = int(i0.min()), int(i1.max()) + 1
        band = F.interpolate(sol[None, :, lo:hi], size=(hi - lo, width), mode="bilinear",
                             align_corners=False)[0]  # along the width only
        a = band[:, (i0 - lo).to(sol.device)]
        b = band[:, (i1 - lo).to(sol.device)]
        return a * (1.0 - lam)[None, :, None] + b * lam[None, :, None]


def normalised_guide(guide: torch.Tensor, mean: Optional[Sequence[float]],
                     std: Optional[Sequence[float]]) -> torch.Tensor:
    """``... x C x H x W`` 0..1 image -> ``(x - mean) / std`` per channel (as the model sees it);
    unchanged without a mean/std or when the channel count differs."""
    if mean is None or std is None or guide.shape[-3] != len(mean):
        return guide.float()
    m = torch.tensor(mean, dtype=torch.float32, device=guide.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=guide.device).view(-1, 1, 1)
    return (guide.float() - m) / s


@torch.no_grad()
def tlp(guide: torch.Tensor, scores: torch.Tensor, diag: torch.Tensor, *,
        iterations: int = TLP_ITERATIONS, grid: int = TLP_GRID) -> torch.Tensor:
    """TLP on whole images: ``B x C x H x W`` scores (or ``C x H x W``), the normalised guide
    ``B x channels x H x W`` and the ``C`` text diagonal; each image solved on its own."""
    squeeze = scores.dim() == 3
    if squeeze:
        scores, guide = scores[None], guide[None]
    if guide.shape[0] != scores.shape[0] or guide.shape[-2:] != scores.shape[-2:]:
        raise ValueError(f"guide {tuple(guide.shape)} does not match scores {tuple(scores.shape)}")
    out = []
    for i in range(scores.shape[0]):
        h, w = scores.shape[-2:]
        state = TLPGrid(h, w, scores.shape[1], grid=grid, device=scores.device,
                        dtype=torch.promote_types(scores.dtype, torch.float32))
        state.add(scores[i], guide[i], 0)
        state.solve(diag, iterations)
        out.append(state.rows(0, h))
    result = torch.stack(out)
    return result[0] if squeeze else result
