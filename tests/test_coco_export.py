"""``export-coco``: a dataset as a COCO instance file, checked with pycocotools and torchvision."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_api  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from napari_maskclip.cli import main  # noqa: E402
from napari_maskclip.errors import InvalidInputError  # noqa: E402
from napari_maskclip.export import export_sample, read_dataset  # noqa: E402
from napari_maskclip.export.coco import export_coco  # noqa: E402
from napari_maskclip.export.instances import instance_labels  # noqa: E402


def _scene(seed: int, h: int = 36, w: int = 44):
    """Labels with a ring (hole of another class), diagonal neighbours, tiny specks, ignore."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), np.uint8)
    labels[2:14, 2:16] = 1
    labels[5:9, 6:10] = 2  # hole in the ring of class 1
    labels[20:30, 20:34] = 3
    labels[14, 16] = 1  # touches the ring only diagonally
    labels[30:33, 5:8] = 2
    labels[rng.integers(0, h, 5), rng.integers(0, w, 5)] = 3  # specks
    labels[0:2, w - 4 :] = 255  # ignored corner
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    edited = np.zeros((h, w), bool)
    edited[:, : w // 3] = True
    return image, labels, edited


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "ds"
    for i in range(2):
        image, labels, edited = _scene(i)
        export_sample(root, f"img{i}", image, labels, "cat, dog; puppy, tree", edited=edited)
    _, labels, _ = _scene(9)
    export_sample(root, "maskonly", None, labels, "cat, dog; puppy, tree", edited=None)
    return root


def _load_quietly(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coco = COCO(str(path))
    assert not caught, [str(w.message) for w in caught]
    return coco


def test_round_trip_pixel_for_pixel(dataset, tmp_path):
    out = tmp_path / "instances.json"
    report = export_coco(dataset, out)
    assert report.skipped_mask_only == ["maskonly"] and report.images == 2
    coco = _load_quietly(out)
    ds = read_dataset(dataset)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "dog", "tree"]
    assert coco.getCatIds() == [1, 2, 3]  # category id = dataset label
    assert len(coco.getAnnIds()) == report.annotations
    for image in coco.loadImgs(coco.getImgIds()):
        sample = ds[image["napari_maskclip"]["sample"]]
        mask, edited = sample.read_mask(), sample.read_edited()
        assert image["file_name"] == f"images/{sample.name}.png"
        assert (image["height"], image["width"]) == mask.shape
        rebuilt = np.zeros(mask.shape, np.int64)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            m = coco.annToMask(ann).astype(bool)
            assert not (rebuilt[m] != 0).any(), "annotations overlap"
            rebuilt[m] = ann["category_id"]
            # One connected component of one class, with its own area, box and human share.
            assert len(instance_labels(m.astype(np.uint8))) == 1
            assert (mask[m] == ann["category_id"]).all()
            assert ann["area"] == m.sum() == mask_api.area(ann["segmentation"])
            rows, cols = np.nonzero(m)
            assert ann["bbox"] == [
                cols.min(),
                rows.min(),
                cols.max() - cols.min() + 1,
                rows.max() - rows.min() + 1,
            ]
            assert ann["bbox"] == mask_api.toBbox(ann["segmentation"]).tolist()
            assert ann["iscrowd"] == 0
            assert ann["napari_maskclip"]["human_fraction"] == pytest.approx(
                edited[m].mean(), abs=1e-6
            )
        ignored = mask == 255
        expected = np.where(ignored, 0, mask)
        assert (rebuilt == expected).all()  # holes kept, nothing lost
        stored = image["napari_maskclip"]["ignore"]
        assert (mask_api.decode(stored).astype(bool) == ignored).all()
    # The ring of class 1 has the dog as a hole: its annotation's mask excludes it.
    ring = [
        a
        for a in coco.loadAnns(coco.getAnnIds(imgIds=1))
        if a["category_id"] == 1 and a["area"] > 50
    ]
    assert len(ring) == 1 and not coco.annToMask(ring[0])[6, 7]


def test_connectivity_and_min_area(dataset, tmp_path):
    eight = export_coco(dataset, tmp_path / "c2.json", connectivity=2)
    four = export_coco(dataset, tmp_path / "c1.json", connectivity=1)
    assert four.annotations > eight.annotations  # the diagonal neighbour splits off
    big = export_coco(dataset, tmp_path / "big.json", min_area=10)
    assert big.dropped_small > 0 and big.annotations == four.annotations - big.dropped_small - (
        four.annotations - eight.annotations
    )
    areas = [a["area"] for a in json.loads((tmp_path / "big.json").read_text())["annotations"]]
    assert min(areas) >= 10


def test_torchvision_coco_detection_reads_it(dataset, tmp_path):
    from torchvision.datasets import CocoDetection

    out = tmp_path / "instances.json"
    export_coco(dataset, out)
    data = CocoDetection(str(dataset), str(out))
    assert len(data) == 2
    image, targets = data[0]
    assert image.size == (44, 36)
    assert targets and all(t["image_id"] == 1 for t in targets)
    assert {t["category_id"] for t in targets} <= {1, 2, 3}


def test_unknown_edits_give_null_and_uint16_datasets(tmp_path):
    names = [f"c{i}" for i in range(300)]  # uint16 masks, ignore 65535
    labels = np.zeros((12, 12), np.uint16)
    labels[2:5, 2:5] = 299
    labels[8:, 8:] = 65535
    export_sample(
        tmp_path / "big", "a", np.zeros((12, 12, 3), np.uint8), labels, names, edited=None
    )
    out = tmp_path / "big.json"
    report = export_coco(tmp_path / "big", out)
    doc = json.loads(out.read_text())
    assert report.annotations == 1 and len(doc["categories"]) == 300
    ann = doc["annotations"][0]
    assert ann["category_id"] == 299 and ann["area"] == 9
    assert ann["napari_maskclip"]["human_fraction"] is None


def test_output_file_rules(dataset, tmp_path, capsys):
    out = tmp_path / "instances.json"
    assert main(["export-coco", str(dataset), "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr()
    assert "annotation(s)" in text.out and "mask-only" in text.err
    before = out.read_bytes()
    assert main(["export-coco", str(dataset), "--out", str(out), "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert (
        main(
            [
                "export-coco",
                str(dataset),
                "--out",
                str(out),
                "--overwrite",
                "--quiet",
                "--min-area",
                "1000",
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["annotations"] == []
    capsys.readouterr()
    foreign = tmp_path / "mine.json"
    foreign.write_text('{"my": "notes"}')
    with pytest.raises(InvalidInputError, match="not written by napari-maskclip"):
        export_coco(dataset, foreign, overwrite=True)
    assert foreign.read_text() == '{"my": "notes"}'
    for argv in (
        ["export-coco", str(tmp_path / "nope"), "--out", str(tmp_path / "x.json")],
        ["export-coco", str(dataset), "--out", str(tmp_path)],
        ["export-coco", str(dataset), "--out", str(tmp_path / "x.txt")],
    ):
        assert main([*argv, "--quiet"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err
