"""The offline demo: the shipped toy CLIP, the shapes sample and ``napari-maskclip demo``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_maskclip.demo import demo_model_files
from napari_maskclip.synthetic import BACKGROUND_NAME, CLASS_NAMES


def test_demo_model_ships_small_fp16_weights_and_its_vocabulary():
    from safetensors import safe_open

    files = demo_model_files()
    assert files.weights.stat().st_size <= 20 * 1024 * 1024
    with safe_open(str(files.weights), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {"F16"}
    vocab = json.loads(files.vocab.read_text())
    assert vocab["class_names"] == list(CLASS_NAMES)
    assert vocab["background_names"] and vocab["templates"]
    # The command that reproduces the weights is recorded with them.
    assert vocab["training"]["command"].startswith("python tools/train_toy_clip.py")
    config = json.loads(files.config.read_text())
    assert config["vision_cfg"]["image_size"] == vocab["image_size"]


def test_shapes_sample_suggests_the_demo_model_and_its_classes():
    from napari_maskclip.plugin.sample_data import shapes
    from napari_maskclip.classes import parse_classes

    (image, kwargs), = shapes()
    assert image.dtype == np.uint8 and image.shape[-1] == 3 and min(image.shape[:2]) > 64
    meta = kwargs["metadata"]["napari_maskclip"]
    assert meta["suggested_model"] == "demo"
    assert [c.text for c in parse_classes(meta["suggested_classes"])] == list(CLASS_NAMES)
    assert meta["suggested_background"] == BACKGROUND_NAME


def test_demo_scene_keeps_the_training_pixel_scale():
    """A bigger demo scene holds more shapes, not bigger ones than the model was trained on."""
    from napari_maskclip.demo.scene import demo_scene

    vocab = json.loads(demo_model_files().vocab.read_text())
    scene = demo_scene()
    largest = max(o.radius for o in scene.objects)
    assert largest <= vocab["data"]["radius_frac"][1] * vocab["image_size"] + 1e-6
    assert len(scene.objects) >= 5


def test_headless_demo_writes_outputs_and_segments_the_scene(tmp_path, capsys):
    import imageio.v3 as iio

    from napari_maskclip.cli import main
    from napari_maskclip.demo.scene import demo_scene
    from napari_maskclip.image_files import read_label_image

    out = tmp_path / "demo"
    assert main(["demo", "--headless", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    names = sorted(p.name for p in out.iterdir())
    for name in ("demo_scene_image.png", "demo_scene_overlay.png", "truth",
                 "demo_scene_scores.json", "demo_scene_labels.png"):
        assert name in names, names
    assert np.array_equal(read_label_image(out / "truth" / "demo_scene.png"), demo_scene().mask)
    image = iio.imread(out / "demo_scene_image.png")
    assert np.array_equal(image, demo_scene().image)
    overlay = iio.imread(out / "demo_scene_overlay.png")
    # The label values (a palette PNG: imageio alone would return its colours, and a class colour
    # with a zero channel would then count as unpainted there).
    labels = read_label_image(out / "demo_scene_labels.png")
    assert overlay.shape == image.shape
    painted = labels > 0
    assert painted.any() and (~painted).any()
    assert np.array_equal(overlay[~painted], image[~painted])
    assert not np.array_equal(overlay[painted], image[painted])
    scores = json.loads((out / "demo_scene_scores.json").read_text())
    # The demo model really segments: well above chance (1/13) on the scene's exact mask.
    assert scores["pixel_accuracy"] > 0.5 and scores["miou"] > 0.15
    printed = capsys.readouterr().out
    assert "mIoU" in printed and str(out / "truth" / "demo_scene.png") in printed
    # `evaluate` takes the demo's output as it is and agrees with the demo's own scores.
    assert main(["evaluate", str(out), str(out / "truth")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["n_images"] == 1
    assert evaluated["miou"] == pytest.approx(scores["miou"])
    assert evaluated["pixel_accuracy"] == pytest.approx(scores["pixel_accuracy"])


@pytest.mark.parametrize("argv", [["demo", "--headless", "--device", "nonsense"]])
def test_headless_demo_bad_device_is_one_line_error(tmp_path, capsys, argv):
    from napari_maskclip.cli import main

    assert main([*argv, "--out", str(tmp_path / "o"), "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device" in err[0].lower()
