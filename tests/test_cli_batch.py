"""Batches of ``segment``/``predict``/``export``: every output file checked before any work,
files that are not ours never replaced, finished images skipped on a rerun, failed ones retried."""

from __future__ import annotations

import json
import os

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_maskclip.cli import main


def _model_args(files):
    config, ckpt = files
    return ["--model", str(config), "--pretrained", str(ckpt), "--templates", "single"]


def _image(path, seed=0, shape=(24, 32, 3)):
    iio.imwrite(path, (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8))
    return path


def _snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("name", ["a_labels.png", "a_confidence.tif"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_users_file_in_the_way_is_never_replaced(tmp_path, tiny_vit_files, capsys, name, overwrite):
    image = _image(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"my own file")
    args = ["segment", str(image), "--classes", "cat", "--out", str(out), "--quiet",
            *_model_args(tiny_vit_files)] + (["--overwrite"] if overwrite else [])
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not written by napari-maskclip" in err[0] and name in err[0]
    assert (out / name).read_bytes() == b"my own file"
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_rerun_skips_finished_images_and_retries_the_failed(tmp_path, tiny_vit_files, capsys,
                                                            monkeypatch):
    a, c = _image(tmp_path / "a.png", 0), _image(tmp_path / "c.png", 2)
    bad = tmp_path / "b.tif"
    data = np.ones((24, 32), dtype=np.float32)
    data[3, 3] = np.nan
    tifffile.imwrite(bad, data)
    out = tmp_path / "out"
    args = ["segment", str(a), str(bad), str(c), "--classes", "cat, dog", "--out", str(out),
            "--quiet", *_model_args(tiny_vit_files)]
    assert main(args) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert "b.tif" in err[-2] and "NaN" in err[-2]          # the failure, in one line
    assert "1 of 3 image(s) failed: b.tif" in err[-1]       # and the list at the end
    assert "Traceback" not in captured.err
    # The images after the failed one were done too.
    assert {"a_classes.json", "c_classes.json"} <= set(os.listdir(out))
    assert not (out / "b_classes.json").exists()
    done = _snapshot(out)

    tifffile.imwrite(bad, np.ones((24, 32), dtype=np.float32) * 0.5)  # the user fixes the image
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "skipped 2 finished images" in captured.out
    assert "b.tif: b_labels.png" in captured.out and "a.png:" not in captured.out
    assert (out / "b_classes.json").is_file()
    after = _snapshot(out)
    assert {k: after[k] for k in done} == done                # finished ones were not touched

    # Everything finished: nothing runs, not even the model load.
    import napari_maskclip.engine as engine

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine, "load_clip", no_load)
    assert main(args) == 0
    assert "skipped 3 finished images" in capsys.readouterr().out


def test_rerun_with_other_settings_or_a_changed_input_needs_overwrite(tmp_path, tiny_vit_files, capsys):
    image = _image(tmp_path / "a.png")
    out = tmp_path / "out"
    base = ["segment", str(image), "--out", str(out), "--quiet", *_model_args(tiny_vit_files)]
    assert main(base + ["--classes", "cat"]) == 0
    table = json.loads((out / "a_classes.json").read_text())
    assert table["run"]["command"] == "segment" and table["run"]["source"]["path"] == str(image.resolve())
    before = _snapshot(out)
    assert main(base + ["--classes", "cat", "--temperature", "50"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    _image(image, seed=5)                                      # same name, new content
    os.utime(image, ns=(1, 10**18))
    assert main(base + ["--classes", "cat"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert _snapshot(out) == before
    # --overwrite replaces our own files; a confidence map now skipped is removed with its table.
    assert main(base + ["--classes", "cat", "--overwrite", "--no-confidence"]) == 0
    assert sorted(os.listdir(out)) == ["a_classes.json", "a_labels.png"]


def test_output_folder_problems_are_found_before_the_model_loads(tmp_path, tiny_vit_files, capsys):
    image = _image(tmp_path / "a.png")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    long = _image(tmp_path / ("x" * 250 + ".png"))
    cases = [
        ([str(image), "--out", str(a_file)], "is a file"),
        ([str(image), "--out", str(a_file / "sub")], "is a file"),
        ([str(long), "--out", str(tmp_path / "o")], "at most 255"),
    ]
    for extra, needle in cases:
        # A model that does not exist: reaching the model load would say "Unknown model".
        assert main(["segment", *extra, "--classes", "cat", "--quiet", "--model", "nope"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert a_file.read_text() == "x" and not (tmp_path / "o").exists()


def test_export_rerun_skips_finished_inputs_and_retries_the_failed(tmp_path, capsys):
    from napari_maskclip.export import read_dataset
    from napari_maskclip.image_files import write_label_image

    rng = np.random.default_rng(0)
    args = ["export", "--classes", "cat, dog", "--out", str(tmp_path / "ds"), "--quiet"]
    images, labels = [], []
    for stem in ("a", "b", "c"):
        iio.imwrite(tmp_path / f"{stem}.png", rng.integers(0, 256, (20, 26, 3), dtype=np.uint8))
        write_label_image(tmp_path / f"{stem}_lab.png", rng.integers(0, 3, (20, 26)).astype(np.uint8))
        images.append(str(tmp_path / f"{stem}.png"))
        labels.append(str(tmp_path / f"{stem}_lab.png"))
    write_label_image(tmp_path / "b_lab.png", np.full((20, 26), 7, dtype=np.uint8))  # not a class
    full = args + ["--images", *images, "--labels", *labels]
    assert main(full) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "b.png" in err[-2] and "1 of 3 image(s) failed: b.png" in err[-1]
    assert read_dataset(tmp_path / "ds").names == ["a", "c"]
    write_label_image(tmp_path / "b_lab.png", np.ones((20, 26), dtype=np.uint8))  # fixed
    assert main(full) == 0
    out = capsys.readouterr().out
    assert "skipped 2 finished images" in out and "1 sample(s)" in out.splitlines()[-1]
    assert read_dataset(tmp_path / "ds").names == ["a", "c", "b"]


def test_a_stack_given_to_segment_is_segmented_slice_by_slice(tmp_path, tiny_vit_files, capsys):
    """(Stacks in depth: test_cli_stacks.py.)"""
    stack = tmp_path / "zstack.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).integers(0, 4000, (5, 24, 32)).astype(np.uint16),
                     photometric="minisblack")
    assert main(["segment", str(stack), "--classes", "cat, dog", "--out", str(tmp_path / "o"),
                 "--quiet", *_model_args(tiny_vit_files)]) == 0
    assert "(5 slices)" in capsys.readouterr().out
    assert tifffile.imread(tmp_path / "o" / "zstack_labels.tif").shape == (5, 24, 32)
    assert tifffile.imread(tmp_path / "o" / "zstack_confidence.tif").shape == (2, 5, 24, 32)


@pytest.mark.parametrize("confidence", [True, False])
def test_summary_lists_every_file_written(tmp_path, tiny_vit_files, capsys, confidence):
    image = _image(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["segment", str(image), "--classes", "cat", "--out", str(out), "--quiet",
            *_model_args(tiny_vit_files)] + ([] if confidence else ["--no-confidence"])
    assert main(args) == 0
    printed = capsys.readouterr().out
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(["a_labels.png", "a_classes.json"]
                             + (["a_confidence.tif"] if confidence else []))
    assert all(name in printed for name in written), printed
