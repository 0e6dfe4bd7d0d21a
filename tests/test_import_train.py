"""End to end: an imported COCO dataset trains a student on its human labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pycocotools")

from napari_maskclip.cli import main  # noqa: E402
from napari_maskclip.student import read_checkpoint_meta  # noqa: E402
from napari_maskclip.student.data import load_training_data  # noqa: E402

TINY = [
    "--backbone",
    "tiny",
    "--backbone-weights",
    "random",
    "--crop-size",
    "32",
    "--batch-size",
    "2",
    "--val-every",
    "0",
    "--quiet",
]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_coco(folder):
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(4):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(
            folder / f"im{i}.png"
        )
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": 48, "height": 40})
        x, y = 4 + 3 * i, 6 + 2 * i
        annotations.append(
            {
                "id": 2 * i + 1,
                "image_id": i + 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[x, y, x + 20, y, x + 20, y + 14, x, y + 14]],
            }
        )
        annotations.append(
            {
                "id": 2 * i + 2,
                "image_id": i + 1,
                "category_id": 2,
                "iscrowd": 0,
                "segmentation": [[30, 25, 44, 25, 37, 38]],
            }
        )
    path = folder / "instances.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "triangle"}],
            }
        )
    )
    return path


def test_import_then_train(tmp_path, tiny_vit_files, capsys):
    coco = _tiny_coco(tmp_path)
    ds = tmp_path / "ds"
    assert main(["import", str(coco), "--out", str(ds), "--quiet"]) == 0
    data = load_training_data([ds])
    assert len(data.samples) == 4 and not any(s.needs_teacher for s in data.samples)  # human labels
    config, weights = tiny_vit_files
    ckpt = tmp_path / "student.safetensors"
    # No model is recorded in an imported dataset: the CLIP for the class embeddings is named.
    assert main(["train", str(ds), "--out", str(ckpt), "--iterations", "5", *TINY]) == 1
    assert "--model" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                str(ds),
                "--out",
                str(ckpt),
                "--iterations",
                "5",
                "--model",
                str(config),
                "--pretrained",
                str(weights),
                *TINY,
            ]
        )
        == 0
    )
    meta = read_checkpoint_meta(ckpt)
    assert ckpt.is_file() and meta["iteration"] == 5 and meta["complete"]
    assert [c["synonyms"][0] for c in meta["classes"]] == ["square", "triangle"]
