"""The series' image listing: folders (flat or recursive), list files, natural order, sample names."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_maskclip.errors import InvalidInputError
from napari_maskclip.export.layout import check_sample_name
from napari_maskclip.series import list_images, natural_key, sample_name
from napari_maskclip.series.listing import sample_names

from hang_guard import HANG_GUARD_S


def _png(path, value=0, size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def test_natural_key_orders_numbers_by_value():
    names = ["img10.png", "img2.png", "IMG1.png", "img1b.png", "a/img3.png"]
    assert sorted(names, key=natural_key) == ["a/img3.png", "IMG1.png", "img1b.png", "img2.png", "img10.png"]


def test_folder_listing_is_natural_and_flat_unless_recursive(tmp_path):
    for name in ["img10.png", "img2.jpg", "img1.tif", "x.BMP", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"not checked here")
    (tmp_path / "notes.txt").write_text("not an image")
    _png(tmp_path / "sub" / "a b.png")
    _png(tmp_path / "sub" / "deeper" / "c.png")
    # A dataset inside the folder holds saved copies: never listed again.
    _png(tmp_path / "ds" / "images" / "img1.png")
    (tmp_path / "ds" / "dataset.json").write_text("{}")

    flat = list_images(tmp_path)
    assert [p.name for p in flat] == ["img1.tif", "img2.jpg", "img10.png", "x.BMP"]
    assert flat.names == ["img1", "img2", "img10", "x"]
    assert flat.root == tmp_path

    deep = list_images(tmp_path, recursive=True)
    rel = [deep.relative(i) for i in range(len(deep))]
    assert rel == ["img1.tif", "img2.jpg", "img10.png", "sub/a b.png", "sub/deeper/c.png", "x.BMP"]
    assert deep.names[3:5] == ["sub__a_b", "sub__deeper__c"]
    for name in deep.names:
        check_sample_name(name)


def test_list_file_paths_are_relative_to_it_and_missing_ones_stay_listed(tmp_path):
    _png(tmp_path / "imgs" / "b.png")
    _png(tmp_path / "imgs" / "a.png")
    listing = tmp_path / "series.txt"
    listing.write_text("# my series\nimgs/b.png\n\n  imgs/a.png  \nimgs/missing.png\nimgs/b.png\n"
                       f"{tmp_path / 'imgs' / 'a.png'}\n")
    images = list_images(listing)
    assert images.root == tmp_path
    assert [images.relative(i) for i in range(len(images))] == ["imgs/a.png", "imgs/b.png", "imgs/missing.png"]
    assert images.names == ["imgs__a", "imgs__b", "imgs__missing"]


def test_names_are_stable_and_unique(tmp_path):
    root = tmp_path
    assert sample_name(root / "sub" / "a b.png", root) == "sub__a_b"
    assert sample_name(root / "sub" / "a b.png", root) == sample_name(root / "sub" / "a b.png", root)
    paths = [root / "a.png", root / "a.jpg", root / "A.tif", root / "b.png"]
    names = sample_names(paths, root)
    assert len({n.casefold() for n in names}) == 4
    assert names[3] == "b"
    assert all(n.startswith(("a_", "A_")) for n in names[:3])
    assert names == sample_names(paths, root)  # the same again (resume relies on it)
    long = root / ("x" * 150) / ("y" * 150 + ".png")
    check_sample_name(sample_name(long, root))


def test_bad_sources_are_refused_with_one_line(tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="No images"):
        list_images(tmp_path / "empty")
    image = _png(tmp_path / "one.png")
    with pytest.raises(InvalidInputError, match="is an image"):
        list_images(image)


def test_the_series_package_loads_without_torch():
    """Listing, session and status are torch-free (the predictor loads torch on use)."""
    import subprocess
    import sys

    code = ("import sys; import napari_maskclip.series, napari_maskclip.series.status; "
            "print(sorted(m for m in ('torch', 'open_clip', 'napari', 'qtpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
