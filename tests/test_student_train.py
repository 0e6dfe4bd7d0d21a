"""The MaskCLIP+ student's training loop: it learns, resumes exactly, and composes its targets
(person's labels, teacher pseudo-labels, ignore) as specified."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.draw import disk, rectangle

from napari_maskclip.errors import InvalidInputError
from napari_maskclip.student import (
    IGNORE,
    TrainingData,
    TrainSettings,
    compose_targets,
    load_checkpoint,
    segmentation_loss,
    train,
    train_iter,
)
from napari_maskclip.student.data import augment_batch, iteration_rng, labels_from_mask




@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: tiny networks gain nothing from more, and on a busy small machine
    threads spin against each other (measured 10x slower). conftest's OMP_NUM_THREADS=1 comes
    too late when a pytest plugin has already loaded the OpenMP runtime, so set it here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}


def shapes_scene(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Coloured circles and squares on grey noise; the mask is exact (0 = background)."""
    image = rng.normal(128, 25, (size, size, 1)).repeat(3, axis=2)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        k = int(rng.integers(0, len(COLOURS)))
        r = int(rng.integers(size // 6, int(size / 3.5)))
        cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
        if rng.uniform() < 0.5:
            rr, cc = disk((cy, cx), r, shape=mask.shape)
        else:
            rr, cc = rectangle((cy - r, cx - r), extent=(2 * r, 2 * r), shape=mask.shape)
        image[rr, cc] = np.array(list(COLOURS.values())[k]) + rng.normal(0, 15, (len(rr), 3))
        mask[rr, cc] = k + 1
    return image.clip(0, 255).astype(np.uint8), mask


def shapes_data(n: int, seed: int = 0, size: int = 64) -> TrainingData:
    rng = np.random.default_rng(seed)
    scenes = [shapes_scene(rng, size) for _ in range(n)]
    return TrainingData.from_arrays([s[0] for s in scenes], [s[1] for s in scenes], list(COLOURS))


def random_embeddings(rows: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def tiny_settings(**changes) -> TrainSettings:
    base = TrainSettings(iterations=8, batch_size=2, crop_size=32, backbone="tiny",
                         backbone_weights="random", val_fraction=0.2, val_interval=3,
                         save_interval=0)
    return base.replace(**changes)


@pytest.mark.slow
def test_student_learns_synthetic_shapes_with_exact_labels():
    """Every pixel labelled exactly (no teacher): the loss falls and held-out mIoU exceeds 0.9."""
    data = shapes_data(24)
    settings = TrainSettings(iterations=120, batch_size=8, crop_size=64, backbone="tiny",
                             backbone_weights="random", lr=0.05, scale_min=0.75, scale_max=1.5,
                             val_fraction=0.25, val_interval=40, save_interval=0)
    start = time.perf_counter()
    result = train(data, None, settings=settings, class_embeddings=random_embeddings(4),
                   device="cpu")
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in result.history]
    assert result.iteration == 120 and result.complete
    assert np.mean(losses[-20:]) < 0.4 * np.mean(losses[:5])
    assert result.val_miou is not None and result.val_miou > 0.9, result.history[-1]
    print(f"synthetic: {result.iteration} iterations, {seconds:.1f} s, val mIoU {result.val_miou:.3f}")


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    data = shapes_data(6, size=48)
    emb = random_embeddings(4, 16)
    straight = train(data, tmp_path / "a.safetensors", settings=tiny_settings(),
                     class_embeddings=emb, device="cpu")

    gen = train_iter(data, tmp_path / "b.safetensors", settings=tiny_settings(),
                     class_embeddings=emb, device="cpu")
    for step in gen:
        if step.stage == "train" and step.done == 4:
            gen.close()  # cancel: the checkpoint keeps the last completed iteration
            break
    assert load_checkpoint(tmp_path / "b.safetensors").iteration == 4
    resumed = train(data, tmp_path / "b.safetensors", resume=True, device="cpu")

    assert resumed.iteration == straight.iteration == 8
    a, b = straight.net.state_dict(), resumed.net.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert [h.get("val_miou") for h in resumed.history] == [h.get("val_miou") for h in straight.history]
    saved = load_checkpoint(tmp_path / "b.safetensors")
    assert saved.iteration == 8 and saved.meta["complete"]


def test_resume_refuses_other_data_and_existing_checkpoints(tmp_path):
    data = shapes_data(5, size=40)
    emb = random_embeddings(4, 16)
    path = tmp_path / "s.safetensors"
    train(data, path, settings=tiny_settings(iterations=2), class_embeddings=emb, device="cpu")
    with pytest.raises(InvalidInputError, match="--resume"):
        train(data, path, settings=tiny_settings(iterations=2), class_embeddings=emb, device="cpu")
    other = shapes_data(5, seed=3, size=40)
    other = TrainingData(other.samples[:4], other.classes)
    with pytest.raises(Exception, match="differ"):
        train(other, path, resume=True, iterations=4, device="cpu")
    with pytest.raises(InvalidInputError, match="cannot change"):
        train(data, path, resume=True, lr=0.5, device="cpu")


def test_pseudo_labels_fill_only_unlabelled_pixels():
    labels = torch.tensor([[1, 2, 0, IGNORE]])
    trusted = torch.tensor([[True, False, False, True]])
    valid = torch.tensor([[True, True, False, True]])
    pseudo = torch.tensor([[3, 3, 3, 3]])
    targets = compose_targets(labels, trusted, valid, pseudo)
    # trusted label kept; untrusted -> pseudo; padding ignored; 255 in the mask ignored.
    assert targets.tolist() == [[1, 3, IGNORE, IGNORE]]
    assert compose_targets(labels, trusted, valid, None).tolist() == [[1, IGNORE, IGNORE, IGNORE]]


def test_ignored_pixels_do_not_reach_the_loss():
    mask = np.array([[1, 255], [0, 2]], dtype=np.uint8)
    targets = torch.from_numpy(labels_from_mask(mask, 2)).long()[None]
    assert targets[0, 0, 1] == IGNORE
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = segmentation_loss(logits, targets)
    loss.backward()
    assert torch.all(logits.grad[0, :, 0, 1] == 0)
    assert torch.any(logits.grad[0, :, 0, 0] != 0)
    changed = logits.detach().clone()
    changed[0, :, 0, 1] = torch.tensor([50.0, -50.0, 7.0])
    assert torch.allclose(segmentation_loss(changed, targets), loss.detach())
    everything_ignored = torch.full_like(targets, IGNORE)
    assert float(segmentation_loss(logits, everything_ignored).detach()) == 0.0


def test_augmentation_identity_flip_and_padding():
    data = shapes_data(1, size=32)
    sample = data.samples[0]
    # Scale 1, crop = image, no flip: the crop is the image.
    batch = augment_batch([sample], iteration_rng(0, 0), 32, (1.0, 1.0), flip=False)
    assert torch.allclose(batch.images[0].permute(1, 2, 0), torch.from_numpy(sample.image_float()), atol=1e-6)
    assert torch.equal(batch.labels[0], torch.from_numpy(sample.labels).long())
    assert bool(batch.valid.all())
    # A crop larger than the image: the rest is padding (invalid, image 0).
    big = augment_batch([sample], iteration_rng(0, 0), 48, (1.0, 1.0), flip=False)
    assert bool(big.valid[0, :32, :32].all()) and not bool(big.valid[0, 32:].any())
    assert float(big.images[0, :, 40:, :].abs().sum()) == 0.0
    # Flipped crops are mirror images (find one among a few draws).
    for it in range(20):
        flipped = augment_batch([sample], iteration_rng(0, it), 32, (1.0, 1.0), flip=True)
        if not torch.equal(flipped.labels[0], batch.labels[0]):
            assert torch.equal(flipped.labels[0], batch.labels[0].flip(-1))
            break
    else:
        pytest.fail("no crop was flipped in 20 draws")


def test_teacher_path_with_tiny_clip(tiny_vit, tmp_path):
    """Unlabelled pixels get the MaskCLIP teacher's labels; the checkpoint records the teacher."""
    from napari_maskclip.engine import Segmenter
    from napari_maskclip.student.teacher import Teacher

    data = shapes_data(4, size=48)
    half = np.zeros((48, 48), dtype=bool)
    half[:, :24] = True
    for sample in data.samples:
        sample.trusted = half
    teacher_seg = Segmenter(tiny_vit, templates="single", denoise=False)
    teacher = Teacher(tiny_vit, data.classes, data.background, teacher_seg.settings, text_cache=None)
    crops = torch.rand(2, 3, 40, 40)
    pseudo = teacher.pseudo_labels(crops)
    assert pseudo.shape == (2, 40, 40) and pseudo.dtype == torch.long
    assert int(pseudo.min()) >= 0 and int(pseudo.max()) <= len(COLOURS)
    strict = Teacher(tiny_vit, data.classes, data.background, teacher_seg.settings,
                     confidence_threshold=1.0, text_cache=None)
    assert bool((strict.pseudo_labels(crops) == IGNORE).any())

    calls = []
    original = Teacher.pseudo_labels

    def spy(self, images):
        out = original(self, images)
        calls.append(out)
        return out

    Teacher.pseudo_labels = spy
    try:
        result = train(data, tmp_path / "t.safetensors", teacher=teacher_seg, device="cpu",
                       settings=tiny_settings(iterations=3, self_train_fraction=1.0))
    finally:
        Teacher.pseudo_labels = original
    assert len(calls) == 3  # every teacher-stage step needed pseudo-labels
    saved = load_checkpoint(tmp_path / "t.safetensors")
    assert saved.meta["teacher"]["identity"] == tiny_vit.identity
    assert saved.meta["teacher"]["settings"]["templates"] == "single"
    expected = teacher.class_embeddings()
    assert torch.allclose(saved.class_embeddings, expected)
    assert saved.class_embeddings.shape == (len(COLOURS) + 1, tiny_vit.embed_dim)
    assert result.history[-1]["stage"] == "teacher"


def test_self_training_stage_replaces_the_teacher(tiny_vit):
    from napari_maskclip.engine import Segmenter
    from napari_maskclip.student.teacher import Teacher

    data = shapes_data(4, size=48)
    for sample in data.samples:
        sample.trusted = np.zeros((48, 48), dtype=bool)
    calls = []
    original = Teacher.pseudo_labels
    Teacher.pseudo_labels = lambda self, images: calls.append(1) or original(self, images)
    try:
        result = train(data, None, teacher=Segmenter(tiny_vit, templates="single", denoise=False),
                       device="cpu", settings=tiny_settings(iterations=4, self_train_fraction=0.5))
    finally:
        Teacher.pseudo_labels = original
    assert [h["stage"] for h in result.history] == ["teacher"] * 2 + ["self-training"] * 2
    assert len(calls) == 2


def test_settings_are_validated():
    with pytest.raises(InvalidInputError, match="batch_size"):
        TrainSettings(batch_size=1).validate()
    with pytest.raises(InvalidInputError, match="backbone"):
        TrainSettings(backbone="vgg").validate()
    with pytest.raises(InvalidInputError, match="Unknown training setting"):
        TrainSettings().replace(learning_rate=1)
    with pytest.raises(InvalidInputError, match="class_embeddings"):
        train(shapes_data(3, size=32), None, settings=tiny_settings(iterations=1),
              class_embeddings=random_embeddings(2), device="cpu")


@pytest.mark.parametrize("key_smoothing", [False, True], ids=["no-ks", "ks"])
@pytest.mark.parametrize("denoise", [False, True], ids=["no-pd", "pd"])
def test_teacher_labels_are_maskclip_labels_of_the_crop(tiny_vit, denoise, key_smoothing):
    """The online teacher gives the engine's MaskCLIP labels for each crop (one shared read-out),
    on every combination of settings: PD, KS, synonyms, background names, temperature,
    background threshold and the teacher's minimum confidence."""
    import itertools

    from napari_maskclip.engine import Segmenter
    from napari_maskclip.student.teacher import Teacher

    rng = np.random.default_rng(7)
    crops = [(rng.random((40, 44, 3)) * 255).astype(np.uint8) for _ in range(3)]
    batch = torch.stack([torch.from_numpy(c.astype(np.float32) / 255.0).permute(2, 0, 1) for c in crops])
    class_lists = {"synonyms": ["red", "green; lime", "blue"], "plain": ["red", "green", "blue"]}
    combos = itertools.product(class_lists, ["background; floor", None], [100.0, 20.0],
                               [None, 0.5], [None, 0.6])
    ignored = removed = 0
    for list_name, background, scale, min_conf, bg_thr in combos:
        settings = dict(templates="single", denoise=denoise, denoise_threshold=0.6,
                        key_smoothing=key_smoothing, ks_threshold=0.9, logit_scale=scale,
                        background_threshold=bg_thr)
        seg = Segmenter(tiny_vit, text_cache=None, **settings)
        classes = class_lists[list_name]
        data = TrainingData.from_arrays([np.zeros((4, 4, 3), np.uint8)], [np.zeros((4, 4), np.uint8)],
                                        classes, background=background)
        teacher = Teacher(tiny_vit, data.classes, data.background, seg.settings,
                          confidence_threshold=min_conf, text_cache=None)
        bg_names = background or "background"  # the teacher's default background class
        whole = teacher.pseudo_labels(batch).numpy()
        for i, crop in enumerate(crops):
            result = seg(crop, classes, background=bg_names)
            expected = result.labels.astype(np.int64)
            removed += len(result.removed_classes)
            if min_conf is not None:
                # The winning probability over every class (background ones too): read the same
                # classes with the background names as ordinary classes.
                every = seg(crop, classes + bg_names.split(", "), background_threshold=None)
                low = every.probabilities.max(axis=0) < min_conf
                expected[low] = IGNORE
                ignored += int(low.sum())
            label = f"{list_name} bg={background} T={scale} conf={min_conf} bthr={bg_thr} crop {i}"
            # A crop read alone is read exactly as the engine reads the image.
            alone = teacher.pseudo_labels(batch[i:i + 1])[0].numpy()
            assert np.array_equal(alone, expected), label
            # In a batch, the image encoder may round differently (other matmul blocking).
            assert np.mean(whole[i] == expected) > 0.999, label
    assert ignored > 0  # the minimum confidence was exercised
    if denoise:
        assert removed > 0  # so was prompt denoising


@pytest.mark.parametrize("package", ["napari_maskclip.student", "napari_maskclip.engine"])
def test_exports_are_never_shadowed_by_submodules(package):
    """Importing a submodule sets it as an attribute of the package: one named like a lazy
    export (``train``) would turn ``from napari_maskclip.student import train`` into a module."""
    import importlib
    import pkgutil
    import types

    lazy = importlib.import_module(package)
    for info in pkgutil.iter_modules(lazy.__path__):
        importlib.import_module(f"{package}.{info.name}")
    for name in lazy.__all__:
        assert not isinstance(getattr(lazy, name), types.ModuleType), name
