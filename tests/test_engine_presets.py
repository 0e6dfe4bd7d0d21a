"""Paper presets (engine/presets.py, --preset) and the QuickGELU warning for OpenAI state dicts."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from napari_maskclip.engine.presets import PRESETS, preset_settings
from napari_maskclip.engine.settings import SegmentSettings
from napari_maskclip.engine.templates import resolve_templates
from napari_maskclip.errors import InvalidInputError


def test_every_preset_is_valid_and_recorded():
    for name in PRESETS:
        s = SegmentSettings.from_preset(name)
        s.validate()
        assert s.preset == name and s.to_dict()["preset"] == name
        assert s.mode == PRESETS[name]["mode"]
    naclip = SegmentSettings.from_preset("naclip", logit_scale=70.0)
    assert naclip.pamr and naclip.pamr_dilations == (8, 16) and naclip.logit_scale == 70.0
    assert (naclip.window, naclip.stride, naclip.short_side) == (224, 112, 336)
    with pytest.raises(InvalidInputError, match="preset"):
        preset_settings("segformer")


def test_2025_presets_carry_their_configs_values_and_the_reference_guide():
    rf = SegmentSettings.from_preset("rfclip")
    assert (rf.mode, rf.rfclip_global, rf.logit_scale) == ("rfclip", "image", 40.0)
    assert (rf.rfclip_global_weight, rf.rfclip_text_weight, rf.rfclip_cluster_threshold) == (0.25, 0.04, 0.09)
    res = SegmentSettings.from_preset("resclip")
    assert (res.mode, res.resclip_base, res.resclip_temp_threshold) == ("resclip", "naclip", 0.25)
    assert res.resclip_rcs_weights == (2.0, 0.4) and res.resclip_sfr_weights == (1.8, 0.7)
    assert not rf.pamr and not res.pamr
    for name in ("sclip", "clearclip", "naclip", "scclip", "rfclip", "resclip"):
        assert SegmentSettings.from_preset(name).refine_guide == "resized"  # PAMR's guide
    assert SegmentSettings.from_preset("maskclip").refine_guide == "original"
    assert SegmentSettings().refine_guide == "original"  # this project's default


def test_openai80_is_clips_eighty_imagenet_templates():
    t80 = resolve_templates("openai80")
    assert len(t80) == 80 and t80[0] == "a bad photo of a {}." and t80[-1] == "a tattoo of the {}."
    assert t80 == resolve_templates("maskclip85")[:80]


def test_cli_preset_fills_defaults_and_explicit_options_win(tmp_path, tiny_vit_files):
    import imageio.v3 as iio

    from napari_maskclip.cli import main

    config, ckpt = tiny_vit_files
    image = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "a.png", image)
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "a.png"), "--classes", "red, blue", "--out", str(out),
                 "--model", str(config), "--pretrained", str(ckpt), "--quiet",
                 "--preset", "naclip", "--window", "32", "--stride", "16", "--short-side", "40"])
    assert code == 0
    settings = json.loads((out / "a_classes.json").read_text())["settings"]
    assert settings["preset"] == "naclip" and settings["mode"] == "naclip"
    assert settings["templates"] == "openai80" and settings["logit_scale"] == 40.0
    assert settings["pamr"] is True and settings["denoise"] is False
    assert (settings["window"], settings["stride"], settings["short_side"]) == (32, 16, 40)
    assert settings["pos_embed_resize"] == "scale_factor"  # the preset's conventions
    assert settings["partial_patches"] == "drop" and settings["resize_antialias"] is False
    out2 = tmp_path / "out2"
    code = main(["segment", str(tmp_path / "a.png"), "--classes", "red, blue", "--out", str(out2),
                 "--model", str(config), "--pretrained", str(ckpt), "--quiet",
                 "--preset", "naclip", "--window", "32", "--stride", "16", "--short-side", "40",
                 "--pos-embed-resize", "grid", "--resize-antialias"])
    assert code == 0
    settings = json.loads((out2 / "a_classes.json").read_text())["settings"]
    assert settings["pos_embed_resize"] == "grid"  # given explicitly: wins over the preset
    assert settings["resize_antialias"] is True  # also given explicitly (the default value)
    assert settings["partial_patches"] == "drop"  # not given: the preset's


def _openai_style_file(tmp_path, model):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["input_resolution"] = torch.tensor(224)
    state["context_length"] = torch.tensor(77)
    state["vocab_size"] = torch.tensor(49408)
    path = tmp_path / "openai.safetensors"
    save_file(state, str(path))
    return path


def test_openai_state_dict_under_a_gelu_name_warns(tmp_path, tiny_vit_files):
    from engine_helpers import build_clip, tiny_config

    from napari_maskclip.engine import load_clip

    config, _ = tiny_vit_files
    path = _openai_style_file(tmp_path, build_clip(tiny_config("tiny_vit")))
    with pytest.warns(UserWarning, match="quickgelu"):
        load_clip(str(config), str(path), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_clip(str(config), str(path), device="cpu", quick_gelu=True)
    assert loaded is not None
