"""Offline behaviour of pretrained tags: cached weights load without the network, missing ones
fail at once with one line that says what to do, and the host probe answers quickly.
Nothing is downloaded: every test runs with downloads off or against local ports."""

from __future__ import annotations

import socket
import time

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from engine_helpers import build_clip, save_safetensors, tiny_config
from napari_maskclip import online
from napari_maskclip.engine import dense_features, load_clip
from napari_maskclip.errors import WeightsUnavailableError

HANG_GUARD_S = 30.0  # not a speed target: only catches a load that waits on the network


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Every weights cache empty: Hugging Face's (env and module constant), open_clip's
    ``~/.cache/clip`` (through HOME). Returns the Hugging Face hub cache directory."""
    import huggingface_hub.constants

    hub = tmp_path / "hf-hub"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


@pytest.fixture
def no_probe(monkeypatch):
    """Fails the test if anything probes the network."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the network was probed")

    monkeypatch.setattr(online, "probe_host", forbidden)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nobody listens there


# ---- missing weights ----------------------------------------------------------------------
@pytest.mark.parametrize("switch", ["NAPARI_MASKCLIP_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_switch_fails_at_once_with_one_clear_line(empty_caches, no_probe, monkeypatch, switch):
    monkeypatch.setenv(switch, "1")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip("ViT-B-16", "openai", device="cpu")
    elapsed = time.perf_counter() - start
    message = str(info.value)
    print(f"offline failure after {elapsed:.2f} s: {message}")
    assert elapsed < HANG_GUARD_S
    assert "\n" not in message
    assert "'openai' weights of ViT-B-16" in message
    assert f"{switch}=1" in message  # why nothing was downloaded
    assert "--model demo" in message
    assert "--pretrained /path/to/ViT-B-16.safetensors" in message
    assert str(empty_caches) in message  # where the cache is


def test_unreachable_host_fails_with_one_line(empty_caches, monkeypatch):
    """Downloads allowed, but the hub does not answer (a closed local port): one line, no retry."""
    import huggingface_hub.constants

    monkeypatch.delenv("NAPARI_MASKCLIP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip("ViT-B-16", "openai", device="cpu")
    message = str(info.value)
    assert "127.0.0.1" in message and "not reachable" in message
    assert "--model demo" in message and "\n" not in message


def test_cli_segment_offline_is_one_line_suggesting_the_demo(empty_caches, no_probe, monkeypatch,
                                                              tmp_path, capsys):
    from napari_maskclip.cli import main

    monkeypatch.setenv("NAPARI_MASKCLIP_OFFLINE", "1")
    image = tmp_path / "a.png"
    iio.imwrite(image, np.zeros((16, 16, 3), np.uint8))
    code = main(["segment", str(image), "--classes", "cat", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "--model demo" in lines[0] and "Traceback" not in err and "huggingface" not in err.lower()


# ---- cached weights -------------------------------------------------------------------------
def _register_tiny_tag(monkeypatch, tag_cfg: dict) -> str:
    """A built-in open_clip model name and tag for the tiny test ViT (registries patched)."""
    from open_clip import factory, pretrained

    name = "tiny-vit-offline-test"
    monkeypatch.setitem(factory._MODEL_CONFIGS, name, tiny_config("tiny_vit"))
    monkeypatch.setitem(pretrained._PRETRAINED, name, {"test": tag_cfg})
    return name


def _hub_cache_entry(hub, repo_id: str, filename: str, model) -> None:
    """The Hugging Face cache layout: refs/main names a snapshot that holds the file."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_safetensors(model, snapshot / filename)


@pytest.mark.parametrize("switch", [None, "NAPARI_MASKCLIP_OFFLINE"])
def test_cached_hub_weights_load_without_touching_the_network(empty_caches, no_probe, monkeypatch,
                                                                tmp_path, switch):
    """A tag whose file is in the Hugging Face cache loads from it: no probe, no download, even
    with downloads switched off; the weights are the cached ones."""
    if switch:
        monkeypatch.setenv(switch, "1")
    model = build_clip(tiny_config("tiny_vit"), seed=31)
    _hub_cache_entry(empty_caches, "someone/tiny-clip", "open_clip_model.safetensors", model)
    name = _register_tiny_tag(monkeypatch, {"hf_hub": "someone/tiny-clip/", "mean": (0.5, 0.5, 0.5),
                                            "std": (0.25, 0.25, 0.25)})
    loaded = load_clip(name, "test", device="cpu")
    assert loaded.pretrained == "test" and loaded.mean == (0.5, 0.5, 0.5)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(dense_features(loaded.visual, pixels).features).all()


def test_cached_url_weights_load_and_a_truncated_file_does_not(empty_caches, no_probe, monkeypatch, tmp_path):
    """open_clip's URL cache (``cache_dir``) serves a tag when the file is intact; a file whose
    SHA-256 does not match the URL's (an interrupted download) counts as missing."""
    import hashlib

    monkeypatch.setenv("NAPARI_MASKCLIP_OFFLINE", "1")
    cache = tmp_path / "clip-cache"
    cache.mkdir()
    model = build_clip(tiny_config("tiny_vit"), seed=32)
    path = save_safetensors(model, cache / "tiny.safetensors")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    url = f"https://openaipublic.azureedge.net/clip/models/{sha}/tiny.safetensors"
    name = _register_tiny_tag(monkeypatch, {"url": url})
    loaded = load_clip(name, "test", device="cpu", cache_dir=str(cache))
    assert torch.equal(loaded.model.visual.proj, model.visual.proj)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsUnavailableError, match="NAPARI_MASKCLIP_OFFLINE=1"):
        load_clip(name, "test", device="cpu", cache_dir=str(cache))


# ---- the probe ------------------------------------------------------------------------------
def test_probe_of_a_closed_port_is_offline_quickly(monkeypatch):
    monkeypatch.delenv("NAPARI_MASKCLIP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    port = _closed_port()
    start = time.perf_counter()
    assert online.network_status(f"http://127.0.0.1:{port}/x", timeout=2.0) == "offline"
    assert time.perf_counter() - start < HANG_GUARD_S


def test_probe_of_an_unroutable_address_is_bounded_by_its_timeout(monkeypatch):
    """TEST-NET-1 (RFC 5737) never answers: the probe gives up after its timeout."""
    monkeypatch.delenv("NAPARI_MASKCLIP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    assert online.network_status("https://192.0.2.1/", timeout=0.5) == "offline"
    assert time.perf_counter() - start < HANG_GUARD_S


def test_probe_of_a_listening_port_is_online_and_the_switch_disables_it(monkeypatch):
    monkeypatch.delenv("NAPARI_MASKCLIP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert online.network_status(url, timeout=2.0) == "online"
        monkeypatch.setenv("NAPARI_MASKCLIP_OFFLINE", "1")
        assert online.network_status(url, timeout=2.0) == "disabled"
        monkeypatch.setenv("NAPARI_MASKCLIP_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_OFFLINE", "true")
        assert online.network_status(url, timeout=2.0) == "disabled"
