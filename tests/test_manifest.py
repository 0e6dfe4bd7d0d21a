"""The npe2 manifest: valid, packaged from the single root file, and light to import."""

from __future__ import annotations

import importlib
import importlib.resources
import subprocess
import sys
from pathlib import Path

import pytest

from hang_guard import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest():
    from npe2 import PluginManifest

    return PluginManifest.from_distribution("napari-maskclip")


def test_npe2_validate_passes():
    out = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-maskclip"],
        capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_packaged_manifest_is_the_root_file():
    packaged = importlib.resources.files("napari_maskclip").joinpath("napari.yaml").read_text()
    assert packaged == (ROOT / "napari.yaml").read_text(encoding="utf-8")


def test_contributions(manifest):
    contrib = manifest.contributions
    commands = {c.id: c.python_name for c in contrib.commands}
    widget = contrib.widgets[0]
    assert commands[widget.command] == "napari_maskclip.plugin._qt.segment_panel:MaskClipWidget"
    segment_menu = contrib.menus["napari/layers/segment"]
    assert [item.command for item in segment_menu] == [
        widget.command, "napari-maskclip.show_instances", "napari-maskclip.show_instances_slice"
    ]
    assert commands["napari-maskclip.show_instances"] == (
        "napari_maskclip.plugin.instances_command:show_instances"
    )
    assert all(item.when == "active_layer_type == 'labels'" for item in segment_menu[1:])
    from napari_maskclip.plugin.sample_data import SAMPLES

    assert {s.key for s in contrib.sample_data} == set(SAMPLES) | {"shapes"}  # photos + demo scene
    shapes = next(s for s in contrib.sample_data if s.key == "shapes")
    assert commands[shapes.command] == "napari_maskclip.plugin.sample_data:shapes"
    writer = contrib.writers[0]
    assert [str(t) for t in writer.layer_types] == ["labels"]
    assert commands[writer.command] == "napari_maskclip.plugin.writer:write_labels_dataset"


def _resolve(python_name: str):
    module, attr = python_name.split(":")
    return getattr(importlib.import_module(module), attr)


def test_widget_and_sample_commands_resolve(manifest):
    from napari_maskclip.plugin._qt.segment_panel import MaskClipWidget

    names = [c.python_name for c in manifest.contributions.commands
             if "plugin.writer" not in c.python_name]
    resolved = [_resolve(name) for name in names]
    assert MaskClipWidget in resolved
    assert all(callable(obj) for obj in resolved)


def test_writer_command_resolves(manifest):
    writer = next(c for c in manifest.contributions.commands if "plugin.writer" in c.python_name)
    assert callable(_resolve(writer.python_name))


@pytest.mark.parametrize(
    "modules, forbidden",
    [
        (["napari_maskclip"], ["torch", "qtpy", "PyQt5", "PyQt6", "napari"]),
        (["napari_maskclip.plugin.sample_data", "napari_maskclip.plugin.preferences"], ["torch", "qtpy"]),
        (["napari_maskclip.plugin._qt.segment_panel"], ["torch", "open_clip"]),
        (["napari_maskclip.plugin.instance_layer"], ["torch", "qtpy", "napari"]),
        (["napari_maskclip.plugin._qt.export_panel"], ["torch", "open_clip", "pycocotools"]),
    ],
)
def test_imports_stay_light(modules, forbidden):
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"print(sorted(m for m in {forbidden!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{modules} imported {out.stdout.strip()}"
