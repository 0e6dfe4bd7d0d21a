"""Shared fixtures: tiny random-weight open_clip models saved as real checkpoint files.

No test downloads anything. Models are built from the custom configs in ``tests/data`` with a
fixed seed, written to disk as safetensors, and loaded back through the project's own loading
code, exactly as a user's local checkpoint would be.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# The test models are tiny and the CI/dev machines small and shared: torch's intra-op threads only
# wait on each other there (measured ~40x slower per op under load). One thread per test process,
# set before torch is first imported (by the open_clip import below); an explicit OMP_NUM_THREADS
# still wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The exactness tests compare with fp32 references, and ``precision="auto"`` is bf16 on a CPU with
# native bf16 (AVX512-BF16, AMX): the suite pins auto to fp32 on every CPU (subprocesses inherit
# it), so its results do not depend on the machine it runs on. tests/test_precision.py tests
# auto's detection and the bf16 path explicitly, with the variable removed.
os.environ["NAPARI_MASKCLIP_CPU_BF16"] = "0"

# Load torch's compiler stack (Triton, on Linux) at collection, before any napari canvas exists:
# Triton loaded after Mesa's LLVM crashes the process (see napari_maskclip.plugin.models). This
# keeps GUI tests independent of the order tests run in.
import open_clip  # noqa: F401
import torch

if "OMP_NUM_THREADS" not in os.environ or os.environ["OMP_NUM_THREADS"] == "1":
    # A pytest plugin may have loaded the OpenMP runtime before this file ran; set it directly.
    torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"

#: Fixtures that mean "this test drives Qt" (a viewer, widgets, or the Qt event loop).
GUI_FIXTURES = {"make_napari_viewer", "make_napari_viewer_proxy", "qtbot", "qapp"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses a viewer or Qt ``gui``, so ``pytest -m "not gui"`` runs the
    core alone (see the markers in pyproject.toml)."""
    for item in items:
        if GUI_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.gui)


@pytest.fixture(scope="session", autouse=True)
def _session_dirs(tmp_path_factory):
    """The same isolation for session- and module-scoped fixtures (models and segmenters built
    once), which are set up before the per-test ``_isolated_cache``: without it they read and
    write the user's real cache, whose text embeddings (encoded earlier in other batches) differ
    from fresh ones in the last bit, so a test's result depended on what the machine ran before."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NAPARI_MASKCLIP_CACHE_DIR", str(tmp_path_factory.mktemp("session-cache")))
        patch.setenv("NAPARI_MASKCLIP_CONFIG_DIR", str(tmp_path_factory.mktemp("session-config")))
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache and config directory (remembered class colours included):
    no state leaks between tests or from the user."""
    cache = tmp_path_factory.mktemp("maskclip-cache")
    monkeypatch.setenv("NAPARI_MASKCLIP_CACHE_DIR", str(cache))
    monkeypatch.setenv("NAPARI_MASKCLIP_CONFIG_DIR", str(tmp_path_factory.mktemp("maskclip-config")))
    yield cache


def _save_random_model(config: Path, out_dir: Path, seed: int) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = json.loads(config.read_text())
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    # open_clip zero-initialises some ResNet weights (bn3); give every tensor some signal so
    # tests exercise every path.
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype.is_floating_point and tensor.abs().sum() == 0 and "running" not in name:
                tensor.normal_(0.0, 0.05)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = out_dir / f"{config.stem}-seed{seed}.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_vit_files(tmp_path_factory) -> tuple[Path, Path]:
    """(config JSON, safetensors checkpoint) of a tiny random ViT CLIP (patch 8, native 32 px)."""
    out = tmp_path_factory.mktemp("tiny-vit")
    config = DATA / "tiny_vit.json"
    return config, _save_random_model(config, out, seed=0)


@pytest.fixture(scope="session")
def tiny_resnet_files(tmp_path_factory) -> tuple[Path, Path]:
    """(config JSON, safetensors checkpoint) of a tiny random ResNet CLIP (stride 32, native 64)."""
    out = tmp_path_factory.mktemp("tiny-resnet")
    config = DATA / "tiny_resnet.json"
    return config, _save_random_model(config, out, seed=1)


@pytest.fixture
def tiny_vit(tiny_vit_files):
    """A loaded tiny ViT (fresh per test, on the CPU)."""
    from napari_maskclip.engine import load_clip

    config, ckpt = tiny_vit_files
    return load_clip(str(config), str(ckpt), device="cpu")


@pytest.fixture
def tiny_resnet(tiny_resnet_files):
    from napari_maskclip.engine import load_clip

    config, ckpt = tiny_resnet_files
    return load_clip(str(config), str(ckpt), device="cpu")


@pytest.fixture
def tiny_segmenter(tiny_vit):
    """A Segmenter on the tiny ViT with one template and no denoising (random weights)."""
    from napari_maskclip.engine import Segmenter

    return Segmenter(tiny_vit, templates="single", denoise=False)
