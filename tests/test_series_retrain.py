"""Retrain as you go: a new student is kept only when it beats the current model on held-out
human pixels; cancelling leaves the old checkpoint as it was."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.draw import disk, rectangle

from napari_maskclip.errors import InvalidInputError, OutputError
from napari_maskclip.export import export_sample
from napari_maskclip.progress import run_to_completion
from napari_maskclip.series.retrain import (
    RetrainPolicy,
    retrain_iter,
    split_for_validation,
)
from napari_maskclip.student import TrainingData, TrainSettings, load_checkpoint, train

CLASSES = ["red", "green", "blue"]
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230)]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scene(rng: np.random.Generator, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Coloured discs and squares on grey noise; the mask is exact (0 = background)."""
    image = rng.normal(128, 20, (size, size, 1)).repeat(3, axis=2)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(2):
        k = int(rng.integers(0, 3))
        r = int(rng.integers(size // 6, size // 4))
        cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
        if rng.uniform() < 0.5:
            rr, cc = disk((cy, cx), r, shape=mask.shape)
        else:
            rr, cc = rectangle((cy - r, cx - r), extent=(2 * r, 2 * r), shape=mask.shape)
        image[rr, cc] = np.array(COLOURS[k]) + rng.normal(0, 10, (len(rr), 3))
        mask[rr, cc] = k + 1
    return image.clip(0, 255).astype(np.uint8), mask


def scenes(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [scene(rng) for _ in range(n)]


def wrong(mask: np.ndarray) -> np.ndarray:
    """Labels a careless person would give: every class shifted by one, background kept."""
    return np.where(mask > 0, mask % 3 + 1, 0).astype(np.uint8)


EMB = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
SETTINGS = TrainSettings(iterations=40, batch_size=4, crop_size=48, backbone="tiny",
                         backbone_weights="random", lr=0.05, scale_min=0.75, scale_max=1.25,
                         val_fraction=0.0, val_interval=0, save_interval=0,
                         self_train_fraction=1.0)
NAMES = [f"img{i:02d}" for i in range(12)]


def make_dataset(path, pairs, *, held_out_wrong: bool = False, train_wrong: bool = False):
    """Every pixel of every image edited by a person (no teacher needed)."""
    flags = [True] * len(NAMES[:len(pairs)])
    _, val = split_for_validation(NAMES[:len(pairs)], flags, 0.25)
    for i, (image, mask) in enumerate(pairs):
        held = i in val
        labels = wrong(mask) if (held and held_out_wrong) or (not held and train_wrong) else mask
        export_sample(path, NAMES[i], image, labels, CLASSES, edited=True)
    return [NAMES[i] for i in val]


def current_student(path, pairs, *, labels_wrong: bool, iterations: int = 40):
    masks = [wrong(m) if labels_wrong else m for _, m in pairs]
    data = TrainingData.from_arrays([p[0] for p in pairs], masks, CLASSES)
    train(data, path, settings=SETTINGS.replace(iterations=iterations), class_embeddings=EMB,
          device="cpu")
    return path


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_policy_says_when_to_retrain():
    policy = RetrainPolicy(every_k=5, iterations=10)
    assert [policy.due(n, 0) for n in (0, 4, 5, 9)] == [False, False, True, True]
    assert not policy.due(9, 5) and policy.due(10, 5)
    assert not RetrainPolicy(every_k=0).due(100)
    with pytest.raises(InvalidInputError):
        RetrainPolicy(every_k=-1)
    with pytest.raises(InvalidInputError):
        RetrainPolicy(every_k=3, iterations=0)


def test_split_is_stable_as_the_dataset_grows():
    names = [f"image_{i}" for i in range(200)]
    human = [i % 3 != 0 for i in range(200)]
    trained_before: set[str] = set()
    for n in (5, 20, 60, 200):
        train_pos, val_pos = split_for_validation(names[:n], human[:n], 0.2)
        val = {names[i] for i in val_pos}
        assert val and not val & trained_before  # never validate on an image trained on before
        assert all(human[i] for i in val_pos)  # held-out images have human pixels
        assert sorted(train_pos + val_pos) == list(range(n))
        trained_before |= {names[i] for i in train_pos}
    assert 0.1 < len(val_pos) / sum(human) < 0.3


def test_better_student_is_promoted_and_continues_the_current_one(tmp_path):
    pairs = scenes(12, seed=1)
    ds = tmp_path / "ds"
    val = make_dataset(ds, pairs)
    ckpt = current_student(tmp_path / "student.safetensors", pairs, labels_wrong=True)
    before = load_checkpoint(ckpt).iteration
    steps = []
    outcome = run_to_completion(
        retrain_iter(ds, ckpt, iterations=40, settings=SETTINGS, device="cpu", val_fraction=0.25),
        steps.append)
    assert outcome.validation == val and outcome.validation_pixels == 48 * 48 * len(val)
    assert outcome.warm_start and outcome.iterations == 40
    assert outcome.miou_new > outcome.miou_current + 0.2, outcome
    assert outcome.promoted and outcome.checkpoint == ckpt
    saved = load_checkpoint(ckpt)
    assert saved.iteration == before + 40 == outcome.total_iterations
    assert saved.meta["retrain"]["rounds"][-1]["val"] == val
    assert saved.meta["split"]["val"] == [] and not set(val) & set(saved.meta["split"]["train"])
    # The saved weights are the new student's.
    new_state = outcome.result.net.state_dict()
    assert all(torch.equal(saved.model_state[k], new_state[k].cpu()) for k in new_state)
    assert {s.stage for s in steps} >= {"setup", "train", "validate", "save"}
    assert [s.done for s in steps if s.stage == "train" and s.info.get("loss") is not None] \
        == list(range(1, 41))


def test_worse_student_is_not_promoted_and_the_checkpoint_stays(tmp_path):
    pairs = scenes(12, seed=1)
    ds = tmp_path / "ds"
    make_dataset(ds, pairs, train_wrong=True)  # a person labelled the training images wrongly
    ckpt = current_student(tmp_path / "student.safetensors", pairs, labels_wrong=False,
                           iterations=60)
    old = digest(ckpt)
    outcome = run_to_completion(
        retrain_iter(ds, ckpt, iterations=40, settings=SETTINGS, device="cpu", val_fraction=0.25))
    assert outcome.miou_new < outcome.miou_current - 0.2, outcome
    assert not outcome.promoted and outcome.checkpoint == ckpt
    assert "does not beat" in outcome.reason
    assert digest(ckpt) == old


def test_first_student_is_compared_with_the_model_in_use(tmp_path):
    pairs = scenes(12, seed=2)
    ds = tmp_path / "ds"
    make_dataset(ds, pairs)
    out = tmp_path / "models" / "student.safetensors"
    shown = []

    def all_background(image):  # what labels the images now (e.g. the page's MaskCLIP)
        shown.append(image.shape)
        return np.zeros(image.shape[:2], np.uint8)

    outcome = run_to_completion(retrain_iter(
        ds, None, out, iterations=40, settings=SETTINGS, class_embeddings=EMB,
        current=all_background, device="cpu", val_fraction=0.25))
    assert shown and shown[0] == (48, 48, 3)
    assert not outcome.warm_start and outcome.promoted and outcome.checkpoint == out
    assert outcome.miou_new > outcome.miou_current
    assert load_checkpoint(out).iteration == 40

    # Without a model to compare with, nothing is promoted and nothing is written.
    other = tmp_path / "other.safetensors"
    outcome = run_to_completion(retrain_iter(
        ds, None, other, iterations=2, settings=SETTINGS, class_embeddings=EMB, device="cpu"))
    assert not outcome.promoted and outcome.checkpoint is None and outcome.miou_current is None
    assert "no current model" in outcome.reason and not other.exists()


def test_cancel_leaves_the_old_checkpoint_intact(tmp_path):
    pairs = scenes(8, seed=3)
    ds = tmp_path / "ds"
    make_dataset(ds, pairs)
    ckpt = current_student(tmp_path / "student.safetensors", pairs, labels_wrong=True,
                           iterations=4)
    old, files = digest(ckpt), sorted(p.name for p in tmp_path.iterdir())
    gen = retrain_iter(ds, ckpt, iterations=40, settings=SETTINGS, device="cpu")
    for step in gen:
        if step.stage == "train" and step.done == 3:
            gen.close()
            break
    assert digest(ckpt) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    # The lock is released: a new round can run at once.
    outcome = run_to_completion(retrain_iter(ds, ckpt, iterations=2, settings=SETTINGS,
                                             device="cpu"))
    assert outcome.iterations == 2


def test_refuses_to_replace_a_file_it_did_not_make(tmp_path):
    pairs = scenes(4, seed=4)
    make_dataset(tmp_path / "ds", pairs)
    foreign = tmp_path / "notes.safetensors"
    foreign.write_text("mine")
    with pytest.raises(OutputError, match="not a student checkpoint"):
        run_to_completion(retrain_iter(tmp_path / "ds", None, foreign, settings=SETTINGS,
                                       class_embeddings=EMB, device="cpu"))
    assert foreign.read_text() == "mine"
    with pytest.raises(InvalidInputError, match="output"):
        run_to_completion(retrain_iter(tmp_path / "ds", None, settings=SETTINGS, device="cpu"))


def test_warm_start_begins_from_the_current_weights(tmp_path):
    pairs = scenes(6, seed=5)
    ds = tmp_path / "ds"
    make_dataset(ds, pairs)
    ckpt = current_student(tmp_path / "student.safetensors", pairs, labels_wrong=False,
                           iterations=3)
    old = load_checkpoint(ckpt).model_state
    still = SETTINGS.replace(lr=1e-12, momentum=0.0, weight_decay=0.0)
    outcome = run_to_completion(retrain_iter(ds, ckpt, iterations=1, settings=still,
                                             device="cpu"))
    params = dict(outcome.result.net.named_parameters())
    assert outcome.warm_start
    assert all(torch.allclose(params[k].detach().cpu(), old[k], atol=1e-6) for k in params)
    scratch = run_to_completion(retrain_iter(ds, None, tmp_path / "s.safetensors", iterations=1,
                                             settings=still, class_embeddings=EMB, device="cpu"))
    fresh = dict(scratch.result.net.named_parameters())
    assert not all(torch.allclose(fresh[k].detach().cpu(), old[k], atol=1e-6) for k in fresh
                   if k != "class_embeddings")


def test_series_dataset_trains_on_teacher_labels_and_validates_on_human_pixels(tmp_path,
                                                                              monkeypatch):
    """Saved through the series session: unedited images get the demo teacher's pseudo-labels,
    only pixels a person edited (or reviewed) are held out for the comparison."""
    from PIL import Image

    from napari_maskclip.series import SeriesSession, list_images
    from napari_maskclip.series.predictor import SeriesPredictor
    from napari_maskclip.student.teacher import Teacher
    from napari_maskclip.synthetic import CLASS_NAMES, make_scene

    folder = tmp_path / "images"
    folder.mkdir()
    found = [make_scene(k, size=(64, 64), n_objects=(1, 2)) for k in range(6)]
    for k, sc in enumerate(found):
        Image.fromarray(sc.image).save(folder / f"s{k}.png")
    session = SeriesSession.open(list_images(folder), tmp_path / "ds", list(CLASS_NAMES))
    teacher = SeriesPredictor.teacher("demo", list(CLASS_NAMES), background="background",
                                      device="cpu")
    edited_pixels = {}
    for i in range(len(session)):
        image = session.read_image(i)
        shown = teacher.predict(image)
        k = int(session.images[i].stem[1:])
        if i % 3 == 0:  # left as the model labelled it
            session.save(i, image, shown.labels, probabilities=shown.probabilities)
            edited_pixels[session.names[i]] = 0
        elif i % 3 == 1:  # the person fixed the left half
            labels = shown.labels.copy()
            labels[:, :32] = found[k].mask[:, :32]
            edited = np.zeros(labels.shape, bool)
            edited[:, :32] = True
            session.save(i, image, labels, edited=edited)
            edited_pixels[session.names[i]] = int(edited.sum())
        else:  # right as it is: Mark reviewed
            session.save(i, image, shown.labels, reviewed=True)
            edited_pixels[session.names[i]] = 64 * 64
    calls = []
    original = Teacher.pseudo_labels

    def spy(self, images):
        calls.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(Teacher, "pseudo_labels", spy)
    settings = SETTINGS.replace(crop_size=64, batch_size=2, iterations=2)
    outcome = run_to_completion(retrain_iter(
        session.dataset_dir, None, tmp_path / "student.safetensors", iterations=2,
        settings=settings, teacher=teacher.segmenter, current=lambda im: teacher.predict(im).labels,
        device="cpu", precision="fp32", text_cache=None, val_fraction=0.34))
    assert calls, "the teacher labelled the unedited pixels"
    assert outcome.validation and all(edited_pixels[n] > 0 for n in outcome.validation)
    assert outcome.validation_pixels == sum(edited_pixels[n] for n in outcome.validation)
    assert outcome.miou_new is not None and outcome.miou_current is not None
    assert outcome.promoted == (outcome.miou_new > outcome.miou_current)
    assert (tmp_path / "student.safetensors").exists() == outcome.promoted
