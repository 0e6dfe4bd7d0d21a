"""Preferences the widget remembers between sessions (recent class lists, last model)."""

from __future__ import annotations

import json

import pytest

from napari_maskclip.plugin.preferences import (
    CONFIG_ENV,
    MAX_RECENT,
    WidgetPreferences,
    preferences_path,
)


@pytest.fixture(autouse=True)
def _config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config"))
    return tmp_path / "config"


def test_recent_lists_survive_a_new_session(_config_dir):
    prefs = WidgetPreferences.load()
    assert prefs.recent_classes == [] and prefs.model is None
    prefs.remember_run("cat, dog", "background", "demo", "")
    prefs.remember_run("sofa, floor", "", "ViT-B-16", "openai")
    prefs.remember_run("Cat,  dog", "wall", "ViT-B-16", "openai")  # same list, other spacing/case
    assert prefs.save()
    assert preferences_path().parent == _config_dir
    again = WidgetPreferences.load()
    assert again.recent_classes == ["Cat,  dog", "sofa, floor"]
    assert again.recent_background == ["wall", "background"]
    assert (again.model, again.pretrained) == ("ViT-B-16", "openai")


def test_recent_lists_are_bounded():
    prefs = WidgetPreferences()
    for i in range(MAX_RECENT + 5):
        prefs.remember_run(f"class{i}", "", "m", "p")
    assert len(prefs.recent_classes) == MAX_RECENT
    assert prefs.recent_classes[0] == f"class{MAX_RECENT + 4}"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"recent_classes": "x"})])
def test_a_broken_file_means_nothing_remembered(_config_dir, content):
    _config_dir.mkdir(parents=True)
    preferences_path().write_text(content)
    prefs = WidgetPreferences.load()
    assert prefs.recent_classes == []


def test_unwritable_config_dir_does_not_raise(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(CONFIG_ENV, str(blocker / "sub"))  # a folder under a file
    prefs = WidgetPreferences()
    prefs.remember_run("cat", "", "m", "p")
    assert prefs.save() is False
