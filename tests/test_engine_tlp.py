"""TLP (engine/tlp.py, PEARL's text-aware Laplacian propagation) against a float64 reference of
the authors' forward, its defining equations, and in the Segmenter's row blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine_helpers import REF_DTYPE, EncoderCalls, blocky_rgb, reference_tlp
from napari_maskclip.engine import Segmenter
from napari_maskclip.engine import segmenter as segmenter_module
from napari_maskclip.engine.tlp import TLPGrid, text_diagonal, tlp, tlp_factors, tlp_solve
from napari_maskclip.errors import InvalidInputError

CLASSES = ["red", "green", "blue"]


def _inputs(h, w, c=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g, dtype=dtype)
    image[:, :, w // 2:] += 1.0  # an edge
    logits = 0.3 * torch.randn(c, h, w, generator=g, dtype=dtype)
    text = F.normalize(torch.randn(c, 16, generator=g, dtype=dtype), dim=-1)
    return image, logits, text


@pytest.mark.parametrize("size,grid", [((90, 130), 20), ((20, 25), 80), ((61, 33), 10)],
                         ids=["pooled-4x6", "cells-are-pixels", "pooled-6x3"])
def test_tlp_matches_the_reference_forward(size, grid):
    image, logits, text = _inputs(*size, seed=size[0])
    out = tlp(image, logits, text_diagonal(text), iterations=25, grid=grid)
    ref = reference_tlp(image, logits, text, iterations=25, grid=grid)
    assert out.shape == logits.shape
    torch.testing.assert_close(out.to(REF_DTYPE), ref, atol=1e-5, rtol=0)
    assert (out - logits).abs().max() > 1e-2  # it did propagate


def test_converged_solution_satisfies_the_linear_system():
    """Run to convergence, the solve satisfies (diag(c) + L_w) F = diag(c) Z, the matrix built
    here entry by entry from the reference's weights."""
    image, logits, text = _inputs(9, 11, seed=1, dtype=torch.float64)
    reference_tlp(image, logits, text, iterations=0, grid=80)
    cw, w_h, w_v, z = reference_tlp.system
    h, w = z.shape[-2:]
    n = h * w
    a = torch.zeros(n, n, dtype=REF_DTYPE)
    for y in range(h):
        for x in range(w):
            i = y * w + x
            a[i, i] += cw[y, x]
            for (yy, xx, wt) in ((y, x + 1, w_h[y, x] if x + 1 < w else None),
                                 (y + 1, x, w_v[y, x] if y + 1 < h else None)):
                if wt is None:
                    continue
                j = yy * w + xx
                a[i, i] += wt
                a[j, j] += wt
                a[i, j] -= wt
                a[j, i] -= wt
    assert torch.linalg.eigvalsh(a).min() > 0  # symmetric positive definite
    sol = tlp_solve(logits, (0.299 * image[0:1] + 0.587 * image[1:2] + 0.114 * image[2:3]),
                    text_diagonal(text).double(), iterations=400)
    b = (cw.reshape(-1)[None] * z.reshape(z.shape[0], -1))
    residual = sol.reshape(z.shape[0], -1) @ a.T - b
    # The code's 1e-12 guard in CG's step sizes sets a floor near 1e-8 of the residual.
    assert float(residual.norm() / b.norm()) < 1e-6
    few = tlp_solve(logits, (0.299 * image[0:1] + 0.587 * image[1:2] + 0.114 * image[2:3]),
                    text_diagonal(text).double(), iterations=3)
    assert float(((few.reshape(z.shape[0], -1) @ a.T - b).norm() / b.norm())) > 1e-3


def test_constant_scores_are_a_fixed_point_whatever_the_image():
    image, _, text = _inputs(50, 70, seed=2)
    logits = torch.tensor([0.2, -0.1, 0.05]).view(3, 1, 1).expand(3, 50, 70).clone()
    out = tlp(image, logits, text_diagonal(text), grid=20)
    torch.testing.assert_close(out, logits, atol=1e-6, rtol=0)


def test_a_constant_image_smooths_most():
    """Documented: a flat image does not leave the scores unchanged, it gives every edge weight
    1 (the strongest propagation); an image edge keeps the two sides apart."""
    _, logits, text = _inputs(30, 40, seed=3)
    flat = torch.zeros(3, 30, 40)
    edge = flat.clone()
    edge[:, :, 20:] = 1.0
    d = text_diagonal(text)
    smooth = tlp(flat, logits, d, grid=80)
    kept = tlp(edge, logits, d, grid=80)
    assert smooth.std() < 0.5 * logits.std()
    across = lambda t: float((t[:, :, 19] - t[:, :, 20]).abs().mean())  # noqa: E731
    assert across(kept) > 2 * across(smooth)


def test_blocks_equal_the_whole_image_and_rows_are_bilinear():
    image, logits, text = _inputs(93, 70, seed=4)
    d = text_diagonal(text)
    whole = tlp(image, logits, d, grid=20)
    state = TLPGrid(93, 70, 3, grid=20)
    step = state.factors[0]
    assert state.factors == tlp_factors(93, 70, 20) == (5, 4)
    for y0 in range(0, 93, 2 * step):
        state.add(logits[:, y0:y0 + 2 * step], image[:, y0:y0 + 2 * step], y0)
    sol = state.solve(d)
    blocks = torch.cat([state.rows(y0, min(93, y0 + 7)) for y0 in range(0, 93, 7)], dim=1)
    assert torch.equal(blocks, whole)
    up = F.interpolate(sol[None], size=(93, 70), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(blocks, up, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiples"):
        state.add(logits[:, 1:3], image[:, 1:3], 1)


def _segmenter(tiny_vit, **settings):
    return Segmenter(tiny_vit, text_cache=None, templates="single", denoise=False,
                     precision="fp32", **settings)


def test_segmenter_tlp_is_query_time_and_exact_in_row_blocks(tiny_vit, monkeypatch):
    image = blocky_rgb(120, 88, seed=5, block=8)
    seg = _segmenter(tiny_vit)
    with EncoderCalls(tiny_vit.visual) as calls:
        features = seg.encode(image)
        plain = seg.segment(features, CLASSES)
        whole = seg.segment(features, CLASSES, tlp=True, tlp_grid=20, pamr=True,
                            pamr_iterations=2, pamr_dilations=(1, 2))
        assert calls.count == 1
    assert whole.settings["tlp"] is True and whole.settings["tlp_grid"] == 20
    assert not np.allclose(plain.probabilities, whole.probabilities, atol=1e-3)
    monkeypatch.setattr(segmenter_module, "_REFINE_ROWS", 7)  # rounded up to TLP's 6-row cells
    monkeypatch.setattr(segmenter_module, "_PAMR_WHOLE_PIXELS", 0)
    blocks = seg.segment(features, CLASSES, tlp=True, tlp_grid=20, pamr=True,
                         pamr_iterations=2, pamr_dilations=(1, 2))
    np.testing.assert_allclose(blocks.probabilities, whole.probabilities, atol=1e-6)
    # The same as TLP on the engine's own image-size scores, whole.
    seg_scores = {}
    original = segmenter_module.Readout.probabilities

    def spy(self, scores, active):
        seg_scores.setdefault("rows", []).append(scores[0].clone())
        return original(self, scores, active)

    monkeypatch.setattr(segmenter_module.Readout, "probabilities", spy)
    seg.segment(features, CLASSES)
    scores = torch.cat(seg_scores["rows"], dim=1)
    text = seg.text.embed_texts(CLASSES, ("a photo of a {}.",), precision="fp32").float()
    guide = torch.from_numpy(features.guide()).permute(2, 0, 1)
    mean = torch.tensor(tiny_vit.mean).view(3, 1, 1)
    std = torch.tensor(tiny_vit.std).view(3, 1, 1)
    expected = reference_tlp((guide - mean) / std, scores, text, iterations=25, grid=20)
    probs = torch.softmax(100 * expected, dim=0).numpy()
    noprm = seg.segment(features, CLASSES, tlp=True, tlp_grid=20)
    np.testing.assert_allclose(noprm.probabilities, probs, atol=1e-4)


def test_tlp_settings_are_checked(tiny_vit):
    seg = _segmenter(tiny_vit)
    features = seg.encode(blocky_rgb(16, 16))
    for bad in ({"tlp_iterations": -1}, {"tlp_grid": 0}, {"tlp_grid": 5000}):
        with pytest.raises(InvalidInputError, match="tlp"):
            seg.segment(features, CLASSES, tlp=True, **bad)
