"""The widget's model choices and the pool that keeps loaded models (and their caches) alive."""

from __future__ import annotations

import subprocess
import sys

import pytest

from napari_maskclip.plugin.models import ModelChoice, SegmenterPool
from napari_maskclip.errors import ModelLoadError
from napari_maskclip.progress import run_to_completion

from hang_guard import HANG_GUARD_S


def test_choice_from_fields(tmp_path):
    ckpt = tmp_path / "weights.safetensors"
    ckpt.write_bytes(b"x")
    assert ModelChoice.from_fields(" ViT-B-16 ", "openai", "").device == "auto"
    assert ModelChoice.from_fields("ViT-B-16", "openai", "cpu").may_download
    local = ModelChoice.from_fields("ViT-B-16", str(ckpt), "cpu")
    assert not local.may_download and local.describe() == "ViT-B-16 (weights.safetensors)"
    assert not ModelChoice.from_fields("ViT-B-16", "random", "cpu").may_download
    demo = ModelChoice.from_fields("demo", "openai", "cpu")
    assert demo.pretrained is None and not demo.may_download
    with pytest.raises(ModelLoadError, match="No model given"):
        ModelChoice.from_fields("  ", "openai", "cpu")


def test_pool_reuses_models_and_evicts_the_oldest(tiny_vit_files, tiny_resnet_files):
    pool = SegmenterPool(max_models=1)
    vit = ModelChoice(str(tiny_vit_files[0]), str(tiny_vit_files[1]), "cpu")
    steps = []
    first = run_to_completion(pool.get_iter(vit), steps.append)
    assert [s.stage for s in steps] == ["load", "load"]
    assert run_to_completion(pool.get_iter(vit)) is first  # no reload, caches kept
    assert pool.cached(vit) is first
    resnet = ModelChoice(str(tiny_resnet_files[0]), str(tiny_resnet_files[1]), "cpu")
    other = run_to_completion(pool.get_iter(resnet))
    assert other is not first and len(pool) == 1 and pool.cached(vit) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard is Linux-only")
@pytest.mark.slow
def test_engine_import_hides_triton_inside_napari():
    code = (
        "import sys, vispy\n"  # stands for a running napari canvas
        "from napari_maskclip.plugin.models import _import_engine\n"
        "engine = _import_engine()\n"
        "engine.Segmenter\n"
        "from torch.utils._triton import has_triton_package\n"
        "print(sys.modules.get('triton', 'absent'), has_triton_package())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "False"]


def test_a_retrained_student_is_never_served_stale(tmp_path):
    """The pool key of a student includes its file's time and size: a new checkpoint at the same
    path is a new choice (loaded again), the same file the same choice (reused)."""
    import os

    path = tmp_path / "student.safetensors"
    path.write_bytes(b"first")
    first = ModelChoice.student(str(path), "cpu")
    assert first.is_student and not first.may_download
    assert first.describe() == "student student.safetensors"
    assert ModelChoice.student(str(path), "cpu") == first
    path.write_bytes(b"second, longer")
    os.utime(path, ns=(first.stamp[0] + 10**9, first.stamp[0] + 10**9))
    assert ModelChoice.student(str(path), "cpu") != first
    with pytest.raises(ModelLoadError, match="not found"):
        ModelChoice.student(str(tmp_path / "missing.safetensors"))
