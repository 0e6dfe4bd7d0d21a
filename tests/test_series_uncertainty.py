"""Hardest first: the margin uncertainty, the order it gives, and scoring in the background."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_maskclip.errors import Cancelled, InvalidInputError
from napari_maskclip.progress import run_to_completion
from napari_maskclip.series.uncertainty import hardest_first, margin_uncertainty, score_iter


def test_margin_counts_background_mass_as_a_class():
    # Pixel 0: one class at 0.5, background gets the other 0.5 -> a tie: uncertainty 1.
    # Pixel 1: one class at 1.0 -> certain: 0.  Pixel 2: 0.6 / 0.3 / bg 0.1 -> 1 - 0.3 = 0.7.
    probs = np.zeros((2, 1, 3), np.float32)
    probs[0, 0] = [0.5, 1.0, 0.6]
    probs[1, 0] = [0.0, 0.0, 0.3]
    assert margin_uncertainty(probs) == pytest.approx((1.0 + 0.0 + 0.7) / 3, abs=1e-6)
    # Without background, pixel 0 is "certain" (0.5 vs 0.0): the score drops.
    assert margin_uncertainty(probs, background_mass=False) == pytest.approx(
        ((1 - 0.5) + 0.0 + (1 - 0.3)) / 3, abs=1e-6)


def test_margin_is_blockwise_exact_on_a_large_image():
    rng = np.random.default_rng(0)
    raw = rng.dirichlet(np.ones(5), size=(600, 40)).transpose(2, 0, 1).astype(np.float32)
    probs = raw[1:]  # channel 0 plays the background: its mass is 1 - sum of the others
    top2 = np.sort(raw, axis=0)[-2:]
    expected = float(np.mean(1.0 - (top2[1] - top2[0])))
    assert margin_uncertainty(probs) == pytest.approx(expected, abs=1e-5)


def test_margin_refuses_what_is_not_a_stack():
    with pytest.raises(InvalidInputError, match="C x H x W"):
        margin_uncertainty(np.zeros((4, 4)))
    with pytest.raises(InvalidInputError, match="empty"):
        margin_uncertainty(np.zeros((2, 0, 4)))


def test_hardest_first_orders_by_score_and_puts_unscored_last():
    order = hardest_first([0, 1, 2, 3, 4], {0: 0.1, 1: 0.9, 3: 0.5, 4: 0.9})
    assert order == [1, 4, 3, 0, 2]  # ties keep their order; 2 (no score) last


def _confetti(seed: int, size: int = 64) -> np.ndarray:
    """Every pixel a random saturated hue: no object, no background the model knows."""
    from skimage.color import hsv2rgb

    rng = np.random.default_rng(seed)
    hsv = np.stack([rng.uniform(0, 1, (size, size)), np.full((size, size), 0.85),
                    np.full((size, size), 0.9)], axis=-1)
    return (hsv2rgb(hsv) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def demo_predictor():
    import torch

    from napari_maskclip.series.predictor import SeriesPredictor
    from napari_maskclip.synthetic import CLASS_NAMES

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield SeriesPredictor.teacher("demo", list(CLASS_NAMES), background="background",
                                  device="cpu")
    torch.set_num_threads(before)


def test_hardest_first_puts_ambiguous_scenes_first_with_the_demo_model(demo_predictor, tmp_path):
    """A series folder of clear scenes (backgrounds the demo model was trained on) interleaved
    with ambiguous ones (every pixel a random colour): scored through the real model, the
    ambiguous ones come first in the session's order."""
    from PIL import Image

    from napari_maskclip.series import SeriesSession, list_images
    from napari_maskclip.synthetic import CLASS_NAMES, make_scene

    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(4):
        clear = make_scene(k, size=(64, 64), n_objects=(0, 0)).image
        Image.fromarray(clear).save(folder / f"img{2 * k}.png")
        Image.fromarray(_confetti(k)).save(folder / f"img{2 * k + 1}.png")  # ambiguous
    session = SeriesSession.open(list_images(folder), tmp_path / "ds", list(CLASS_NAMES))
    ambiguous = {i for i, path in enumerate(session.images) if int(path.stem[3:]) % 2}
    assert len(ambiguous) == 4
    steps = []
    scores = run_to_completion(score_iter(session, demo_predictor, range(len(session))),
                               steps.append)
    assert sorted(scores) == list(range(8))
    session.set_order(hardest_first(range(8), scores))
    assert set(session.order[:4]) == ambiguous, scores
    assert session.first_unsaved() in ambiguous
    assert [s.done for s in steps if s.info.get("score") is not None] == list(range(1, 9))
    assert steps[-1].total == 8 and steps[-1].fraction == 1.0


def test_score_iter_stops_between_images_when_closed():
    class Counting:
        calls = 0

        def predict(self, image):
            Counting.calls += 1
            return SimpleNamespace(probabilities=np.full((1, 2, 2), 0.5, np.float32))

    read = []
    gen = score_iter(lambda i: read.append(i) or np.zeros((2, 2, 3), np.uint8), Counting(),
                     [5, 6, 7])
    for step in gen:
        if step.info.get("score") is not None:
            gen.close()  # cancel after the first image
            break
    assert Counting.calls == 1 and read == [5]


def test_score_iter_skips_images_it_cannot_score():
    class Session:  # the session's read_image is used when the source has one
        def read_image(self, i):
            if i == 1:
                raise InvalidInputError("cannot read image 1")
            return np.zeros((3 if i == 2 else 2, 2, 3), np.uint8)

    class NoProbabilities:  # no probabilities for the 3-row image
        def predict(self, image):
            return SimpleNamespace(probabilities=None if image.shape[0] == 3 else
                                   np.full((2, 2, 2), 0.5, np.float32))

    steps = []
    scores = run_to_completion(score_iter(Session(), NoProbabilities(), [0, 1, 2]), steps.append)
    assert scores == {0: pytest.approx(1.0)}
    errors = [s.info for s in steps if "error" in s.info]
    assert [e["index"] for e in errors] == [1, 2]
    assert "cannot read" in errors[0]["error"] and "no class probabilities" in errors[1]["error"]
    assert hardest_first([1, 0, 2], scores) == [0, 1, 2]


def test_a_cancelled_prediction_stops_the_scoring():
    class Stopping:
        calls = 0

        def predict(self, image):
            Stopping.calls += 1
            raise Cancelled("Prediction cancelled.")

    with pytest.raises(Cancelled):
        run_to_completion(score_iter(lambda i: np.zeros((2, 2, 3), np.uint8), Stopping(), [0, 1]))
    assert Stopping.calls == 1
