"""``napari-maskclip import``: COCO instance files, VOC folders and image + mask folders become
datasets of human labels, through the project's own exporter; bad input is one line or a rule."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_api  # noqa: E402

from napari_maskclip.cli import main  # noqa: E402
from napari_maskclip.errors import DatasetError  # noqa: E402
from napari_maskclip.export import export_sample, read_dataset  # noqa: E402
from napari_maskclip.export.coco import export_coco  # noqa: E402
from napari_maskclip.export.coco_masks import counts_to_string, encode_mask, polygons_to_mask  # noqa: E402
from napari_maskclip.export.import_coco import plan_coco  # noqa: E402
from napari_maskclip.export.import_folders import VOC_CLASSES, voc_colormap  # noqa: E402
from napari_maskclip.export.importing import import_plan  # noqa: E402

from hang_guard import HANG_GUARD_S  # noqa: E402

H, W = 40, 50


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    if mode == "P":
        image.putpalette(voc_colormap().ravel().tolist())
    image.save(path)
    return path


def _poly_mask(poly, h=H, w=W):
    """What pycocotools makes of a polygon: the reference geometry."""
    return mask_api.decode(mask_api.merge(mask_api.frPyObjects([poly], h, w))).astype(bool)


def _rect(r0, r1, c0, c1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


@pytest.fixture
def coco(tmp_path):
    """A COCO file with every rule in play, and the mask each importable image must get."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "coco"
    images = {
        name: _png(folder / "imgs" / name, (rng.random((H, W, 3)) * 255).astype(np.uint8))
        for name in ("a.png", "b.png", "bad.png")
    }
    _png(folder / "imgs" / "wrong.png", np.zeros((12, 12), np.uint8))
    big = [5, 5, 30, 5, 30, 25, 5, 25]  # cat, large
    small = _rect(10, 15, 10, 18)  # dog, inside the cat
    crowd = _rect(30, 38, 30, 45)
    unknown = [0, 30, 8, 30, 8, 35, 0, 35]
    outside = [40, -10, 70, -10, 70, 8, 40, 8]  # partly outside: clipped
    anns = [
        {"id": 1, "image_id": 1, "category_id": 10, "segmentation": [big], "iscrowd": 0},
        {
            "id": 2,
            "image_id": 1,
            "category_id": 20,
            "iscrowd": 0,
            "segmentation": {"size": [H, W], "counts": encode_mask(small)},
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 10,
            "iscrowd": 1,
            "segmentation": {
                "size": [H, W],
                "counts": counts_to_string(encode_mask(crowd), (H, W)),
            },
        },
        {"id": 4, "image_id": 1, "category_id": 99, "segmentation": [unknown], "iscrowd": 0},
        {"id": 5, "image_id": 1, "category_id": 20, "segmentation": [outside], "iscrowd": 0},
        {"id": 6, "image_id": 1, "category_id": 10, "segmentation": [], "bbox": [0, 36, 4, 4]},
        {"id": 7, "image_id": 777, "category_id": 10, "segmentation": [big]},
        {
            "id": 8,
            "image_id": 3,
            "category_id": 10,
            "segmentation": {"size": [H + 1, W], "counts": [H * W]},
        },  # wrong size: skip image
        {"id": 9, "image_id": 2, "category_id": 10, "segmentation": [[0, 0, 1e12, 0, 1e12, 1e12]]},
    ]
    doc = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "b.png", "width": W, "height": H},
            {"id": 3, "file_name": "bad.png", "width": W, "height": H},
            {"id": 4, "file_name": "missing.png", "width": W, "height": H},
            {"id": 5, "file_name": "wrong.png", "width": 10, "height": 10},
            {"id": 6, "file_name": "huge.png", "width": 100000, "height": 100000},
            {"id": 7, "file_name": 12},
        ],
        "annotations": anns,
        "categories": [
            {"id": 30, "name": "bird"},
            {"id": 10, "name": "cat"},
            {"id": 20, "name": "dog"},
        ],
    }
    path = folder / "annotations" / "instances.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc))
    # Labels by category id: cat 1, dog 2, bird 3. Larger first, smaller wins; crowd, unknown
    # categories and mask-less boxes: ignore.
    a = np.zeros((H, W), np.uint8)
    a[crowd] = 255
    a[_poly_mask(big)] = 1
    a[_poly_mask(outside)] = 2
    a[_poly_mask(unknown)] = 255
    a[_rect(36, 40, 0, 4)] = 255
    a[small] = 2
    b = np.where(polygons_to_mask([[0, 0, 1e12, 0, 1e12, 1e12]], (H, W)), 1, 0).astype(np.uint8)
    return {
        "path": path,
        "images": folder / "imgs",
        "expected": {"a": a, "b": b},
        "pixels": {k: np.asarray(Image.open(v)) for k, v in images.items()},
    }


def test_coco_rules(coco, tmp_path, capsys):
    out = tmp_path / "ds"
    rc = main(
        ["import", str(coco["path"]), "--images", str(coco["images"]), "--out", str(out), "--quiet"]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    ds = read_dataset(out)
    assert ds.class_names == ["background", "cat", "dog", "bird"]
    assert sorted(ds.names) == ["a", "b"]
    for name in ("a", "b"):
        sample = ds[name]
        assert (sample.read_mask() == coco["expected"][name]).all(), name
        assert sample.read_edited().all()  # human labels
        assert (sample.read_image() == coco["pixels"][f"{name}.png"]).all()
        assert sample.provenance["labelled_by"] == "human"
        assert sample.provenance["imported_from"]["coco_category_to_label"] == {
            "10": 1,
            "20": 2,
            "30": 3,
        }
    # The far-away polygon covers the upper-right triangle, without crashing pycocotools.
    assert coco["expected"]["b"][0, W - 1] == 1 and coco["expected"]["b"][H - 1, 0] == 0
    notes = captured.err
    for text in (
        "image file not found",
        "image size differs",
        "pixel limit",
        "cannot be decoded",
        "malformed image entries",
        "pixels covered by more than one instance",
        "crowd pixels set to ignore",
        "unknown category ids",
        "without a mask",
        "image ids not in 'images'",
    ):
        assert text in notes, text
    assert "2 sample(s) imported" in captured.out


def test_coco_crowd_as_class_and_strict(coco, tmp_path, capsys):
    plan = plan_coco(coco["path"], images_dir=coco["images"], crowd="class")
    report = import_plan(plan, tmp_path / "ds")
    mask = read_dataset(tmp_path / "ds")["a"].read_mask()
    assert (mask[32:36, 32:44] == 1).all()
    assert report.n_skipped == 5
    rc = main(
        [
            "import",
            str(coco["path"]),
            "--images",
            str(coco["images"]),
            "--out",
            str(tmp_path / "strict"),
            "--strict",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and "cannot be imported" in err
    assert not (tmp_path / "strict").exists()


def _scene_dataset(root):
    rng = np.random.default_rng(5)
    for i in range(2):
        labels = rng.integers(0, 4, (24, 30)).astype(np.uint8)
        labels[:3, :3] = 255
        image = (rng.random((24, 30, 3)) * 255).astype(np.uint8)
        export_sample(root, f"s{i}", image, labels, "cat, dog; puppy, tree", edited=True)
    return read_dataset(root)


def test_round_trip_through_coco(tmp_path):
    original = _scene_dataset(tmp_path / "ds")
    export_coco(original.path, tmp_path / "inst.json", connectivity=1)
    plan = plan_coco(tmp_path / "inst.json", images_dir=original.path)
    report = import_plan(plan, tmp_path / "back")
    back = read_dataset(tmp_path / "back")
    assert report.samples == ["s0", "s1"] and back.class_names == original.class_names
    assert back.classes.classes[1].synonyms == ("dog", "puppy")  # synonyms travel along
    for sample in original:
        assert (back[sample.name].read_mask() == sample.read_mask()).all()
        assert (back[sample.name].read_image() == sample.read_image()).all()


def _voc(root):
    rng = np.random.default_rng(1)
    cmap = voc_colormap()
    masks = {}
    for stem, jpg in (
        ("2007_000001", True),
        ("2007_000002", True),
        ("2007_000003", True),
        ("2007_000004", False),
    ):
        if jpg:
            root.joinpath("JPEGImages").mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(
                root / "JPEGImages" / f"{stem}.jpg"
            )
        labels = np.zeros((20, 24), np.uint8)
        labels[4:12, 5:15] = 15  # person
        labels[4:12, 15] = 255  # object border
        labels[14:18, 2:6] = 8  # cat
        masks[stem] = labels
    _png(root / "SegmentationClass" / "2007_000001.png", masks["2007_000001"], "P")
    _png(root / "SegmentationClass" / "2007_000002.png", cmap[masks["2007_000002"]])  # RGB colours
    bad = masks["2007_000003"].copy()
    bad[0, 0] = 30
    _png(root / "SegmentationClass" / "2007_000003.png", bad, "P")
    _png(root / "SegmentationClass" / "2007_000004.png", masks["2007_000004"], "P")
    split = root / "ImageSets" / "Segmentation"
    split.mkdir(parents=True)
    (split / "val.txt").write_text("2007_000001\n2007_000002\n")
    return masks


def test_voc_folder(tmp_path, capsys):
    root = tmp_path / "VOC2012"
    masks = _voc(root)
    assert main(["import", str(root), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "mask values that are not classes" in err and "image file not found" in err
    ds = read_dataset(tmp_path / "ds")
    assert ds.class_names == ["background", *VOC_CLASSES]
    assert ds.names == ["2007_000001", "2007_000002"]
    for name in ds.names:
        assert (ds[name].read_mask() == masks[name]).all()  # palette and RGB masks alike
        assert ds[name].read_edited().all()
    assert (
        main(["import", str(root), "--split", "val", "--out", str(tmp_path / "val"), "--quiet"])
        == 0
    )
    assert read_dataset(tmp_path / "val").names == ["2007_000001", "2007_000002"]
    assert "image(s) skipped" not in capsys.readouterr().out


def test_voc_labelmap(tmp_path):
    root = tmp_path / "cvat"
    (root / "JPEGImages").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages" / "x.png")
    (root / "labelmap.txt").write_text(
        "# label:color_rgb:parts:actions\nbackground:0,0,0::\nleaf:10,200,30::\nstem:200,10,10::\n"
    )
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:4] = (10, 200, 30)
    rgb[6:, :2] = (200, 10, 10)
    _png(root / "SegmentationClass" / "x.png", rgb)
    import_plan(
        __import__("napari_maskclip.export.import_folders", fromlist=["plan_voc"]).plan_voc(root),
        tmp_path / "ds",
    )
    ds = read_dataset(tmp_path / "ds")
    assert ds.class_names == ["background", "leaf", "stem"]
    mask = ds["x"].read_mask()
    assert (mask[:4] == 1).all() and (mask[6:, :2] == 2).all() and mask[5, 5] == 0


def test_image_and_mask_folders(tmp_path, capsys):
    import tifffile

    images, masks = tmp_path / "images", tmp_path / "masks"
    rng = np.random.default_rng(2)
    _png(images / "a.png", (rng.random((10, 12, 3)) * 255).astype(np.uint8))
    tifffile.imwrite(images / "b.tif", (rng.random((10, 12)) * 60000).astype(np.uint16))
    _png(images / "c.png", np.zeros((10, 12), np.uint8))  # no mask
    a = rng.integers(0, 3, (10, 12)).astype(np.uint8)
    a[0, :] = 9
    b = rng.integers(0, 3, (10, 12)).astype(np.uint16)
    _png(masks / "a.png", a)
    tifffile.imwrite(masks / "b_labels.tif", b)
    _png(masks / "orphan.png", a)
    (tmp_path / "classes.txt").write_text("leaf\nstem; stalk\n")
    assert (
        main(
            [
                "import",
                str(images),
                "--masks",
                str(masks),
                "--classes-file",
                str(tmp_path / "classes.txt"),
                "--ignore-index",
                "9",
                "--out",
                str(tmp_path / "ds"),
                "--quiet",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "1 image(s) skipped: no mask for the image" in err
    assert "masks without an image (left out): 1" in err
    ds = read_dataset(tmp_path / "ds")
    assert ds.class_names == ["background", "leaf", "stem"]
    assert ds.classes.classes[1].synonyms == ("stem", "stalk")
    assert (ds["a"].read_mask() == np.where(a == 9, 255, a)).all()
    assert (ds["b"].read_mask() == b).all()
    assert ds["b"].read_image().dtype == np.uint16  # kept as a TIFF
    # Headers over the pixel limit are skipped before any pixel is decoded.
    rc = main(["import", str(images), "--masks", str(masks), "--classes", "leaf, stem",
               "--max-pixels", "100", "--out", str(tmp_path / "small"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and "pixel limit" in err


def test_append_evaluate_and_refusals(tmp_path, capsys):
    root = tmp_path / "VOC2012"
    _voc(root)
    out = tmp_path / "ds"
    assert main(["import", str(root), "--split", "val", "--out", str(out), "--quiet"]) == 0
    before = (out / "dataset.json").read_text()
    # Same names again: refused before anything is written.
    assert main(["import", str(root), "--split", "val", "--out", str(out), "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "dataset.json").read_text() == before
    # Other classes: refused unless remapped.
    images, masks = tmp_path / "images", tmp_path / "masks"
    _png(images / "z.png", np.zeros((6, 6, 3), np.uint8))
    _png(masks / "z.png", np.full((6, 6), 1, np.uint8))
    argv = [
        "import",
        str(images),
        "--masks",
        str(masks),
        "--classes",
        "cat",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 1
    assert "cat" in capsys.readouterr().err and (out / "dataset.json").read_text() == before
    assert main([*argv, "--remap"]) == 0
    ds = read_dataset(out)
    assert ds.names == ["2007_000001", "2007_000002", "z"]
    assert (ds["z"].read_mask() == VOC_CLASSES.index("cat") + 1).all()
    # A hand export into the imported dataset appends with the same classes.
    export_sample(
        out, "painted", np.zeros((6, 6, 3), np.uint8), np.zeros((6, 6), np.uint8), list(VOC_CLASSES)
    )
    assert len(read_dataset(out)) == 4
    # Ground truth for evaluate: its own masks as predictions score 1, a wrong one less.
    import shutil

    pred = tmp_path / "pred"
    shutil.copytree(out / "masks", pred)
    capsys.readouterr()
    assert main(["evaluate", str(pred), str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["miou"] == pytest.approx(1.0) and result["n_images"] == 4
    Image.open(pred / "z.png").point(lambda v: 0).save(pred / "z.png")
    assert main(["evaluate", str(pred), str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["miou"] < 1.0


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_bad_coco_files_are_one_line(tmp_path, capsys):
    good_cats = [{"id": 1, "name": "cat"}]

    def doc(**kw):
        base = {"images": [], "annotations": [], "categories": good_cats}
        base.update(kw)
        return json.dumps(base)

    cases = {
        "malformed.json": ('{"images": [', "not valid JSON"),
        "list.json": ("[1, 2]", "JSON object"),
        "noanns.json": (json.dumps({"images": [], "categories": good_cats}), "'annotations'"),
        "panoptic.json": (
            doc(annotations=[{"segments_info": [], "file_name": "x.png"}]),
            "panoptic",
        ),
        "dupid.json": (doc(categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]), "twice"),
        "dupname.json": (
            doc(categories=[{"id": 1, "name": "Cat"}, {"id": 2, "name": "cat"}]),
            "twice",
        ),
        "nocats.json": (doc(categories=[]), "no categories"),
        "badcat.json": (doc(categories=[{"id": "1", "name": "cat"}]), "malformed"),
        "noimages.json": (doc(), "Nothing was imported"),
        "binary.json": (None, "UTF-8"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        if text is None:
            path.write_bytes(b'{"images": "\x80\x81"}')
        else:
            path.write_text(text)
        out = tmp_path / f"out-{name}"
        rc = main(["import", str(path), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 1, name
        assert "\n" not in err and "Traceback" not in err, (name, err)
        assert expected in err, (name, err)
        assert not out.exists(), name
    only_bg = _write(tmp_path / "bg.json", doc(categories=[{"id": 1, "name": "sky"}]))
    assert (
        main(["import", only_bg, "--background", "sky", "--out", str(tmp_path / "o"), "--quiet"])
        == 1
    )
    assert "only category is the background" in capsys.readouterr().err


def test_bad_cli_combinations(tmp_path, coco, capsys):
    voc = tmp_path / "VOC2012"
    _voc(voc)
    for argv, expected in (
        (["import", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], "does not exist"),
        (["import", str(coco["images"]), "--out", str(tmp_path / "o")], "Cannot tell"),
        (
            [
                "import",
                str(coco["images"]),
                "--masks",
                str(coco["images"]),
                "--out",
                str(tmp_path / "o"),
            ],
            "--classes",
        ),
        (
            ["import", str(coco["path"]), "--classes", "a", "--out", str(tmp_path / "o")],
            "categories",
        ),
        (["import", str(coco["path"]), "--split", "val", "--out", str(tmp_path / "o")], "--split"),
        (["import", str(voc), "--crowd", "class", "--out", str(tmp_path / "o")], "--crowd"),
        (
            ["import", str(voc), "--split", "nope", "--out", str(tmp_path / "o")],
            "Split list not found",
        ),
        (
            [
                "import",
                str(coco["path"]),
                "--images",
                str(tmp_path / "x"),
                "--out",
                str(tmp_path / "o"),
            ],
            "images folder",
        ),
    ):
        assert main([*argv, "--quiet"]) == 1, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and expected in err, (argv, err)
    assert not (tmp_path / "o").exists()


def test_import_refuses_foreign_folder(tmp_path, coco):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not empty and not a dataset"):
        import_plan(plan_coco(coco["path"], images_dir=coco["images"]), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_index_is_one_line_per_sample_and_reads_back(tmp_path):
    from napari_maskclip.export.writer import _index_text

    for info in ({"format": "x", "samples": []}, {"samples": [{"a": 1}]},
                 {"format": "x", "n": [1, 2], "samples": [{"a": 1, "b": [1, None]}, {"c": "é"}]}):
        text = _index_text(info)
        assert json.loads(text) == info
        assert sum(line.lstrip().startswith("{\"") for line in text.splitlines()) == len(info["samples"])
    ds = _scene_dataset(tmp_path / "ds")
    assert len(read_dataset(ds.path)) == 2


def test_coco_and_import_run_without_torch_or_ui(tmp_path):
    """The core modules do their whole job (export, COCO round trip) without torch or Qt."""
    import subprocess
    import sys

    code = f"""
import json, sys
import numpy as np
from napari_maskclip.export import export_sample
from napari_maskclip.export.coco import export_coco
from napari_maskclip.export.import_coco import plan_coco
from napari_maskclip.export.importing import import_plan
labels = np.zeros((8, 8), np.uint8); labels[2:5, 2:5] = 1
export_sample({str(tmp_path / "ds")!r}, "a", np.zeros((8, 8, 3), np.uint8), labels, "cat")
export_coco({str(tmp_path / "ds")!r}, {str(tmp_path / "i.json")!r})
import_plan(plan_coco({str(tmp_path / "i.json")!r}, images_dir={str(tmp_path / "ds")!r}),
            {str(tmp_path / "back")!r})
print(json.dumps(sorted(sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert "pycocotools" in modules and "napari_maskclip.export.import_coco" in modules
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "open_clip", "napari", "qtpy",
                                                        "PyQt5", "PyQt6", "PySide2", "PySide6")]
    assert heavy == [], heavy[:10]
    assert (tmp_path / "back" / "dataset.json").is_file()


# ---- names that leave the images folder (issue 21.1) -----------------------------------------
def _one_image_coco(folder, file_name):
    """A COCO file in ``folder`` naming one 8x8 image ``file_name`` (one polygon of class cat)."""
    doc = {
        "images": [{"id": 1, "file_name": file_name, "width": 8, "height": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                         "segmentation": [[1, 1, 6, 1, 6, 6]]}],
        "categories": [{"id": 1, "name": "cat"}],
    }
    path = folder / "instances.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "link", "linked-dir", "dotdot-inside"])
def test_coco_names_must_stay_inside_the_images_folder(tmp_path, capsys, kind):
    """`../`, an absolute path and a link leading out refuse the whole import (nothing written);
    a `..` that stays inside is fine."""
    secret = _png(tmp_path / "private" / "photo.png", np.full((8, 8, 3), 7, np.uint8))
    images = tmp_path / "coco"
    _png(images / "sub" / "ok.png", np.zeros((8, 8, 3), np.uint8))
    name = {
        "dotdot": "../private/photo.png",
        "absolute": str(secret),
        "link": "photo.png",
        "linked-dir": "elsewhere/photo.png",
        "dotdot-inside": "sub/../sub/ok.png",
    }[kind]
    if kind == "link":
        (images / "photo.png").symlink_to(secret)
    if kind == "linked-dir":
        (images / "elsewhere").symlink_to(secret.parent, target_is_directory=True)
    path = _one_image_coco(images, name)
    out = tmp_path / "ds"
    rc = main(["import", str(path), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    if kind == "dotdot-inside":
        assert rc == 0, err
        assert read_dataset(out).names == ["ok"]
        return
    assert rc == 1 and "\n" not in err, err
    assert "outside the images folder" in err and repr(name) in err and "--images" in err
    assert not out.exists()


def test_voc_and_mask_folders_refuse_links_and_split_names_that_leave(tmp_path, capsys):
    secret = _png(tmp_path / "private" / "photo.png", np.full((20, 24), 15, np.uint8), "P")
    # VOC: a split list naming a mask outside SegmentationClass/
    root = tmp_path / "VOC2012"
    _voc(root)
    (root / "ImageSets" / "Segmentation" / "evil.txt").write_text("2007_000001\n../../private/photo\n")
    rc = main(["import", str(root), "--split", "evil", "--out", str(tmp_path / "v1"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "outside the masks folder" in err and "../../private/photo.png" in err, err
    # VOC: a linked mask
    (root / "SegmentationClass" / "2007_000009.png").symlink_to(secret)
    shutil.copy(root / "JPEGImages" / "2007_000001.jpg", root / "JPEGImages" / "2007_000009.jpg")
    rc = main(["import", str(root), "--out", str(tmp_path / "v2"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "outside the masks folder" in err and "\n" not in err, err
    # images + masks: a linked image
    images, masks = tmp_path / "images", tmp_path / "masks"
    _png(images / "a.png", np.zeros((20, 24, 3), np.uint8))
    (images / "b.png").symlink_to(secret)
    for stem in "ab":
        _png(masks / f"{stem}.png", np.zeros((20, 24), np.uint8))
    rc = main(["import", str(images), "--masks", str(masks), "--classes", "cat",
               "--out", str(tmp_path / "m"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "outside the images folder" in err and "b.png" in err, err
    assert not any((tmp_path / d).exists() for d in ("v1", "v2", "m"))


def test_coco_round_trip_with_the_file_written_elsewhere(tmp_path, capsys):
    """export-coco DS --out elsewhere/x.json: file names stay relative to DS (CocoDetection's
    root); importing the file alone says to pass --images DS, and with it the round trip holds."""
    original = _scene_dataset(tmp_path / "ds")
    elsewhere = tmp_path / "shared" / "annotations"
    elsewhere.mkdir(parents=True)
    target = elsewhere / "x.json"
    assert main(["export-coco", str(original.path), "--out", str(target), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"--images {original.path.resolve()}" in err  # the export says so too
    rc = main(["import", str(target), "--out", str(tmp_path / "back"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and f"--images {original.path.resolve()}" in err, err
    assert not (tmp_path / "back").exists()
    assert main(["import", str(target), "--images", str(original.path), "--out",
                 str(tmp_path / "back"), "--quiet"]) == 0
    back = read_dataset(tmp_path / "back")
    for sample in original:
        assert (back[sample.name].read_mask() == sample.read_mask()).all()
        assert (back[sample.name].read_image() == sample.read_image()).all()


# ---- geometry bounded by the image, not by the numbers in the file (issue 21.2) ---------------
def test_far_polygon_coordinates_clip_exactly_and_never_overflow():
    """Coordinates up to the float64 limit clip to what the same polygon cut at the margin gives
    (the clipping's arithmetic must not overflow: ±1.7e308 used to reach pycocotools as NaN and
    crash the process)."""
    from napari_maskclip.export.coco_masks import MalformedSegmentation

    big = 1.7e308
    assert polygons_to_mask([[-big, 0, big, 0, 0, big]], (32, 32)).all()
    assert (polygons_to_mask([[2, 2, big, 2, big, 10, 2, 10]], (32, 32))
            == polygons_to_mask([[2, 2, 40, 2, 40, 10, 2, 10]], (32, 32))).all()
    narrow = polygons_to_mask([[10, -big, 12, big, 14, -big]], (32, 32))
    assert narrow[:, :9].sum() == 0 and narrow[:, 16:].sum() == 0 and narrow.sum() > 20
    # A zigzag between -1e300 and 1e300: each edge clips to the margin, but its outline is far
    # longer than any polygon a 32 x 32 image can hold, and is refused before pycocotools.
    zigzag = [v for i in range(2000) for v in ((-1e300 if i % 2 else 1e300), float(i % 32))]
    with pytest.raises(MalformedSegmentation, match="outline"):
        polygons_to_mask([zigzag], (32, 32))
