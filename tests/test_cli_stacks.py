"""z-stacks and time series through the command line: ``segment``/``predict`` slice by slice
into one labels TIFF and one C x leading x H x W confidence TIFF, ``export`` one sample per
slice, ``evaluate`` per slice; bounded memory; bad stacks end in one line."""

from __future__ import annotations

import json
import tracemalloc
import warnings

import numpy as np
import pytest
import imageio.v3 as iio
import tifffile

from napari_maskclip.cli import main
from napari_maskclip.evaluate import evaluate_arrays
from napari_maskclip.export.reader import read_dataset
from napari_maskclip.image_files import read_label_image

CLASSES = "cat, dog; puppy, bird"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(files) -> list[str]:
    config, ckpt = files
    return ["--model", str(config), "--pretrained", str(ckpt), "--templates", "single",
            "--device", "cpu", "--precision", "fp32"]


def _stack(shape, seed=0) -> np.ndarray:
    """Smooth random images (so the model sees structure), one per leading index, uint8."""
    rng = np.random.default_rng(seed)
    data = rng.random(shape)
    for axis in (-1, -2):  # a little blur along the plane
        data = (data + np.roll(data, 1, axis) + np.roll(data, -1, axis)) / 3
    return (data * 255).astype(np.uint8)


def _segment(images, out, files, *extra) -> int:
    return main(["segment", *map(str, images), "--classes", CLASSES, "--out", str(out),
                 "--quiet", *_model(files), *extra])


def _single_slices(tmp_path, data, lead_names, files, *extra):
    """Each slice saved as its own 2D file and segmented in one plain run: {index: (labels,
    confidence)}."""
    folder = tmp_path / "slices"
    folder.mkdir(exist_ok=True)
    paths = {}
    for index in np.ndindex(*data.shape[: len(lead_names)]):
        name = "s" + "_".join(map(str, index))
        paths[index] = folder / f"{name}.tif"
        tifffile.imwrite(paths[index], data[index], photometric="minisblack")
    out = tmp_path / "single"
    assert _segment(paths.values(), out, files, *extra) == 0
    return {index: (read_label_image(out / f"{p.stem}_labels.png"),
                    tifffile.imread(out / f"{p.stem}_confidence.tif"))
            for index, p in paths.items()}


def _check_against_single(out, stem, single, lead):
    labels = tifffile.imread(out / f"{stem}_labels.tif")
    confidence = tifffile.imread(out / f"{stem}_confidence.tif")
    h, w = labels.shape[-2:]
    assert labels.shape == lead + (h, w) and labels.dtype == np.uint8
    assert confidence.shape == (3,) + lead + (h, w) and confidence.dtype == np.float32
    assert len(np.unique(labels)) > 1  # something to compare
    for index, (want_labels, want_conf) in single.items():
        np.testing.assert_array_equal(labels[index], want_labels)
        np.testing.assert_allclose(confidence[(slice(None),) + index], want_conf, atol=1e-6)
    return labels, confidence


def _truth_from(labels: np.ndarray, seed=1) -> np.ndarray:
    """Ground truth that differs from the prediction in some pixels (so scores are not 1)."""
    truth = labels.copy()
    rng = np.random.default_rng(seed)
    flip = rng.random(truth.shape) < 0.2
    truth[flip] = rng.integers(0, 4, int(flip.sum()))
    return truth


def _evaluate(capsys, pred, gt) -> dict:
    capsys.readouterr()
    assert main(["evaluate", str(pred), str(gt)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _expected_scores(labels, truth, lead) -> dict:
    pairs = [(labels[i], truth[i]) for i in np.ndindex(*lead)]
    scores = evaluate_arrays(pairs, 4)
    return {"miou": scores.miou, "pixel_accuracy": scores.pixel_accuracy}


@pytest.mark.parametrize("case", ["z", "tz"])
def test_stack_segment_export_evaluate(tmp_path, tiny_vit_files, capsys, case):
    """A 3-slice TIFF and a 2-timepoint x 2-slice ImageJ TIFF: labels of each slice equal the
    single-image segment of that slice, confidence too; export gives one sample per slice,
    named as the widget names them, confidence per slice (float16); evaluate scores each slice."""
    if case == "z":
        data, lead, names = _stack((3, 40, 48)), (3,), ["vol_z0000", "vol_z0001", "vol_z0002"]
        stack = tmp_path / "vol.tif"
        tifffile.imwrite(stack, data, photometric="minisblack")  # 3 pages, no axis names
    else:
        data, lead = _stack((2, 2, 40, 48), seed=3), (2, 2)
        names = [f"vol_t{t:04d}_z{z:04d}" for t in range(2) for z in range(2)]
        stack = tmp_path / "vol.tif"
        tifffile.imwrite(stack, data, imagej=True, metadata={"axes": "TZYX"})
    single = _single_slices(tmp_path, data, lead, tiny_vit_files)
    out = tmp_path / "out"
    assert _segment([stack], out, tiny_vit_files) == 0
    printed = capsys.readouterr().out
    written = sorted(p.name for p in out.iterdir())
    assert written == ["vol_classes.json", "vol_confidence.tif", "vol_labels.tif"]
    assert all(name in printed for name in written), printed  # the summary lists every file
    labels, confidence = _check_against_single(out, "vol", single, lead)
    table = json.loads((out / "vol_classes.json").read_text())
    assert table["stack"]["shape"] == list(lead)

    dataset = tmp_path / "ds"
    assert main(["export", "--from-segment", str(out), "--out", str(dataset), "--quiet"]) == 0
    ds = read_dataset(dataset)
    assert sorted(ds.names) == sorted(names)
    for name, index in zip(names, np.ndindex(*lead)):
        sample = ds[name]
        np.testing.assert_array_equal(sample.read_mask(), labels[index])
        saved = tifffile.imread(dataset / "confidence" / f"{name}.tif")
        assert saved.dtype == np.float16
        np.testing.assert_allclose(saved.astype(np.float32), confidence[(slice(None),) + index],
                                   atol=1e-3)
        np.testing.assert_array_equal(iio.imread(dataset / "images" / f"{name}.png"), data[index])

    # evaluate: the stack's result folder and its exported dataset against a truth stack TIFF
    truth = _truth_from(labels)
    truth_dir = tmp_path / "truth"
    truth_dir.mkdir()
    tifffile.imwrite(truth_dir / "vol.tif", truth, photometric="minisblack")
    want = _expected_scores(labels, truth, lead)
    for pred in (out, dataset):
        got = _evaluate(capsys, pred, truth_dir)
        assert got["n_images"] == len(names)
        assert got["miou"] == pytest.approx(want["miou"])
        assert got["pixel_accuracy"] == pytest.approx(want["pixel_accuracy"])
        assert got["pixel_accuracy"] < 1
    # ... and a truth dataset exported from the truth stack (export --images/--labels)
    truth_tif = tmp_path / "vol_truth.tif"
    tifffile.imwrite(truth_tif, truth, photometric="minisblack")
    truth_ds = tmp_path / "truth_ds"
    assert main(["export", "--images", str(stack), "--labels", str(truth_tif), "--classes",
                 CLASSES, "--out", str(truth_ds), "--quiet"]) == 0
    got = _evaluate(capsys, out, truth_ds)
    assert got["n_images"] == len(names) and got["miou"] == pytest.approx(want["miou"])


def test_channel_axis_stack_from_option_and_from_metadata(tmp_path, tiny_vit_files, capsys):
    """A Z x C x H x W TIFF: --channel-axis 1 --channels 1 segments each slice as its 2D
    C x H x W image with --channel-axis 0 --channels 1; ImageJ metadata (ZCYX) gives the channel
    axis by itself; export gives one sample per z, the image's channels last."""
    data = _stack((3, 2, 32, 40), seed=5)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, data, photometric="minisblack")
    tagged = tmp_path / "tagged.tif"
    tifffile.imwrite(tagged, data, imagej=True, metadata={"axes": "ZCYX"})
    single = _single_slices(tmp_path, data, (3,), tiny_vit_files,
                            "--channel-axis", "0", "--channels", "1")
    out = tmp_path / "out"
    assert _segment([plain], out, tiny_vit_files, "--channel-axis", "1", "--channels", "1") == 0
    labels, _ = _check_against_single(out, "plain", single, (3,))
    out2 = tmp_path / "out2"
    assert _segment([tagged], out2, tiny_vit_files, "--channels", "1") == 0
    np.testing.assert_array_equal(tifffile.imread(out2 / "tagged_labels.tif"), labels)
    assert json.loads((out2 / "tagged_classes.json").read_text())["stack"]["channel_axis"] == 1
    dataset = tmp_path / "ds"
    assert main(["export", "--from-segment", str(out), "--out", str(dataset), "--quiet"]) == 0
    for z in range(3):
        image = tifffile.imread(dataset / "images" / f"plain_z{z:04d}.tif")
        np.testing.assert_array_equal(image, np.moveaxis(data[z], 0, -1))
        np.testing.assert_array_equal(read_dataset(dataset)[f"plain_z{z:04d}"].read_mask(),
                                      labels[z])


def test_no_confidence_and_rerun_skip(tmp_path, tiny_vit_files, capsys):
    """--no-confidence writes the labels TIFF and the table only (both listed); the same command
    again skips the finished stack; other settings without --overwrite are refused."""
    stack = tmp_path / "vol.tif"
    tifffile.imwrite(stack, _stack((2, 24, 32), seed=2), photometric="minisblack")
    out = tmp_path / "out"
    assert _segment([stack], out, tiny_vit_files, "--no-confidence") == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["vol_classes.json", "vol_labels.tif"]
    assert "vol_labels.tif" in printed and "vol_classes.json" in printed
    assert tifffile.imread(out / "vol_labels.tif").shape == (2, 24, 32)
    assert _segment([stack], out, tiny_vit_files, "--no-confidence") == 0
    assert "skipped 1 finished image" in capsys.readouterr().out
    _one_line_failure(capsys, _segment([stack], out, tiny_vit_files), "--overwrite")
    assert _segment([stack], out, tiny_vit_files, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["vol_classes.json", "vol_confidence.tif",
                                                     "vol_labels.tif"]


def test_streamed_slices_equal_held_slices(tmp_path, tiny_vit_files, monkeypatch):
    """A slice whose maps exceed the in-memory limit streams its rows into the writer; the
    files are the same as when each slice's maps are held."""
    import napari_maskclip.batch as batch

    stack = tmp_path / "vol.tif"
    tifffile.imwrite(stack, _stack((2, 40, 48), seed=7), photometric="minisblack")
    assert _segment([stack], tmp_path / "held", tiny_vit_files, "--window", "24") == 0
    monkeypatch.setattr(batch, "CONFIDENCE_IN_MEMORY", 1000)
    assert _segment([stack], tmp_path / "streamed", tiny_vit_files, "--window", "24") == 0
    for name in ("vol_labels.tif", "vol_confidence.tif"):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "streamed" / name),
                                      tifffile.imread(tmp_path / "held" / name))


@pytest.mark.slow
def test_memory_holds_one_slice_of_confidence(tmp_path, tiny_vit_files):
    """120 slices x 4 classes: the whole confidence is 120x one slice's. The writers are never
    handed more than one slice, and the Python heap's peak over the run (model loaded before)
    stays far below the whole confidence."""
    from napari_maskclip.engine import Segmenter, load_clip
    from napari_maskclip.engine.settings import SegmentSettings
    from napari_maskclip.progress import run_to_completion
    from napari_maskclip.stack_batch import run_stack
    from napari_maskclip.stack_files import stack_input

    n, h, w, c = 120, 64, 64, 4
    stack_path = tmp_path / "big.tif"
    tifffile.imwrite(stack_path, _stack((n, h, w), seed=9), photometric="minisblack")
    config, ckpt = tiny_vit_files
    segmenter = Segmenter(load_clip(str(config), str(ckpt), device="cpu", precision="fp32"),
                          settings=SegmentSettings(templates="single"))
    classes = ["cat", "dog", "bird", "fish"]
    run_to_completion(segmenter.run_iter(_stack((h, w)), classes))  # warm up (text embeddings)

    def make_run(image, probabilities, *, stacked=False, plane_channel_axis=None):
        return segmenter.run_iter(image, classes, channel_axis=plane_channel_axis,
                                  probabilities=probabilities)

    warm = tmp_path / "warm.tif"  # a first stack run: every lazy import happens here
    tifffile.imwrite(warm, _stack((2, h, w)), photometric="minisblack")
    run_stack(stack_input(warm, (2, h, w), channel_axis=None, channels=None), tmp_path / "warm",
              make_run, lambda _: None, confidence=True, n_classes=c, in_memory=512 << 20)
    stack = stack_input(stack_path, (n, h, w), channel_axis=None, channels=None)
    writers: list = []
    out = tmp_path / "out"
    tracemalloc.start()
    try:
        run_stack(stack, out, make_run, lambda _: None, confidence=True, n_classes=c,
                  in_memory=512 << 20, writers=writers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_slice = c * h * w * 4
    whole = n * one_slice
    assert max(wr.largest_block for wr in writers) <= one_slice
    print(f"peak {peak} B, one slice {one_slice} B, whole confidence {whole} B")
    assert peak < whole / 5, (peak, whole)
    conf = tifffile.imread(out / "big_confidence.tif")
    assert conf.shape == (c, n, h, w)
    np.testing.assert_allclose(conf.sum(axis=0), 1, atol=1e-4)
    assert sorted(p.name for p in out.iterdir()) == ["big_classes.json", "big_confidence.tif",
                                                     "big_labels.tif"]  # no temp file left


def _one_line_failure(capsys, code, *needles):
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    assert "Traceback" not in err[0]


def test_bad_stacks_end_in_one_line(tmp_path, tiny_vit_files, capsys):
    out = tmp_path / "out"
    four = tmp_path / "four.tif"
    tifffile.imwrite(four, _stack((3, 2, 16, 16)), photometric="minisblack")
    _one_line_failure(capsys, _segment([four], out, tiny_vit_files, "--channel-axis", "3"),
                      "four.tif", "axis of the image plane")
    _one_line_failure(capsys, _segment([four], out, tiny_vit_files, "--channel-axis", "9"),
                      "four.tif", "--channel-axis 9")
    _one_line_failure(capsys, _segment([four], out, tiny_vit_files, "--channel-axis", "1",
                                       "--channels", "5"), "four.tif", "2 channels")
    five = tmp_path / "five.tif"
    tifffile.imwrite(five, np.zeros((2, 2, 2, 16, 16), np.uint8))
    _one_line_failure(capsys, _segment([five], out, tiny_vit_files), "five.tif", "at most two")
    empty = tmp_path / "empty_page.tif"
    with tifffile.TiffWriter(empty) as tif, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tifffile: "writing zero-size array"
        for shape in ((16, 16), (0, 16), (16, 16)):
            tif.write(np.zeros(shape, np.uint8), metadata=None)
    _one_line_failure(capsys, _segment([empty], out, tiny_vit_files), "empty_page.tif",
                      "page 1", "no pixels")
    assert not out.exists() or not any(out.iterdir())  # nothing written, no temp files


def test_a_damaged_slice_fails_alone_and_leaves_no_files(tmp_path, tiny_vit_files, capsys):
    """A stack whose last page is cut off: one line naming it, no outputs or temp files for it;
    the other image of the batch is written."""
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, _stack((2, 24, 24)), photometric="minisblack")
    cut = tmp_path / "cut.tif"
    tifffile.imwrite(cut, _stack((3, 64, 64)), compression="zlib", photometric="minisblack")
    raw = cut.read_bytes()
    with tifffile.TiffFile(cut) as tif:
        last = tif.pages[2]
        offset, size = last.dataoffsets[0], last.databytecounts[0]
    cut.write_bytes(raw[:offset] + b"\0" * size + raw[offset + size:])  # a garbled last page
    out = tmp_path / "out"
    code = _segment([good, cut], out, tiny_vit_files)
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert any("cut.tif" in line for line in err) and not any("Traceback" in x for x in err)
    assert sorted(p.name for p in out.iterdir()) == ["good_classes.json", "good_confidence.tif",
                                                     "good_labels.tif"]


@pytest.mark.slow
def test_predict_with_a_student_on_a_stack(tmp_path, capsys):
    """``predict`` takes the same stacks: each slice's labels equal the student's on that slice."""
    from test_student_train import random_embeddings, shapes_data

    from napari_maskclip.student import TrainSettings, train

    student = tmp_path / "student.safetensors"
    settings = TrainSettings(iterations=4, batch_size=4, crop_size=48, backbone="tiny",
                             backbone_weights="random", lr=0.05, val_fraction=0.2,
                             val_interval=0, save_interval=0)
    train(shapes_data(8, size=48), student, settings=settings,
          class_embeddings=random_embeddings(4), device="cpu")
    data = _stack((2, 2, 40, 48, 3), seed=11)
    stack = tmp_path / "rgb.tif"
    tifffile.imwrite(stack, data, photometric="rgb")  # T x Z x H x W x RGB: axes ...YXS
    slices = tmp_path / "slices"
    slices.mkdir()
    for t, z in np.ndindex(2, 2):
        tifffile.imwrite(slices / f"s{t}_{z}.tif", data[t, z], photometric="rgb")
    base = ["predict", "--student", str(student), "--device", "cpu", "--quiet"]
    assert main(base + [str(stack), "--out", str(tmp_path / "out")]) == 0
    assert main(base + [*map(str, sorted(slices.iterdir())), "--out", str(tmp_path / "single")]) == 0
    capsys.readouterr()
    labels = tifffile.imread(tmp_path / "out" / "rgb_labels.tif")
    confidence = tifffile.imread(tmp_path / "out" / "rgb_confidence.tif")
    assert labels.shape == (2, 2, 40, 48)
    for t, z in np.ndindex(2, 2):
        np.testing.assert_array_equal(
            labels[t, z], read_label_image(tmp_path / "single" / f"s{t}_{z}_labels.png"))
        np.testing.assert_allclose(
            confidence[:, t, z], tifffile.imread(tmp_path / "single" / f"s{t}_{z}_confidence.tif"),
            atol=1e-6)


@pytest.mark.slow
def test_workers_segment_stacks_like_the_plain_loop(tmp_path, tiny_vit_files, capsys):
    pytest.importorskip("distributed")
    stack = tmp_path / "vol.tif"
    tifffile.imwrite(stack, _stack((3, 32, 32), seed=13), photometric="minisblack")
    assert _segment([stack], tmp_path / "plain", tiny_vit_files) == 0
    assert _segment([stack], tmp_path / "dask", tiny_vit_files, "--workers", "1") == 0
    capsys.readouterr()
    for name in ("vol_labels.tif", "vol_confidence.tif"):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "dask" / name),
                                      tifffile.imread(tmp_path / "plain" / name))
