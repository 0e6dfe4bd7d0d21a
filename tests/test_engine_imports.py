"""Import hygiene: the core (engine, student, export, ...) is UI-free, the package root stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hang_guard import HANG_GUARD_S

UI_PREFIXES = ("napari", "PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy", "vispy", "magicgui",
               "superqt", "app_model")

#: Every engine module, imported through the package's public names and directly.
ENGINE_FULL_IMPORT = (
    "napari_maskclip.engine; "
    "from napari_maskclip.engine import *; "
    "import pkgutil, importlib, napari_maskclip.engine as e; "
    "[importlib.import_module('napari_maskclip.engine.' + m.name) "
    "for m in pkgutil.iter_modules(e.__path__)]"
)


#: Every module of the other UI-free parts: the student, the export, and the torch-free helpers.
CORE_FULL_IMPORT = (
    "pkgutil, importlib; "
    "[importlib.import_module(p + '.' + m.name) "
    "for p in ('napari_maskclip.student', 'napari_maskclip.export', 'napari_maskclip.series') "
    "for m in pkgutil.iter_modules(importlib.import_module(p).__path__)]; "
    "import napari_maskclip.evaluate, napari_maskclip.synthetic, napari_maskclip.demo, "
    "napari_maskclip.result_files, napari_maskclip.image_files, napari_maskclip.stacks"
)


def _modules_after_import(statement: str) -> list[str]:
    code = f"import json, sys; import {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _is_ui(name: str) -> bool:
    return name.split(".")[0] in UI_PREFIXES


@pytest.mark.slow
def test_engine_imports_no_napari_or_qt():
    modules = _modules_after_import(ENGINE_FULL_IMPORT)
    # The probe really loaded the engine's heavy modules...
    for name in ("torch", "napari_maskclip.engine.segmenter", "napari_maskclip.engine.dense",
                 "napari_maskclip.engine.loading", "napari_maskclip.engine.text"):
        assert name in modules, name
    # ...and none of them pulled in a UI toolkit.
    ui = [m for m in modules if _is_ui(m)]
    assert ui == [], f"napari_maskclip.engine imported UI modules: {ui[:10]}"


@pytest.mark.slow
def test_student_export_and_helpers_import_no_napari_or_qt():
    modules = _modules_after_import(CORE_FULL_IMPORT)
    for name in ("torch", "napari_maskclip.student.training", "napari_maskclip.student.teacher",
                 "napari_maskclip.export.writer", "napari_maskclip.synthetic"):
        assert name in modules, name
    ui = [m for m in modules if _is_ui(m)]
    assert ui == [], f"the core imported UI modules: {ui[:10]}"


def test_package_root_imports_no_torch():
    modules = _modules_after_import("napari_maskclip")
    assert "napari_maskclip" in modules
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "open_clip") or _is_ui(m)]
    assert heavy == [], f"import napari_maskclip loaded {heavy[:10]}"


@pytest.mark.parametrize("module", ["napari_maskclip.engine", "napari_maskclip.engine.settings",
                                    "napari_maskclip.engine.preprocess", "napari_maskclip.engine.windows",
                                    "napari_maskclip.online"])
def test_light_engine_modules_import_no_torch(module):
    """Documented in engine/__init__: options and input checks load without torch."""
    modules = _modules_after_import(module)
    assert module in modules
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "open_clip") or _is_ui(m)]
    assert heavy == [], f"import {module} loaded {heavy[:10]}"


def test_probe_detects_ui_modules():
    """Guards the checks above: a module that does pull in Qt is seen by the same probe."""
    assert any(_is_ui(m) for m in _modules_after_import("qtpy"))
    assert not _is_ui("napari_maskclip.engine")
