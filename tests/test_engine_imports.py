"""Import hygiene: the engine is UI-free, and the package root stays light."""

from __future__ import annotations

import json
import subprocess
import sys

UI_PREFIXES = ("napari", "PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy", "vispy", "magicgui",
               "superqt", "app_model")


def _modules_after_import(module: str) -> list[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _is_ui(name: str) -> bool:
    top = name.split(".")[0]
    return top in UI_PREFIXES


def test_engine_imports_no_napari_or_qt():
    modules = _modules_after_import("napari_maskclip.engine")
    assert "torch" in modules and "napari_maskclip.engine" in modules  # the probe works
    ui = [m for m in modules if _is_ui(m)]
    assert ui == [], f"napari_maskclip.engine imported UI modules: {ui[:10]}"


def test_package_root_imports_no_torch():
    modules = _modules_after_import("napari_maskclip")
    assert "napari_maskclip" in modules
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "open_clip") or _is_ui(m)]
    assert heavy == [], f"import napari_maskclip loaded {heavy[:10]}"


def test_probe_detects_ui_modules():
    """Guards the checks above: a module that does pull in Qt is seen by the same probe."""
    assert any(_is_ui(m) for m in _modules_after_import("qtpy"))
    assert not _is_ui("napari_maskclip.engine")
