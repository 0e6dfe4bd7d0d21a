"""Precision as a setting (auto, fp32, bf16, fp16) on the CPU: what ``auto`` picks, that caches
never mix precisions, and how far half-precision features may drift from fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_maskclip.engine import Segmenter, SegmentSettings, TextEmbeddingCache, load_clip
from napari_maskclip.engine import precision as P
from napari_maskclip.engine.dense import dense_features
from napari_maskclip.engine.modes import MODES
from napari_maskclip.engine.settings import ENCODE_FIELDS
from napari_maskclip.engine.text import TextEncoder
from napari_maskclip.errors import InvalidInputError

from engine_helpers import blocky_rgb

CPU = torch.device("cpu")

#: Smallest per-position cosine between a half-precision and the fp32 dense feature (or key) of
#: the tiny test models. Measured: bf16 >= 0.9999, fp16 >= 0.999999 on these models (and bf16
#: 0.9999 on ViT-B-16); the bounds leave a margin for other CPUs' kernels.
MIN_COSINE = {"bf16": 0.999, "fp16": 0.9999}


@pytest.fixture
def detected_cpu(monkeypatch):
    """For tests of the detection itself: without conftest's pin of auto to fp32."""
    monkeypatch.delenv(P.CPU_BF16_ENV, raising=False)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _simulate_cpu(monkeypatch, flags):
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset(flags))


# ---- what auto picks --------------------------------------------------------------------
def test_auto_follows_the_cpus_bf16_capability():
    assert P.resolve_precision(CPU, "auto", cpu_bf16=False) == "fp32"
    assert P.resolve_precision(CPU, "auto", cpu_bf16=True) == "bf16"
    assert P.resolve_precision(torch.device("cuda"), "auto") == "fp16"  # GPUs as before
    assert P.resolve_precision(CPU, "fp32", cpu_bf16=True) == "fp32"
    assert P.resolve_precision(CPU, "BF16", cpu_bf16=False) == "bf16"  # explicit: as asked
    # CPU flags: AVX512F alone is not bf16; AVX512-BF16, AMX and Arm's BF16 are.
    assert not P.cpu_has_native_bf16({"avx512f", "avx512bw", "avx512_vnni", "avx2"})
    assert P.cpu_has_native_bf16({"avx512f", "avx512_bf16"})
    assert P.cpu_has_native_bf16({"amx_bf16", "amx_tile"})
    assert P.cpu_has_native_bf16({"asimd", "bf16"})
    with pytest.raises(InvalidInputError, match="auto, fp32, bf16, fp16"):
        P.resolve_precision(CPU, "fp64")


@pytest.mark.parametrize("value, native", [("0", False), ("no", False), ("1", True), ("TRUE", True)])
def test_the_environment_overrides_the_detection(monkeypatch, value, native):
    monkeypatch.setenv(P.CPU_BF16_ENV, value)
    assert P.cpu_has_native_bf16() is native
    assert P.resolve_precision(CPU, "auto") == ("bf16" if native else "fp32")
    # A simulated CPU (explicit flags) and an explicit precision are not overridden.
    assert P.cpu_has_native_bf16({"avx512_bf16"}) is True
    assert P.resolve_precision(CPU, "bf16") == "bf16"


def test_an_unknown_override_value_leaves_the_detection(monkeypatch, detected_cpu):
    detected = P.cpu_has_native_bf16()
    monkeypatch.setenv(P.CPU_BF16_ENV, "maybe")
    assert P.cpu_has_native_bf16() is detected


def test_this_cpus_detection_agrees_with_proc_cpuinfo(detected_cpu):
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set()
    for line in path.read_text().splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags.update(line.split(":", 1)[1].split())
    native = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    assert P.cpu_has_native_bf16() == native
    assert P.resolve_precision(CPU, "auto") == ("bf16" if native else "fp32")


@pytest.mark.parametrize("flags, expected", [({"avx512f", "avx2"}, "fp32"),
                                             ({"avx512f", "avx512_bf16"}, "bf16")])
def test_loaded_models_and_results_follow_the_simulated_cpu(monkeypatch, detected_cpu,
                                                            tiny_vit_files, flags, expected):
    _simulate_cpu(monkeypatch, flags)
    config, ckpt = tiny_vit_files
    loaded = load_clip(str(config), str(ckpt), device="cpu")
    assert loaded.precision == expected
    assert loaded.dtype == torch.float32  # CPU weights stay fp32; half runs use a cast copy
    seg = Segmenter(loaded, templates="single", denoise=False, text_cache=None)
    result = seg(blocky_rgb(40, 48), "cat, dog")
    assert result.settings["precision"] == expected


def test_fp16_on_the_cpu_runs_or_says_what_to_use(monkeypatch):
    assert P.resolve_precision(CPU, "fp16") == "fp16"  # this PyTorch runs fp16 on the CPU
    monkeypatch.setattr(P, "_cpu_fp16_works", lambda: False)
    with pytest.raises(InvalidInputError, match="bf16 or fp32"):
        P.resolve_precision(CPU, "fp16")


def test_half_weights_refuse_another_precision():
    gpu = torch.device("cuda")
    assert P.run_precision("auto", device=gpu, weights=torch.float16, default="fp16") == "fp16"
    assert P.run_precision("bf16", device=gpu, weights=torch.float32, default="fp32") == "bf16"
    with pytest.raises(InvalidInputError, match="precision 'fp32'"):
        P.run_precision("fp32", device=gpu, weights=torch.float16, default="fp16")


def test_precision_is_an_encode_setting():
    assert "precision" in ENCODE_FIELDS
    assert SegmentSettings().precision == "auto"
    assert SegmentSettings(precision="bf16").validate().encode_key() != SegmentSettings().encode_key()
    with pytest.raises(InvalidInputError, match="precision"):
        SegmentSettings(precision="fp64").validate()


# ---- caches never mix precisions ----------------------------------------------------------
def test_feature_cache_keeps_precisions_apart(tiny_vit):
    seg = Segmenter(tiny_vit, templates="single", denoise=False, text_cache=None)
    image = blocky_rgb(48, 64, seed=3)
    f32 = seg.encode(image, precision="fp32")
    b16 = seg.encode(image, precision="bf16")
    assert seg.image_encoder_calls == 2 and len(seg.features_cache) == 2
    assert f32.key != b16.key
    assert f32.encode_settings["precision"] == "fp32" and b16.encode_settings["precision"] == "bf16"
    assert not torch.equal(f32.windows[0].features, b16.windows[0].features)
    # Asking again (or auto, which is fp32 on this model) is served from the cache.
    assert seg.encode(image, precision="bf16") is b16
    assert seg.encode(image) is f32
    assert seg.image_encoder_calls == 2
    a = seg.segment(f32, "cat, dog")
    b = seg.segment(b16, "cat, dog")
    assert a.settings["precision"] == "fp32" and b.settings["precision"] == "bf16"
    assert a.probabilities.dtype == b.probabilities.dtype == np.float32
    assert not np.array_equal(a.probabilities, b.probabilities)


def test_text_cache_keeps_precisions_apart(tiny_vit, tmp_path):
    names, templates = ["cat", "dog"], ["a photo of a {}.", "a {}."]
    encoder = TextEncoder(tiny_vit, cache=TextEmbeddingCache(tmp_path))
    f32 = encoder.embed_texts(names, templates, precision="fp32")
    b16 = encoder.embed_texts(names, templates, precision="bf16")
    assert encoder.forward_calls == 2  # bf16 was not served the fp32 entry
    assert f32.dtype == b16.dtype == torch.float32
    assert not torch.equal(f32, b16)
    assert F.cosine_similarity(f32, b16).min() > MIN_COSINE["bf16"]
    # A fresh encoder on the same disk cache gets each precision's own vectors, without encoding.
    again = TextEncoder(tiny_vit, cache=TextEmbeddingCache(tmp_path))
    assert torch.equal(again.embed_texts(names, templates, precision="bf16"), b16)
    assert torch.equal(again.embed_texts(names, templates, precision="fp32"), f32)
    assert again.forward_calls == 0


# ---- tolerances ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_every_mode_stays_close_to_fp32(tiny_vit, tiny_resnet, name):
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    for loaded, modes in ((tiny_vit, MODES), (tiny_resnet, ("maskclip",))):
        half = P.model_in(loaded, name)
        assert next(half.parameters()).dtype == P.precision_dtype(name)
        assert next(loaded.model.parameters()).dtype == torch.float32  # the original is kept
        for mode in modes:
            ref = dense_features(loaded.visual, x, mode, with_keys=True)
            out = dense_features(half.visual, x.to(P.precision_dtype(name)), mode, with_keys=True)
            assert out.features.dtype == torch.float32  # the read-out after the encoder is fp32
            cos = F.cosine_similarity(ref.features, out.features, dim=1).min().item()
            key_cos = F.cosine_similarity(ref.keys, out.keys, dim=-1).min().item()
            assert cos >= MIN_COSINE[name], (loaded.kind, mode, cos)
            assert key_cos >= MIN_COSINE[name], (loaded.kind, mode, key_cos)
            assert cos < 1.0 or name == "fp16"  # bf16 really ran (fp16 may round to 1.0)


def test_bf16_labels_agree_with_fp32_on_the_demo_model():
    """The trained demo model on a synthetic scene read with sliding windows (random weights
    leave classes near-tied, so their labels flip at any rounding)."""
    from napari_maskclip.demo import demo_model_files
    from napari_maskclip.synthetic import make_batch

    vocab = json.loads(demo_model_files(check=False).vocab.read_text())
    seg = Segmenter("demo", None, device="cpu", text_cache=None,
                    templates=tuple(vocab.get("templates", ["a photo of a {}."])))
    agree = []
    for scene in make_batch([5, 1], 2, (128, 128), (2, 4)):
        a = seg(scene.image, vocab["class_names"], background="background", window=64, stride=32)
        b = seg(scene.image, vocab["class_names"], background="background", window=64, stride=32,
                precision="bf16")
        assert b.settings["precision"] == "bf16" and b.settings["inference"] == "sliding"
        agree.append(np.mean(a.labels == b.labels))
        assert np.abs(a.probabilities - b.probabilities).max() < 0.25
    assert np.mean(agree) >= 0.98, agree


# ---- the student ----------------------------------------------------------------------------
def test_student_predicts_and_trains_in_bf16(tmp_path, monkeypatch, detected_cpu):
    from napari_maskclip.student import StudentSegmenter, TrainSettings, train

    from test_student_train import random_embeddings, shapes_data

    settings = TrainSettings(iterations=3, batch_size=2, crop_size=48, backbone="tiny",
                             backbone_weights="random", val_fraction=0.0, val_interval=0,
                             save_interval=0)
    path = tmp_path / "student.safetensors"
    result = train(shapes_data(4, size=48), path, settings=settings,
                   class_embeddings=random_embeddings(4), device="cpu", precision="bf16")
    assert result.meta["precision"] == "bf16"
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert all(p.dtype == torch.float32 for p in result.net.parameters())  # fp32 master weights
    with pytest.raises(InvalidInputError, match="loss scaling"):
        train(shapes_data(4, size=48), None, settings=settings,
              class_embeddings=random_embeddings(4), device="cpu", precision="fp16")

    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    f32 = StudentSegmenter(path, device="cpu", precision="fp32")(image)
    b16 = StudentSegmenter(path, device="cpu", precision="bf16")(image)
    assert f32.settings["precision"] == "fp32" and b16.settings["precision"] == "bf16"
    assert b16.probabilities.dtype == np.float32
    assert not np.array_equal(f32.probabilities, b16.probabilities)
    np.testing.assert_allclose(b16.probabilities, f32.probabilities, atol=0.05)
    # The predict command takes the option and records it.
    import imageio.v3 as iio

    from napari_maskclip.cli import main

    iio.imwrite(tmp_path / "a.png", image)
    assert main(["predict", str(tmp_path / "a.png"), "--student", str(path), "--out",
                 str(tmp_path / "out"), "--quiet", "--precision", "bf16"]) == 0
    table = json.loads((tmp_path / "out" / "a_classes.json").read_text())
    assert table["settings"]["precision"] == "bf16"
    _simulate_cpu(monkeypatch, {"avx512_bf16"})
    assert StudentSegmenter(path, device="cpu").precision == "bf16"
    _simulate_cpu(monkeypatch, {"avx2"})
    assert StudentSegmenter(path, device="cpu").precision == "fp32"


# ---- the CLI ------------------------------------------------------------------------------
def test_cli_segment_records_the_precision(tiny_vit_files, tmp_path):
    import imageio.v3 as iio

    from napari_maskclip.cli import main

    config, ckpt = tiny_vit_files
    image = tmp_path / "a.png"
    iio.imwrite(image, blocky_rgb(40, 48))
    out = tmp_path / "out"
    code = main(["segment", str(image), "--classes", "cat, dog", "--out", str(out), "--quiet",
                 "--model", str(config), "--pretrained", str(ckpt), "--templates", "single",
                 "--precision", "bf16"])
    assert code == 0
    table = json.loads((out / "a_classes.json").read_text())
    assert table["settings"]["precision"] == "bf16"
