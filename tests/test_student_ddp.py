"""Data-parallel student training: real ``torchrun`` processes (gloo on the CPU), nothing mocked.

The configuration has frozen batch norm (``--frozen-batch-norm``), so two ranks compute exactly
what one process computes on the same global batch; half of every image's pixels are a person's
labels and the other half come from the frozen CLIP teacher (which runs on each rank's share),
every other image is mostly ignored (255) and crops larger than the images are padded with
ignored pixels, so the ranks count very different numbers of pixels (the loss normalisation must
use the global count, else the two runs part).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_maskclip.cli import main
from napari_maskclip.export import export_sample
from napari_maskclip.student import TrainSettings, load_checkpoint, read_checkpoint_meta, train
from napari_maskclip.student.data import augment_batch, iteration_rng
from napari_maskclip.student.distributed import Ranks

from foreground import sigint_as_in_a_terminal
from hang_guard import HANG_GUARD_S
from test_student_train import COLOURS, random_embeddings, shapes_data

#: The torchrun tests start two Python processes each (about a minute).
slow = pytest.mark.slow

SRC = Path(__file__).resolve().parents[1] / "src"
OPTIONS = ["--backbone", "tiny", "--backbone-weights", "random", "--crop-size", "48",
           "--batch-size", "4", "--val-every", "2", "--save-every", "0", "--frozen-batch-norm",
           "--self-train-fraction", "0.5", "--lr", "0.05", "--device", "cpu", "--quiet"]


@pytest.fixture
def dataset(tmp_path, tiny_vit_files):
    """Six 40x40 shape images; the left half of each is a person's labels, the teacher labels
    the rest (the tiny random ViT recorded as the dataset's model); odd images are ignored (255)
    but for a strip 8 pixels wide."""
    config, ckpt = tiny_vit_files
    provenance = {"model": str(config), "pretrained": str(ckpt),
                  "settings": {"templates": "single", "denoise": False}}
    folder = tmp_path / "ds"
    for i, sample in enumerate(shapes_data(6, size=40).samples):
        labels = np.where(sample.labels < 0, 255, sample.labels).astype(np.uint8)
        if i % 2:
            labels[:, 8:] = 255
        edited = np.zeros(labels.shape, bool)
        edited[:, : labels.shape[1] // 2] = True
        export_sample(folder, f"img{i}", sample.image, labels, list(COLOURS), edited=edited,
                      provenance=provenance)
    return folder


def _torchrun(nproc: int, args: list[str],
             timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", NAPARI_MASKCLIP_DIST_TIMEOUT="120")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "napari_maskclip.cli", "train", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _weight_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between the two checkpoints' weights."""
    sa, sb = load_checkpoint(a).model_state, load_checkpoint(b).model_state
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


@slow
def test_two_processes_match_one_and_resume_with_one(dataset, tmp_path):
    two = tmp_path / "two" / "student.safetensors"
    done = _torchrun(2, [str(dataset), "--out", str(two), "--iterations", "4", *OPTIONS])
    assert done.returncode == 0, done.stderr[-3000:]
    # One checkpoint (and its lock), nothing from rank 1, one summary line (rank 0's).
    assert sorted(p.name for p in two.parent.iterdir()) == [f".{two.name}.lock", two.name]
    assert done.stdout.count("4 iterations") == 1, done.stdout
    meta = read_checkpoint_meta(two)
    assert meta["world_size"] == 2 and meta["iteration"] == 4 and meta["complete"]
    assert [h["iteration"] for h in meta["history"]] == [1, 2, 3, 4]
    assert any(h.get("val_miou") is not None for h in meta["history"])  # rank 0 validated

    one = tmp_path / "one" / "student.safetensors"
    assert main(["train", str(dataset), "--out", str(one), "--iterations", "4", *OPTIONS]) == 0
    meta_one = read_checkpoint_meta(one)
    assert meta_one["world_size"] == 1
    # The same global batches: the same losses and, to float tolerance, the same weights.
    difference = _weight_difference(two, one)
    print(f"largest weight difference, 2 processes vs 1: {difference:.2e}")
    assert difference < 1e-5
    np.testing.assert_allclose([h["loss"] for h in meta["history"]],
                               [h["loss"] for h in meta_one["history"]], rtol=1e-5)

    # The 2-process checkpoint continues in one process exactly as the 1-process one does.
    assert main(["train", str(dataset), "--out", str(two), "--resume", "--iterations", "6",
                 "--quiet"]) == 0
    assert main(["train", str(dataset), "--out", str(one), "--resume", "--iterations", "6",
                 "--quiet"]) == 0
    resumed = read_checkpoint_meta(two)
    assert resumed["iteration"] == 6 and resumed["world_size"] == 1
    assert _weight_difference(two, one) < 1e-5


@slow
def test_batch_not_divisible_is_one_line(dataset, tmp_path):
    out = tmp_path / "student.safetensors"
    args = [str(dataset), "--out", str(out), "--iterations", "2", *OPTIONS, "--batch-size", "3"]
    done = _torchrun(2, args)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("napari-maskclip")]
    assert len(ours) == 1 and "divisible by 2" in ours[0], done.stderr[-3000:]
    assert not out.exists()


@slow
def test_ctrl_c_stops_every_rank_after_the_same_iteration(dataset, tmp_path):
    """Ctrl-C on torchrun (which passes SIGINT on to each rank): all ranks stop after the same
    completed iteration, rank 0 saves it and says so in one line, nothing hangs."""
    out = tmp_path / "run" / "student.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", NAPARI_MASKCLIP_DIST_TIMEOUT="120")
    options = [o for o in OPTIONS if o != "--quiet"]  # the progress bar tells when steps run
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "napari_maskclip.cli", "train", str(dataset), "--out", str(out),
               "--iterations", "100000", *options]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=sigint_as_in_a_terminal)
        try:
            deadline = time.monotonic() + HANG_GUARD_S
            while "loss=" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
            time.sleep(2.0)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=HANG_GUARD_S)
        finally:
            if proc.poll() is None:
                proc.kill()
    ours = [line for line in log.read_text().replace("\r", "\n").splitlines()
            if line.startswith("napari-maskclip")]
    meta = read_checkpoint_meta(out)
    assert 1 <= meta["iteration"] < 100000 and meta["world_size"] == 2 and not meta["complete"]
    assert ours == [f"napari-maskclip train: interrupted; {out} holds iteration "
                    f"{meta['iteration']} (continue with --resume)."], ours
    assert sorted(p.name for p in out.parent.iterdir()) == [f".{out.name}.lock", out.name]


def test_rank_shares_are_slices_of_the_global_batch():
    """Each rank computes exactly its slice of the crops one process draws (same random draws)."""
    samples = shapes_data(6, size=40).samples
    whole = augment_batch(samples, iteration_rng(3, 7), 48, (0.5, 2.0), True)
    parts = []
    for rank in range(3):
        share = Ranks(3, rank).share(6)
        assert share == slice(2 * rank, 2 * rank + 2)
        parts.append(augment_batch(samples, iteration_rng(3, 7), 48, (0.5, 2.0), True, keep=share))
    for field in ("images", "labels", "trusted", "valid"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field))


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_batch_norm_keeps_the_statistics(frozen):
    settings = TrainSettings(iterations=2, batch_size=2, crop_size=32, backbone="tiny",
                             backbone_weights="random", val_fraction=0.0, val_interval=0,
                             save_interval=0, frozen_batch_norm=frozen)
    result = train(shapes_data(3, size=40), None, settings=settings,
                   class_embeddings=random_embeddings(4), device="cpu")
    means = [m.running_mean for m in result.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert means and all(bool((m == 0).all()) for m in means) == frozen
    assert result.meta["world_size"] == 1 and result.meta["settings"]["frozen_batch_norm"] is frozen
