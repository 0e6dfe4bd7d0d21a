"""Policies that live in the torch-free core: model names, the default-weights rule, the demo's
scene and vocabulary (shared by the CLI, the plugin and the student)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from napari_maskclip.engine.names import DEMO_MODEL, default_pretrained

from hang_guard import HANG_GUARD_S


@pytest.mark.parametrize(
    "model, given, expected",
    [
        ("ViT-B-16", None, "openai"),
        ("RN50", None, "openai"),
        ("ViT-B-16", "laion2b_s34b_b88k", "laion2b_s34b_b88k"),
        (DEMO_MODEL, None, None),
        ("my/config.JSON", None, None),
        ("my/config.json", "weights.safetensors", "weights.safetensors"),
    ],
)
def test_default_pretrained(model, given, expected):
    assert default_pretrained(model, given) == expected


def test_the_cli_and_the_engine_share_the_rule():
    from napari_maskclip import engine
    from napari_maskclip.cli import segment

    assert segment.default_pretrained is default_pretrained is engine.default_pretrained
    assert engine.DEMO_MODEL == DEMO_MODEL


def test_policy_modules_import_no_torch():
    code = ("import sys\nimport napari_maskclip.engine.names, napari_maskclip.demo.scene, "
            "napari_maskclip.student.settings, napari_maskclip.stacks\n"
            "from napari_maskclip.demo.scene import demo_classes\ndemo_classes()\n"
            "print(sorted(m for m in ('torch', 'open_clip', 'qtpy', 'napari') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
