"""``segment --pamr/--regions``: the refinements reach the engine and the written provenance."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np

from napari_maskclip.cli import main
from napari_maskclip.engine import Segmenter, load_clip
from napari_maskclip.image_files import read_label_image


def _image(tmp_path, name="a.png", seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)
    path = tmp_path / name
    iio.imwrite(path, image)
    return path, image


def _args(files):
    config, ckpt = files
    return ["--model", str(config), "--pretrained", str(ckpt), "--templates", "single",
            "--no-denoise", "--quiet", "--classes", "red, green, blue"]


def test_pamr_and_slic_options_give_the_engine_result(tmp_path, tiny_vit_files):
    path, image = _image(tmp_path)
    out = tmp_path / "out"
    code = main(["segment", str(path), "--out", str(out), *_args(tiny_vit_files), "--pamr",
                 "--pamr-iterations", "4", "--regions", "slic", "--slic-segments", "12",
                 "--slic-compactness", "20"])
    assert code == 0
    settings = json.loads((out / "a_classes.json").read_text())["settings"]
    assert settings["pamr"] is True and settings["pamr_iterations"] == 4
    assert settings["regions"] == "slic" and settings["slic_segments"] == 12
    assert settings["slic_compactness"] == 20.0
    config, ckpt = tiny_vit_files
    seg = Segmenter(load_clip(str(config), str(ckpt), device="cpu"), text_cache=None,
                    templates="single", denoise=False, pamr=True, pamr_iterations=4,
                    regions="slic", slic_segments=12, slic_compactness=20.0)
    expected = seg(image, "red, green, blue").labels
    assert np.array_equal(read_label_image(out / "a_labels.png"), expected)


def test_regions_from_a_label_file_per_stem(tmp_path, tiny_vit_files):
    path, image = _image(tmp_path, "b.png", seed=1)
    regions = np.zeros(image.shape[:2], np.uint8)
    regions[:, :28] = 1
    regions[:, 28:] = 2
    iio.imwrite(tmp_path / "b_regions.png", regions)  # a grayscale PNG of region ids
    out = tmp_path / "out"
    code = main(["segment", str(path), "--out", str(out), *_args(tiny_vit_files),
                 "--regions", str(tmp_path / "{stem}_regions.png")])
    assert code == 0
    labels = read_label_image(out / "b_labels.png")
    assert len(np.unique(labels[:, :28])) == 1 and len(np.unique(labels[:, 28:])) == 1
    settings = json.loads((out / "b_classes.json").read_text())["settings"]
    assert settings["regions"] == "labels"


def test_missing_region_file_is_one_line_before_any_work(tmp_path, tiny_vit_files, capsys):
    path, _ = _image(tmp_path)
    code = main(["segment", str(path), "--out", str(tmp_path / "o"), *_args(tiny_vit_files),
                 "--regions", str(tmp_path / "nothing.png")])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--regions" in err[0]
    assert not (tmp_path / "o").exists()


def test_attention_regions_option_gives_the_engine_result(tmp_path, tiny_vit_files, capsys):
    path, image = _image(tmp_path)
    out = tmp_path / "out"
    code = main(["segment", str(path), "--out", str(out), *_args(tiny_vit_files), "--mode",
                 "naclip", "--attention-regions", "felzenszwalb", "--felzenszwalb-scale", "50"])
    assert code == 0
    settings = json.loads((out / "a_classes.json").read_text())["settings"]
    assert settings["attention_regions"] == "felzenszwalb"
    config, ckpt = tiny_vit_files
    seg = Segmenter(load_clip(str(config), str(ckpt), device="cpu"), text_cache=None,
                    templates="single", denoise=False, mode="naclip",
                    attention_regions="felzenszwalb", felzenszwalb_scale=50.0)
    assert np.array_equal(read_label_image(out / "a_labels.png"), seg(image, "red, green, blue").labels)
    code = main(["segment", str(path), "--out", str(tmp_path / "o2"), *_args(tiny_vit_files),
                 "--attention-regions", "slic"])  # mode maskclip: refused in one line
    assert code != 0
    assert "use mode sclip, clearclip or naclip" in capsys.readouterr().err


def test_tlp_vote_and_readout_options_reach_the_engine(tmp_path, tiny_vit_files):
    path, image = _image(tmp_path, "c.png", seed=2)
    out = tmp_path / "out"
    code = main(["segment", str(path), "--out", str(out), *_args(tiny_vit_files), "--precision",
                 "fp32", "--mode", "resclip", "--resclip-base", "clearclip", "--tlp",
                 "--tlp-grid", "10", "--regions", "slic", "--slic-segments", "6",
                 "--region-vote", "majority", "--refine-guide", "resized"])
    assert code == 0
    settings = json.loads((out / "c_classes.json").read_text())["settings"]
    assert settings["mode"] == "resclip" and settings["resclip_base"] == "clearclip"
    assert settings["tlp"] is True and settings["tlp_grid"] == 10 and settings["tlp_iterations"] == 25
    assert settings["region_vote"] == "majority" and settings["refine_guide"] == "resized"
    assert settings["resclip_rcs_weights"] == [2.0, 0.4]
    config, ckpt = tiny_vit_files
    seg = Segmenter(load_clip(str(config), str(ckpt), device="cpu", precision="fp32"),
                    text_cache=None, templates="single", denoise=False, mode="resclip",
                    resclip_base="clearclip", tlp=True, tlp_grid=10, regions="slic",
                    slic_segments=6, region_vote="majority", refine_guide="resized")
    expected = seg(image, "red, green, blue").labels
    assert np.array_equal(read_label_image(out / "c_labels.png"), expected)
    # A preset fills the read-out's settings; an explicit option still wins.
    out2 = tmp_path / "out2"
    assert main(["segment", str(path), "--out", str(out2), *_args(tiny_vit_files), "--precision",
                 "fp32", "--preset", "rfclip", "--rfclip-global", "window", "--short-side", "56",
                 "--window", "32", "--stride", "16"]) == 0
    settings = json.loads((out2 / "c_classes.json").read_text())["settings"]
    assert settings["mode"] == "rfclip" and settings["rfclip_global"] == "window"
    assert settings["rfclip_global_weight"] == 0.25 and settings["refine_guide"] == "resized"
