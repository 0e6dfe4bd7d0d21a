"""Class colours: distinct (ΔE76 targets), stable per name, dataset colours win, user colours stick.

Every test runs with its own empty config directory (conftest), i.e. a fresh colour registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_maskclip import colors as colors_mod
from napari_maskclip.classes import class_color, class_colors
from napari_maskclip.colors import (
    CLASH,
    assign_colors,
    delta_e76,
    min_delta_e,
    palette,
    registry_path,
    remembered_colors,
    reset_class_color,
    set_class_color,
    srgb_to_lab,
)
from napari_maskclip.errors import InvalidInputError, PreferencesError
from napari_maskclip.synthetic import CLASS_NAMES

from hang_guard import HANG_GUARD_S

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _in_subprocess(names: list[str]) -> list[list[float]]:
    """The colours another Python process assigns (same config dir, same environment)."""
    code = ("import json, sys; from napari_maskclip.classes import class_colors; "
            "print(json.dumps(class_colors(json.loads(sys.argv[1]))))")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True,
                         text=True, timeout=HANG_GUARD_S, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fresh_registry(monkeypatch, tmp_path, name: str) -> Path:
    folder = tmp_path / name
    monkeypatch.setenv("NAPARI_MASKCLIP_CONFIG_DIR", str(folder))
    return folder


# -- distinctness ------------------------------------------------------------------------------
def test_demo_classes_and_30_classes_are_distinct(monkeypatch, tmp_path):
    demo = class_colors(CLASS_NAMES)
    demo_de = min_delta_e(demo)
    thirty = [f"structure {i}" for i in range(30)]
    _fresh_registry(monkeypatch, tmp_path, "fresh30")
    fresh30_de = min_delta_e(class_colors(thirty))
    # 30 new names in a registry that already knows the 12 demo classes and 200 other names.
    _fresh_registry(monkeypatch, tmp_path, "busy")
    class_colors(CLASS_NAMES)
    rng = np.random.default_rng(0)
    pool = [f"old {i}" for i in range(200)]
    for _ in range(40):
        class_colors(list(rng.choice(pool, size=int(rng.integers(2, 13)), replace=False)))
    busy30_de = min_delta_e(class_colors([f"new {i}" for i in range(30)]))
    # Lists of remembered names mixed in any order still stay apart (clashes are re-coloured).
    mixed_de = min(min_delta_e(class_colors(list(rng.choice(pool, 30, replace=False))))
                   for _ in range(10))
    print(f"\nmin ΔE76: 12 demo classes {demo_de:.1f} (target >= 20); 30 classes: fresh "
          f"registry {fresh30_de:.1f}, busy registry {busy30_de:.1f}, remembered names mixed "
          f"{mixed_de:.1f} (target >= 12)")
    assert demo_de >= 20
    assert min(fresh30_de, busy30_de, mixed_de) >= 12


def test_palette_is_distinct_from_black_label_0_and_has_no_greys():
    lab = srgb_to_lab(np.array(palette()))
    assert len(lab) >= 200
    assert lab[:, 0].min() >= 30  # ΔE76 to black is at least L*
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    assert chroma.min() >= 20  # no grey that could pass for background or an image


def test_colour_words_pull_towards_their_hue():
    red, green, blue, yellow = (class_color(n) for n in ("red circle", "green circle",
                                                         "blue circle", "yellow circle"))
    assert red[0] > 0.6 and red[1] < 0.3 and red[2] < 0.3
    assert green[1] > green[0] and green[1] > green[2]
    assert blue[2] > 0.8 and blue[2] > blue[0] and blue[2] > blue[1]
    assert yellow[0] > 0.8 and yellow[1] > 0.7 and yellow[2] < 0.3


# -- stability ---------------------------------------------------------------------------------
def test_fresh_registry_assignment_is_deterministic(monkeypatch, tmp_path):
    names = ["cat", "dog", "bird", "mitochondrion", "nucleus"]
    _fresh_registry(monkeypatch, tmp_path, "a")
    first = class_colors(names)
    assert first[0] == palette()[0]  # nothing in use: the first Glasbey colour
    _fresh_registry(monkeypatch, tmp_path, "b")
    assert class_colors(names) == first
    _fresh_registry(monkeypatch, tmp_path, "c")
    assert [tuple(c) for c in _in_subprocess(names)] == first


def test_a_class_keeps_its_colour_across_calls_lists_and_processes():
    cat, dog = class_colors(["cat", "dog"])
    assert class_colors(["bird", "dog", "fish", "cat"])[1::2] == [dog, cat]
    assert class_color("Cat ") == cat  # case and spacing do not matter
    assert [tuple(c) for c in _in_subprocess(["dog", "cat"])] == [dog, cat]
    stored = remembered_colors()
    assert stored["cat"] == (cat, False) and stored["dog"] == (dog, False)


def test_new_names_avoid_colours_already_in_the_list_and_in_the_registry():
    cat, dog = class_colors(["cat", "dog"])
    bird = class_color("bird")  # alone in its list, yet not cat's or dog's colour
    assert bird not in (cat, dog)
    assert delta_e76(bird, cat) > 1 and delta_e76(bird, dog) > 1


def test_clashing_remembered_colours_are_recoloured_in_that_list_only():
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    same = [0.8392, 0.0, 0.0, 1.0]
    path.write_text(json.dumps({"classes": {"cat": {"color": same, "user": False},
                                            "dog": {"color": same, "user": False}}}))
    cat, dog = class_colors(["cat", "dog"])
    assert cat == tuple(same) and delta_e76(cat, dog) >= CLASH
    assert class_color("dog") == tuple(same)  # its remembered colour is not forgotten


# -- the user's colours ----------------------------------------------------------------------------
def test_user_colour_sticks_and_can_be_reset():
    cat, dog = class_colors(["cat", "dog"])
    assert set_class_color("Dog", "#ff00ff") == (1.0, 0.0, 1.0, 1.0)
    assert class_colors(["cat", "dog"]) == [cat, (1.0, 0.0, 1.0, 1.0)]
    assert [tuple(c) for c in _in_subprocess(["dog"])] == [(1.0, 0.0, 1.0, 1.0)]
    # A user colour even wins over a clash (the user chose it), and a later set replaces it.
    set_class_color("cat", (1.0, 0.0, 1.0))
    assert class_colors(["cat", "dog"]) == [(1.0, 0.0, 1.0, 1.0)] * 2
    set_class_color("cat", [0.0, 0.5, 0.5, 0.8])
    assert class_color("cat") == (0.0, 0.5, 0.5, 0.8)
    assert remembered_colors()["cat"] == ((0.0, 0.5, 0.5, 0.8), True)
    assert reset_class_color("cat") is True and reset_class_color("cat") is False
    assert "cat" not in remembered_colors()


@pytest.mark.parametrize("bad", ["red", "#12345", (1.0, 0.0), (0.5, 0.5, 1.5), (0, 0, float("nan")),
                                 "#gg0000", None])
def test_bad_user_colours_are_refused(bad):
    with pytest.raises(InvalidInputError):
        set_class_color("cat", bad)
    assert not registry_path().exists()


def test_a_user_colour_needs_a_name():
    with pytest.raises(InvalidInputError, match="name"):
        set_class_color("  ", (1.0, 0.0, 0.0))


def test_unwritable_registry_still_gives_colours_but_refuses_a_user_colour(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NAPARI_MASKCLIP_CONFIG_DIR", str(blocker / "config"))
    assert min_delta_e(class_colors(["cat", "dog"])) >= 20
    with pytest.raises(PreferencesError, match="NAPARI_MASKCLIP_CONFIG_DIR"):
        set_class_color("cat", "#00ff00")


# -- the registry file ---------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2]",
                                     b'{"classes": []}', b'{"classes": {"cat": 3}}'])
def test_corrupt_registry_is_tolerated_and_replaced(content):
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    colors = class_colors(["cat", "dog"])
    assert colors == class_colors(["cat", "dog"])
    assert set(json.loads(path.read_text())["classes"]) == {"cat", "dog"}


def test_bad_entries_are_skipped_good_ones_kept():
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"classes": {
        "cat": {"color": [0.0, 0.5, 0.5, 1.0], "user": True},
        "dog": {"color": [2.0, 0.0, 0.0]},
        "bird": {"color": "purple"},
    }}))
    assert class_color("cat") == (0.0, 0.5, 0.5, 1.0)
    assert set(remembered_colors()) == {"cat"}


def test_registry_is_bounded_and_forgets_automatic_colours_first(monkeypatch):
    monkeypatch.setattr(colors_mod, "MAX_REMEMBERED", 5)
    set_class_color("mine", "#123456")
    for i in range(8):
        class_color(f"class {i}")
    kept = remembered_colors()
    assert len(kept) == 5 and "mine" in kept
    assert list(kept)[-1] == "class 7" and "class 0" not in kept


def test_registry_directory_in_the_way_is_tolerated():
    path = registry_path()
    path.mkdir(parents=True)
    assert min_delta_e(class_colors(["cat", "dog"])) >= 20


# -- datasets --------------------------------------------------------------------------------------
def test_dataset_colours_win_when_appending_and_reading(tmp_path):
    from PIL import Image

    from napari_maskclip.export import export_sample, read_dataset
    from napari_maskclip.export.class_table import read_class_table

    labels = np.array([[0, 1], [2, 0]], dtype=np.uint8)
    image = np.zeros((2, 2), dtype=np.uint8)
    ds = tmp_path / "ds"
    export_sample(ds, "a", image, labels, "cat, dog")
    table = json.loads((ds / "classes.json").read_text())
    cat, dog = (tuple(e["color"]) for e in table["classes"][1:])
    assert [cat, dog] == class_colors(["cat", "dog"])
    # The dataset's colour of "dog" is changed by hand, and the user picks another "cat" colour.
    table["classes"][2]["color"] = [0.1, 0.2, 0.3, 1.0]
    (ds / "classes.json").write_text(json.dumps(table))
    set_class_color("cat", "#00ff00")
    assert read_class_table(ds / "classes.json").colors[1:] == [cat, (0.1, 0.2, 0.3, 1.0)]

    # Appending keeps the dataset's colours; a new class gets one distinct from them.
    export_sample(ds, "b", image, np.array([[3, 1], [2, 0]], dtype=np.uint8), "bird, cat, dog",
                  remap=True, add_classes=True)
    entries = json.loads((ds / "classes.json").read_text())["classes"]
    assert [e["name"] for e in entries] == ["background", "cat", "dog", "bird"]
    assert tuple(entries[1]["color"]) == cat and tuple(entries[2]["color"]) == (0.1, 0.2, 0.3, 1.0)
    bird = tuple(entries[3]["color"])
    assert min(delta_e76(bird, cat), delta_e76(bird, dog)) >= 20
    assert read_dataset(ds).classes.colors == [tuple(e["color"]) for e in entries]
    with Image.open(ds / "masks" / "b.png") as im:  # the mask palette uses the same colours
        pal = np.array(im.getpalette()[: 3 * 4]).reshape(4, 3)
    expected = np.round(np.array([e["color"][:3] for e in entries[1:]]) * 255)
    np.testing.assert_array_equal(pal[1:], expected)
    # Outside the dataset the user's choice still holds.
    assert class_color("cat") == (0.0, 1.0, 0.0, 1.0)


def test_a_dataset_table_colours_its_classes_without_changing_the_users_colours(tmp_path):
    from napari_maskclip.export.class_table import DatasetClasses

    mine = class_color("axon")
    table = {"classes": [{"index": 1, "name": "Axon", "color": [0.2, 0.4, 0.6, 1.0]},
                         {"index": 2, "name": "soma", "color": "not a colour"}]}
    colors = DatasetClasses.from_json(table).colors
    assert colors[1] == (0.2, 0.4, 0.6, 1.0)  # the table's colour wins (name case ignored)...
    assert delta_e76(colors[2], colors[1]) >= 20  # ...a bad one is replaced by a distinct one
    assert class_color("axon") == mine  # reading the table did not change the user's colour
    assert class_color("soma") == colors[2]  # the new name's colour is remembered


def test_assign_colors_with_fixed_colours_never_touches_the_registry():
    assert assign_colors(["cat"], fixed={"CAT": "#0000ff"}) == [(0.0, 0.0, 1.0, 1.0)]
    assert not registry_path().exists()


def test_colours_load_neither_torch_nor_napari_nor_qt():
    code = ("import json, sys; from napari_maskclip.colors import set_class_color; "
            "from napari_maskclip.classes import class_colors; class_colors(['a', 'b']); "
            "set_class_color('a', '#ff0000'); print(json.dumps(sorted(sys.modules)))")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=HANG_GUARD_S, env=env, check=True)
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert "colorcet" in modules  # the probe really assigned palette colours
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "napari", "qtpy", "PyQt5", "PyQt6",
                                                         "PySide2", "PySide6", "vispy")]
    assert heavy == []
