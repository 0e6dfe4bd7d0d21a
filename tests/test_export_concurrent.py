"""Concurrent exports into one dataset take turns on its lock: both succeed, no sample is lost.

Real processes, started together (a barrier file), several trials; then the lock's refusal after
its timeout, through the Python API and napari's Save (``plugin.writer``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from napari_maskclip.atomic import TEMP_PREFIX
from napari_maskclip.errors import DatasetError
from napari_maskclip.export import export_sample, export_sample_iter, read_dataset, writer
from napari_maskclip.export.lock import DatasetLock

from hang_guard import HANG_GUARD_S

N_SLICES = 4

_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import numpy as np
    from napari_maskclip.export import export_sample, writer

    root, tag, seed, barrier = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    writer.COMMIT_INTERVAL_S = 0.0  # commit after every slice: the most interleaving
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, ({n}, 16, 18, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, ({n}, 16, 18)).astype(np.uint8)
    (barrier / tag).touch()
    while len(list(barrier.iterdir())) < 2:  # start together
        time.sleep(0.005)
    export_sample(root, tag, image, labels, "a, b")
    print("exported", tag)
""").format(n=N_SLICES)


def _expected(seed: int):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (N_SLICES, 16, 18, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (N_SLICES, 16, 18)).astype(np.uint8)
    return image, labels


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "existing-dataset"])
def test_two_processes_exporting_into_one_dataset_both_succeed(tmp_path, existing):
    for trial in range(3):
        root = tmp_path / f"ds{trial}"
        if existing:
            export_sample(root, "first", None, np.zeros((16, 18), np.uint8), "a, b")
        barrier = tmp_path / f"barrier{trial}"
        barrier.mkdir()
        procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(root), tag, str(seed), str(barrier)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for tag, seed in (("p", 10 + trial), ("q", 20 + trial))]
        outputs = [p.communicate(timeout=HANG_GUARD_S) for p in procs]
        for proc, (out, err) in zip(procs, outputs):
            assert proc.returncode == 0, f"trial {trial}: {err[-2000:]}"
        ds = read_dataset(root)
        expected_names = {f"{tag}_z{z:04d}" for tag in "pq" for z in range(N_SLICES)}
        assert set(ds.names) == expected_names | ({"first"} if existing else set()), f"trial {trial}"
        for tag, seed in (("p", 10 + trial), ("q", 20 + trial)):
            image, labels = _expected(seed)
            for z in range(N_SLICES):
                sample = ds[f"{tag}_z{z:04d}"]
                np.testing.assert_array_equal(sample.read_image(), image[z])
                np.testing.assert_array_equal(sample.read_mask(), labels[z])
        assert not list(root.rglob(f"{TEMP_PREFIX}*"))
        assert "pending" not in (root / "dataset.json").read_text()


def test_a_second_export_waits_for_the_first(tmp_path):
    root = tmp_path / "ds"
    export_sample(root, "first", None, np.zeros((4, 4), np.uint8), "a")
    holder = DatasetLock(root)
    list(holder.acquire_iter(timeout=1))
    gen = export_sample_iter(root, "second", None, np.ones((4, 4), np.uint8), "a", lock_timeout=30)
    waiting = next(gen)
    assert "waiting for another export" in waiting.message
    assert read_dataset(root).names == ["first"]
    holder.release()
    steps = list(gen)
    assert steps[-1].done == 1
    assert read_dataset(root).names == ["first", "second"]


def test_an_export_gives_up_after_the_lock_timeout_with_one_line(tmp_path):
    root = tmp_path / "ds"
    export_sample(root, "first", None, np.zeros((4, 4), np.uint8), "a")
    before = (root / "dataset.json").read_bytes()
    holder = DatasetLock(root)
    list(holder.acquire_iter(timeout=1))
    try:
        start = time.monotonic()
        with pytest.raises(DatasetError, match="Another export is writing") as info:
            export_sample(root, "second", None, np.ones((4, 4), np.uint8), "a", lock_timeout=0.6)
        assert 0.5 <= time.monotonic() - start < 10
        assert "\n" not in str(info.value)
    finally:
        holder.release()
    assert (root / "dataset.json").read_bytes() == before


def test_napari_save_takes_the_same_lock(tmp_path, monkeypatch):
    napari_layers = pytest.importorskip("napari.layers")
    from napari_maskclip.plugin import writer as _writer

    root = tmp_path / "ds"
    export_sample(root, "first", None, np.zeros((4, 4), np.uint8), "cat, dog")
    layer = napari_layers.Labels(np.ones((4, 4), np.uint8), name="saved",
                                 features={"index": [0, 1, 2], "name": ["background", "cat", "dog"]})
    monkeypatch.setattr(_writer, "_viewer_layers", lambda: [layer])
    monkeypatch.setattr(writer, "LOCK_TIMEOUT_S", 0.5)
    data, meta, _ = layer.as_layer_data_tuple()
    holder = DatasetLock(root)
    list(holder.acquire_iter(timeout=1))
    try:
        with pytest.raises(DatasetError, match="Another export is writing"):
            _writer.write_labels_dataset(str(root), data, meta)
    finally:
        holder.release()
    _writer.write_labels_dataset(str(root), data, meta)
    assert read_dataset(root).names == ["first", "saved"]


def test_only_dead_exports_temp_files_are_removed(tmp_path):
    """A run cleans its own temp files and dead runs' ones, never a live writer's."""
    root = tmp_path / "ds"
    export_sample(root, "first", None, np.zeros((4, 4), np.uint8), "a")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = root / "masks" / f"{TEMP_PREFIX}{dead_pid}-{'0' * 16}.png"
        busy = root / "masks" / f"{TEMP_PREFIX}{live.pid}-{'1' * 16}.png"
        foreign = root / "masks" / f"{TEMP_PREFIX}notes.png"  # not a name the exporter gives
        for path in (stale, busy, foreign):
            path.write_bytes(b"partial")
        export_sample(root, "second", None, np.ones((4, 4), np.uint8), "a")
        assert not stale.exists()
        assert busy.read_bytes() == b"partial" and foreign.read_bytes() == b"partial"
    finally:
        live.kill()
        live.wait()
    assert read_dataset(root).names == ["first", "second"]
