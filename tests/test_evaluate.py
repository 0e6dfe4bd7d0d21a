"""Evaluation: the confusion matrix and scores against hand computation; folders; the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from napari_maskclip.cli import main
from napari_maskclip.errors import InvalidInputError
from napari_maskclip.evaluate import (
    confusion_matrix,
    evaluate_arrays,
    evaluate_folders,
    scores_from_confusion,
)
from napari_maskclip.image_files import write_label_image

# 3 classes, one ignored pixel, one prediction that is not a class (255).
GT = np.array([[0, 0, 1, 1],
               [1, 2, 2, 255]], np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [2, 2, 255, 0]], np.uint8)
# Hand count over the 7 scored pixels, rows = truth, columns = prediction 0, 1, 2, not-a-class:
#   truth 0: (0,0)->0, (0,1)->1                 -> [1, 1, 0, 0]
#   truth 1: (0,2)->1, (0,3)->1, (1,0)->2       -> [0, 2, 1, 0]
#   truth 2: (1,1)->2, (1,2)->255               -> [0, 0, 1, 1]
HAND_CM = np.array([[1, 1, 0, 0],
                    [0, 2, 1, 0],
                    [0, 0, 1, 1]])
# IoU = TP / (GT + PRED - TP): class 0: 1/(2+1-1) = 1/2; class 1: 2/(3+3-2) = 1/2;
# class 2: 1/(2+2-1) = 1/3. Pixel accuracy 4/7.
HAND_IOU = [1 / 2, 1 / 2, 1 / 3]


def test_confusion_matrix_matches_hand_count():
    np.testing.assert_array_equal(confusion_matrix(PRED, GT, 3, ignore_index=255), HAND_CM)


def test_scores_match_hand_computation():
    scores = scores_from_confusion(HAND_CM, ["bg", "a", "b"], n_images=1)
    np.testing.assert_allclose(scores.iou, HAND_IOU)
    assert scores.miou == pytest.approx(sum(HAND_IOU) / 3)
    assert scores.pixel_accuracy == pytest.approx(4 / 7)
    np.testing.assert_allclose(scores.accuracy, [1 / 2, 2 / 3, 1 / 2])
    assert scores.unpredicted_pixels == 1
    out = scores.to_dict()
    assert out["per_class_iou"] == pytest.approx({"bg": 0.5, "a": 0.5, "b": 1 / 3})
    assert out["n_images"] == 1 and out["n_pixels"] == 7


def test_classes_absent_from_truth_and_prediction_are_left_out_of_the_miou():
    gt = np.array([[0, 1]], np.uint8)
    pred = np.array([[0, 3]], np.uint8)  # class 3 predicted but absent: IoU 0, counted
    scores = scores_from_confusion(confusion_matrix(pred, gt, 5))
    assert math.isnan(scores.iou[2]) and math.isnan(scores.iou[4])  # absent everywhere
    assert scores.iou[3] == 0.0 and scores.iou[1] == 0.0 and scores.iou[0] == 1.0
    assert scores.miou == pytest.approx(1 / 3)
    assert scores.to_dict()["per_class_iou"]["class 2"] is None


def test_accumulating_over_images_equals_one_big_image():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 4, (9, 11)) for _ in range(3)]
    gts = [rng.integers(0, 4, (9, 11)) for _ in range(3)]
    total = evaluate_arrays(zip(preds, gts), 4)
    joined = scores_from_confusion(confusion_matrix(np.concatenate(preds), np.concatenate(gts), 4))
    np.testing.assert_array_equal(total.confusion, joined.confusion)
    assert total.n_images == 3


def test_ground_truth_outside_the_classes_is_an_error():
    with pytest.raises(InvalidInputError, match="label 7"):
        confusion_matrix(np.zeros((2, 2), np.uint8), np.full((2, 2), 7, np.uint8), 3)


def _write_segment_result(folder, stem, labels, class_names):
    """A folder shaped like `napari-maskclip segment` output (labels + classes JSON)."""
    from napari_maskclip.classes import class_colors

    folder.mkdir(parents=True, exist_ok=True)
    write_label_image(folder / f"{stem}_labels.png", labels, class_colors(class_names))
    table = {
        "classes": [{"index": i, "name": n, "synonyms": [n]} for i, n in enumerate(class_names, 1)],
        "background": {"index": 0, "names": ["background"], "threshold": None},
        "files": {"labels": f"{stem}_labels.png", "confidence": None},
    }
    (folder / f"{stem}_classes.json").write_text(json.dumps(table))


def test_folders_pair_by_stem_and_remap_predictions_by_class_name(tmp_path):
    from napari_maskclip.export import export_sample

    gt = np.array([[0, 1, 2, 2]], np.uint8)
    export_sample(tmp_path / "ds", "img1", None, gt, "cat, dog")
    export_sample(tmp_path / "ds", "img2", None, gt[:, ::-1].copy(), "cat, dog")
    # Predictions from a run with the classes in the other order (1 = dog, 2 = cat).
    _write_segment_result(tmp_path / "pred", "img1", np.array([[0, 2, 1, 1]], np.uint8), ["dog", "cat"])
    _write_segment_result(tmp_path / "pred", "extra", np.array([[0, 0, 0, 0]], np.uint8), ["dog", "cat"])
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ds")
    assert result.matched == ["img1"] and result.missing_predictions == ["img2"]
    assert result.unmatched_predictions == ["extra"] and result.remapped_by_name
    assert result.scores.miou == pytest.approx(1.0) and result.scores.class_names == ["background", "cat", "dog"]


def test_cli_prints_a_table_then_one_json_line(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    write_label_image(tmp_path / "gt" / "x.png", GT)
    write_label_image(tmp_path / "pred" / "x_labels.png", PRED)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classes": [
        {"index": 0, "name": "bg", "background": True}, {"index": 1, "name": "a"},
        {"index": 2, "name": "b"}]}))
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--classes", str(classes)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["class", "IoU"]
    assert any(line.startswith("a ") and "50.00" in line for line in lines)
    out = json.loads(lines[-1])
    assert out["miou"] == pytest.approx(sum(HAND_IOU) / 3)
    assert out["pixel_accuracy"] == pytest.approx(4 / 7)
    assert out["per_class_iou"] == pytest.approx({"bg": 0.5, "a": 0.5, "b": 1 / 3})
    assert out["n_images"] == 1


def test_cli_without_any_match_fails_with_one_line(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    write_label_image(tmp_path / "gt" / "x.png", GT)
    write_label_image(tmp_path / "pred" / "y.png", PRED)
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "paired by file name" in err[0]


def test_cli_refuses_the_same_folder_twice_with_one_line(tmp_path, capsys):
    from napari_maskclip.export import export_sample

    export_sample(tmp_path / "ds", "img", None, np.array([[0, 1, 1]], np.uint8), "cat")
    # The same folder, the same folder spelled another way, and a dataset against its own masks.
    for pred, gt in [(tmp_path / "ds", tmp_path / "ds"),
                     (tmp_path / "ds" / "masks" / "..", tmp_path / "ds"),
                     (tmp_path / "ds" / "masks", tmp_path / "ds")]:
        assert main(["evaluate", str(pred), str(gt)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "always give" in err[0] and "100 %" in err[0], err
