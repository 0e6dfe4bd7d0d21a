"""Batches on dask.distributed (``segment --workers/--scheduler``, ``segment_folder``): real
clusters, the demo model and synthetic scenes; outputs must equal the single-process run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytest.importorskip("distributed")

import imageio.v3 as iio  # noqa: E402

import napari_maskclip  # noqa: E402
from napari_maskclip.cli import main  # noqa: E402
from napari_maskclip.segment_batch import segment_folder, segment_tasks  # noqa: E402
from napari_maskclip.synthetic import make_scene  # noqa: E402

from hang_guard import HANG_GUARD_S  # noqa: E402

CLASSES = "red circle, green square, blue triangle"
SRC = str(Path(napari_maskclip.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Three synthetic scenes, and the results of the plain single-process loop on them."""
    root = tmp_path_factory.mktemp("dask")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        iio.imwrite(images / f"scene{i}.png", make_scene(seed=i, size=(96, 128)).image)
    good = sorted(images.glob("scene*.png"))
    reference = root / "reference"
    summary = segment_folder(good, reference, classes=CLASSES, model="demo",
                             settings=None, device="cpu", precision="fp32")
    assert summary.done == [p.name for p in good] and summary.ok
    return root, good, reference


def _labels(path: Path) -> np.ndarray:
    """The label indices of a palette PNG (colours come from the user's registry, not compared)."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.mode == "P"
        return np.asarray(image)


def _assert_same_results(got: Path, reference: Path, stems) -> None:
    for stem in stems:
        labels = _labels(got / f"{stem}_labels.png")
        assert labels.max() > 0  # something found, so equality below means something
        assert np.array_equal(labels, _labels(reference / f"{stem}_labels.png"))
        np.testing.assert_allclose(tifffile.imread(got / f"{stem}_confidence.tif"),
                                   tifffile.imread(reference / f"{stem}_confidence.tif"),
                                   atol=1e-5)
        table = json.loads((got / f"{stem}_classes.json").read_text())
        assert [c["name"] for c in table["classes"]] == [
            c["name"] for c in json.loads((reference / f"{stem}_classes.json").read_text())["classes"]]


def test_tasks_carry_no_weights_and_the_model_loads_once_per_process(scenes, tmp_path):
    """What goes to a worker is names and settings (small), and the per-process cache reuses
    the model: two batches with the same spec share one Segmenter."""
    import cloudpickle

    _, good, _ = scenes
    first = segment_tasks(good, tmp_path / "a", classes=CLASSES, model="demo", device="cpu",
                          precision="fp32").tasks
    second = segment_tasks(good, tmp_path / "b", classes=CLASSES, model="demo", device="cpu",
                           precision="fp32").tasks
    assert first[0].run(lambda step: None).startswith("scene0.png: scene0_labels.png")
    make_first = first[0].run.__closure__
    runs = [c.cell_contents for c in make_first if type(c.cell_contents).__name__ == "SegmentRun"]
    others = [c.cell_contents for c in second[0].run.__closure__
              if type(c.cell_contents).__name__ == "SegmentRun"]
    assert runs and others and runs[0] is not others[0]
    assert runs[0].segmenter() is others[0].segmenter()  # loaded once, reused
    assert len(cloudpickle.dumps(first[1])) < 200_000  # the demo model's weights are ~MBs


@pytest.mark.slow
def test_workers_match_the_single_process_run_a_bad_image_fails_alone_and_reruns_skip(
        scenes, tmp_path, capsys):
    root, good, reference = scenes
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a PNG")
    out = tmp_path / "out"
    args = ["segment", *map(str, good), str(bad), "--classes", CLASSES, "--model", "demo",
            "--device", "cpu", "--precision", "fp32", "--out", str(out), "--quiet"]
    assert main(args + ["--workers", "2"]) == 1
    captured = capsys.readouterr()
    assert "error: broken.png:" in captured.err
    assert "1 of 4 image(s) failed: broken.png" in captured.err
    assert sorted(line.split(":")[0] for line in captured.out.splitlines()) == [
        p.name for p in good]
    _assert_same_results(out, reference, [p.stem for p in good])
    assert not list(out.glob("broken*"))

    # The rerun redoes only the bad image (which still fails), saying how many it skipped.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(args + ["--workers", "2"]) == 1
    captured = capsys.readouterr()
    assert "skipped 3 finished images" in captured.out
    assert "error: broken.png:" in captured.err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:  # the child has its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", *argv], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _scheduler_address(info: Path, scheduler: subprocess.Popen, log: Path) -> str:
    """The address in the scheduler's file, once that file is complete. The scheduler writes it
    in place (not atomically), so the file existing is not the sign: the JSON parsing is. Polls
    while the scheduler lives; HANG_GUARD_S only stops a scheduler that never writes it."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        assert scheduler.poll() is None, log.read_text()
        try:
            return json.loads(info.read_text())["address"]
        except (OSError, ValueError, KeyError):
            pass  # not written yet, or half written
        assert time.monotonic() < deadline, "the scheduler never wrote its file: " + log.read_text()
        time.sleep(0.05)  # polling interval only: the loop waits for the file, not for a time


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.slow
def test_an_external_scheduler_and_worker_give_the_same_results(scenes, tmp_path):
    """``dask scheduler`` and ``dask worker ADDRESS`` as processes on 127.0.0.1: the API with
    ``scheduler=`` and the CLI with ``--scheduler`` write what the single-process loop wrote."""
    _, good, reference = scenes
    info = tmp_path / "scheduler.json"
    scheduler = _start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                        "--no-dashboard", "--scheduler-file", str(info)], tmp_path / "s.log")
    worker = None
    try:
        address = _scheduler_address(info, scheduler, tmp_path / "s.log")
        assert address.startswith("tcp://127.0.0.1:")
        worker = _start(["distributed.cli.dask_worker", address, "--nthreads", "1",
                         "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1"],
                        tmp_path / "w.log")
        summary = segment_folder(good[:2], tmp_path / "api", classes=CLASSES, model="demo",
                                 device="cpu", precision="fp32", scheduler=address)
        assert summary.done and sorted(summary.done) == [p.name for p in good[:2]]
        assert summary.ok and summary.skipped == 0
        _assert_same_results(tmp_path / "api", reference, [p.stem for p in good[:2]])

        # The CLI on the same cluster: the two finished ones are skipped, the third is done.
        assert main(["segment", *map(str, good), "--classes", CLASSES, "--model", "demo",
                     "--device", "cpu", "--precision", "fp32", "--out", str(tmp_path / "api"),
                     "--quiet", "--scheduler", address]) == 0
        _assert_same_results(tmp_path / "api", reference, [p.stem for p in good])
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                _stop(proc)
    assert scheduler.returncode is not None and (worker is None or worker.returncode is not None)


def test_workers_and_scheduler_exclude_each_other_and_need_a_positive_count(scenes, capsys):
    _, good, _ = scenes
    base = ["segment", str(good[0]), "--classes", CLASSES, "--model", "demo", "--out", "x"]
    for extra in (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], ["--workers", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        assert exc.value.code == 2
    capsys.readouterr()


@pytest.mark.slow
def test_predict_on_workers_matches_the_plain_loop(scenes, tmp_path, capsys):
    """``predict --workers 2``: each worker loads the student checkpoint itself; same files."""
    import torch
    from test_student_train import random_embeddings, shapes_data

    from napari_maskclip.student import TrainSettings, train

    _, good, _ = scenes
    student = tmp_path / "student.safetensors"
    settings = TrainSettings(iterations=4, batch_size=4, crop_size=48, backbone="tiny",
                             backbone_weights="random", lr=0.05, val_fraction=0.2,
                             val_interval=0, save_interval=0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(shapes_data(8, size=48), student, settings=settings,
              class_embeddings=random_embeddings(4), device="cpu")
    finally:
        torch.set_num_threads(before)
    base = ["predict", *map(str, good), "--student", str(student), "--device", "cpu", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "plain")]) == 0
    assert main(base + ["--out", str(tmp_path / "dask"), "--workers", "2"]) == 0
    capsys.readouterr()
    for stem in (p.stem for p in good):
        assert np.array_equal(_labels(tmp_path / "dask" / f"{stem}_labels.png"),
                              _labels(tmp_path / "plain" / f"{stem}_labels.png"))
        np.testing.assert_allclose(tifffile.imread(tmp_path / "dask" / f"{stem}_confidence.tif"),
                                   tifffile.imread(tmp_path / "plain" / f"{stem}_confidence.tif"),
                                   atol=1e-5)
