"""Loading models and checkpoints: exact round trips, refusing unsafe pickles and misfits,
device and precision resolution. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_helpers import OPENAI_MEAN, OPENAI_STD, build_clip, save_safetensors, tiny_config, write_config
from napari_maskclip.engine import Segmenter, dense_features, load_clip, wrap_model
from napari_maskclip.engine.device import resolve_device, resolve_dtype
from napari_maskclip.errors import InvalidInputError, ModelLoadError, UnsafeCheckpointError

MARKER: list[str] = []


class Gadget:
    """Any custom class: unpickling it needs arbitrary code."""

    def __init__(self) -> None:
        self.value = 3


class Tripwire:
    """Records that its code ran if it is ever unpickled."""

    def __reduce__(self):
        return (MARKER.append, ("unpickled!",))


def _outputs(loaded) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense image features and text embeddings of fixed inputs."""
    pixels = torch.randn(1, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    feats = dense_features(loaded.visual, pixels, "maskclip").features
    with torch.no_grad():
        text = loaded.model.encode_text(loaded.tokenizer(["a photo of a cat.", "dog"]))
    return feats, text


@pytest.fixture(scope="module")
def vit_model():
    return build_clip(tiny_config("tiny_vit"), seed=21)


@pytest.fixture
def vit_config(tmp_path):
    return write_config(tiny_config("tiny_vit"), tmp_path / "tiny_vit.json")


# ---- round trips --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-wrapped", "pt-module-prefix"])
def test_checkpoint_round_trip_gives_identical_outputs(vit_model, vit_config, tmp_path, fmt):
    sd = vit_model.state_dict()
    if fmt == "safetensors":
        path = save_safetensors(vit_model, tmp_path / "w.safetensors")
    elif fmt == "pt":
        path = tmp_path / "w.pt"
        torch.save(sd, path)
    elif fmt == "pt-wrapped":
        path = tmp_path / "w.ckpt"
        torch.save({"state_dict": sd, "epoch": 3}, path)
    else:
        path = tmp_path / "w.pth"
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    loaded = load_clip(str(vit_config), str(path), device="cpu")
    reference = wrap_model(vit_model, device="cpu")
    for a, b in zip(_outputs(loaded), _outputs(reference)):
        assert torch.equal(a, b)
    assert loaded.pretrained == str(path)


def test_resnet_checkpoint_round_trip(tiny_resnet_files, tmp_path):
    config, ckpt = tiny_resnet_files
    loaded = load_clip(str(config), str(ckpt), device="cpu")
    from safetensors.torch import load_file

    state = load_file(str(ckpt))
    for name, tensor in loaded.model.state_dict().items():
        if name in state:
            assert torch.equal(tensor, state[name]), name
    assert loaded.kind == "resnet" and loaded.patch_size == 32


def test_loaded_model_describes_itself(tiny_vit, tiny_resnet):
    assert tiny_vit.kind == "vit" and tiny_vit.patch_size == 8
    assert tiny_vit.native_size == (32, 32) and tiny_vit.embed_dim == 32
    assert tiny_resnet.native_size == (64, 64)
    for loaded in (tiny_vit, tiny_resnet):
        assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
        np.testing.assert_allclose(loaded.mean, OPENAI_MEAN)
        np.testing.assert_allclose(loaded.std, OPENAI_STD)
        assert not any(p.requires_grad for p in loaded.model.parameters())
        assert not loaded.model.training


def test_random_weights_on_request(vit_config):
    a = load_clip(str(vit_config), "random", device="cpu")
    assert a.pretrained == "random"
    b = load_clip(str(vit_config), "random", device="cpu")
    assert not torch.equal(a.model.visual.proj, b.model.visual.proj)
    assert a.identity != b.identity, "two different random models must not share a cache identity"


def test_identity_follows_the_weights(vit_model, vit_config, tmp_path):
    p1 = save_safetensors(vit_model, tmp_path / "a.safetensors")
    other = build_clip(tiny_config("tiny_vit"), seed=22)
    p2 = save_safetensors(other, tmp_path / "b.safetensors")
    assert load_clip(str(vit_config), str(p1), device="cpu").identity != \
        load_clip(str(vit_config), str(p2), device="cpu").identity


def test_quick_gelu_can_be_forced(vit_config, tiny_vit_files):
    from open_clip.transformer import QuickGELU

    _, ckpt = tiny_vit_files
    loaded = load_clip(str(vit_config), str(ckpt), device="cpu", quick_gelu=True)
    assert isinstance(loaded.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    plain = load_clip(str(vit_config), str(ckpt), device="cpu")
    assert not isinstance(plain.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


# ---- unsafe checkpoints -------------------------------------------------------------------
def test_pickle_with_a_custom_object_is_refused(vit_model, vit_config, tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"state_dict": vit_model.state_dict(), "obj": Gadget()}, path)
    with pytest.raises(UnsafeCheckpointError):
        load_clip(str(vit_config), str(path), device="cpu")


def test_pickled_module_is_refused(vit_model, vit_config, tmp_path):
    path = tmp_path / "module.pt"
    torch.save(vit_model, path)
    with pytest.raises(UnsafeCheckpointError):
        load_clip(str(vit_config), str(path), device="cpu")


def test_refused_pickle_runs_no_code(vit_model, vit_config, tmp_path):
    path = tmp_path / "trap.bin"
    torch.save({"state_dict": vit_model.state_dict(), "trap": Tripwire()}, path)
    MARKER.clear()
    with pytest.raises(UnsafeCheckpointError):
        load_clip(str(vit_config), str(path), device="cpu")
    assert MARKER == []


# ---- checkpoints that do not fit ----------------------------------------------------------
def test_checkpoint_of_another_architecture(tiny_resnet_files, vit_config):
    _, resnet_ckpt = tiny_resnet_files
    with pytest.raises(ModelLoadError) as info:
        load_clip(str(vit_config), str(resnet_ckpt), device="cpu")
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_checkpoint_with_missing_keys(vit_model, vit_config, tmp_path):
    sd = dict(vit_model.state_dict())
    del sd["visual.proj"]
    path = tmp_path / "partial.pt"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match="visual.proj"):
        load_clip(str(vit_config), str(path), device="cpu")


def test_checkpoint_with_unexpected_keys(vit_model, vit_config, tmp_path):
    sd = dict(vit_model.state_dict())
    sd["visual.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError):
        load_clip(str(vit_config), str(path), device="cpu")


def test_checkpoint_with_the_same_keys_but_other_shapes(vit_model, tmp_path):
    """A wider config has every key of the checkpoint, with other shapes: a ModelLoadError too."""
    cfg = tiny_config("tiny_vit")
    cfg["vision_cfg"]["width"] = 64
    config = write_config(cfg, tmp_path / "wider.json")
    path = save_safetensors(vit_model, tmp_path / "narrow.safetensors")
    with pytest.raises(ModelLoadError):
        load_clip(str(config), str(path), device="cpu")


@pytest.mark.parametrize("name,content", [("junk.pt", b"not a checkpoint"),
                                          ("junk.safetensors", b"\x00" * 64),
                                          ("empty.pt", b"")])
def test_unreadable_checkpoint(vit_config, tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelLoadError):
        load_clip(str(vit_config), str(path), device="cpu")


def test_checkpoint_without_tensors(vit_config, tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "note": "no weights"}, path)
    with pytest.raises(ModelLoadError):
        load_clip(str(vit_config), str(path), device="cpu")


# ---- names and files ----------------------------------------------------------------------
def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="ViT-Q-99"):
        load_clip("ViT-Q-99", "openai", device="cpu")
    with pytest.raises(ModelLoadError):
        load_clip("", "openai", device="cpu")


def test_missing_checkpoint_file(vit_config, tmp_path):
    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(ModelLoadError, match="not found"):
        load_clip(str(vit_config), str(missing), device="cpu")
    with pytest.raises(ModelLoadError):
        Segmenter(str(vit_config), str(missing), device="cpu")


def test_missing_or_bad_config_file(tmp_path, tiny_vit_files):
    _, ckpt = tiny_vit_files
    with pytest.raises(ModelLoadError):
        load_clip(str(tmp_path / "missing.json"), str(ckpt), device="cpu")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelLoadError):
        load_clip(str(bad), str(ckpt), device="cpu")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ModelLoadError):
        load_clip(str(wrong), str(ckpt), device="cpu")


def test_builtin_name_with_unknown_tag_does_not_download(monkeypatch, tmp_path):
    import open_clip

    def no_download(*a, **k):  # pragma: no cover - called only on a bug
        raise AssertionError("tried to download")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", no_download)
    with pytest.raises(ModelLoadError):
        load_clip("ViT-B-16", "no-such-tag", device="cpu")
    with pytest.raises(ModelLoadError):
        load_clip("ViT-B-16", None, device="cpu")


# ---- device and precision -----------------------------------------------------------------
def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    auto = resolve_device("auto")
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        assert auto.type == "mps"
    else:
        assert auto.type == "cpu"
    with pytest.raises(InvalidInputError):
        resolve_device("tpu-9000")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="(?i)cuda"):
            resolve_device("cuda")


def test_precision_resolution():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(cpu, "auto") == torch.float32
    assert resolve_dtype(cpu, "fp16") == torch.float32  # CPU weights stay fp32 (a cast copy runs)
    assert resolve_dtype(gpu, "auto") == torch.float16
    assert resolve_dtype(gpu, "fp32") == torch.float32
    assert resolve_dtype(gpu, "bf16") == torch.bfloat16
    with pytest.raises(InvalidInputError):
        resolve_dtype(cpu, "fp64")


def test_load_on_cpu_with_half_precision_request_keeps_fp32_weights(tiny_vit_files):
    config, ckpt = tiny_vit_files
    loaded = load_clip(str(config), str(ckpt), device="cpu", precision="fp16")
    assert loaded.dtype == torch.float32
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.precision == "fp16"  # runs use a cast copy (tests/test_precision.py)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_segmentation_agrees_with_cpu(tiny_vit_files, precision):
    config, ckpt = tiny_vit_files
    cpu = Segmenter(str(config), str(ckpt), device="cpu", templates="single", denoise=False, text_cache=None)
    gpu = Segmenter(str(config), str(ckpt), device="cuda", precision=precision, templates="single",
                    denoise=False, text_cache=None)
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    a, b = cpu(image, "cat, dog, tree", logit_scale=10.0), gpu(image, "cat, dog, tree", logit_scale=10.0)
    atol = 1e-4 if precision == "fp32" else 2e-2
    np.testing.assert_allclose(b.probabilities, a.probabilities, atol=atol, rtol=0)


def test_demo_model_loads_offline_or_says_it_is_missing():
    from importlib import resources

    base = resources.files("napari_maskclip") / "demo"
    present = (base / "toy_clip.json").is_file() and (base / "toy_clip.safetensors").is_file()
    if not present:
        with pytest.raises(ModelLoadError, match="demo"):
            load_clip("demo", None, device="cpu")
        return
    loaded = load_clip("demo", None, device="cpu")
    assert loaded.name == "demo" and loaded.kind in ("vit", "resnet")
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    result = Segmenter(loaded, text_cache=None, templates="single")(image, "cat, dog")
    assert result.labels.shape == (64, 64)
