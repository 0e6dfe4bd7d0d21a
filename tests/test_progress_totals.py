"""``segment`` reports every stage of an image with a total, so the CLI's bar has an ETA throughout.

A huge image (issue 21: 16000x16000 px, many minutes) goes read -> encode -> segment -> write;
tqdm computes a remaining time from a stage's total and its rate, so each stage must say its
total, also the reading and the writing of the results (minutes of compression for a huge
image's maps), which used to run with no report at all. A tiny image with the confidence forced
through the streaming writer (as a huge one's is) and sliding windows stands for the huge one.
"""

from __future__ import annotations

import re

import imageio.v3 as iio
import numpy as np
import pytest

from napari_maskclip import batch
from napari_maskclip.cli import main
from napari_maskclip.segment_batch import segment_tasks

STAGES = ["read", "encode", "segment", "write"]


@pytest.fixture
def tiny_image(tmp_path, monkeypatch):
    """A 72 x 88 RGB image; its maps are streamed to disk (as past CONFIDENCE_IN_MEMORY)."""
    monkeypatch.setattr(batch, "CONFIDENCE_IN_MEMORY", 0)
    path = tmp_path / "big.png"
    iio.imwrite(path, (np.random.default_rng(0).random((72, 88, 3)) * 255).astype(np.uint8))
    return path


def _model(files) -> list[str]:
    config, ckpt = files
    return ["--model", str(config), "--pretrained", str(ckpt), "--templates", "single",
            "--window", "32", "--no-denoise"]


def test_every_stage_reports_its_total_and_reaches_it(tiny_image, tmp_path, tiny_vit_files):
    from napari_maskclip.engine.settings import SegmentSettings

    config, ckpt = tiny_vit_files
    tasks = segment_tasks([tiny_image], tmp_path / "out", classes="cat, dog", model=str(config),
                          pretrained=str(ckpt), device="cpu", precision="fp32",
                          settings=SegmentSettings(window=32, templates="single", denoise=False))
    steps = []
    (task,) = tasks.tasks
    task.run(steps.append)
    assert [s.stage for s in steps if s.stage in STAGES] == [s.stage for s in steps]
    assert list(dict.fromkeys(s.stage for s in steps)) == STAGES
    for stage in STAGES:
        done = [s.done for s in steps if s.stage == stage]
        totals = {s.total for s in steps if s.stage == stage}
        assert len(totals) == 1 and min(totals) > 0, (stage, totals)  # one total, known from the start
        assert done == sorted(done) and done[-1] == totals.pop(), (stage, done)
    windows = {s.total for s in steps if s.stage == "encode"}
    assert windows == {4 * 5}  # 72 x 88 px, 32-px windows every 16 px: 4 rows of 5
    write = [s.done for s in steps if s.stage == "write"]
    # labels (72 rows), then each of the 2 maps strip by strip: reports between the ends
    assert write[-1] == 72 * 3 and 72 in write and len(set(write)) > 3, write


def test_the_cli_bar_shows_a_remaining_time_in_every_stage(tiny_image, tmp_path, tiny_vit_files,
                                                          capsys):
    assert main(["segment", str(tiny_image), "--classes", "cat, dog", "--out",
                 str(tmp_path / "out"), *_model(tiny_vit_files)]) == 0
    bar = capsys.readouterr().err.replace("\r", "\n")
    for stage, total in [("read", 1), ("encode", 20), ("segment", 20), ("write", 216)]:
        lines = [line for line in bar.splitlines() if line.startswith(f"big.png {stage}:")]
        # "n/total [elapsed<remaining, rate]": a total and a remaining time, never "<?"
        shown = [re.search(r" (\d+)/(\d+) \[[\d:]+<([\d:]+|\?)", line) for line in lines]
        assert shown and all(m is not None for m in shown), (stage, lines)
        assert {int(m.group(2)) for m in shown} == {total}, (stage, lines)
        assert any(m.group(3) != "?" for m in shown if int(m.group(1)) > 0), (stage, lines)
