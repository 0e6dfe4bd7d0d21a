"""An interrupted export leaves a valid dataset: no listed sample with missing or partial files."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from napari_maskclip.atomic import TEMP_PREFIX
from napari_maskclip.export import export_sample, files, read_dataset, writer

from hang_guard import HANG_GUARD_S


def _arrays(seed: int):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (24, 30)).astype(np.uint8)
    probs = rng.random((2, 24, 30)).astype(np.float32) / 2
    return image, labels, probs


def _assert_complete(root, expected: dict[str, tuple]):
    """The dataset loads, lists exactly ``expected``, and every listed file reads back whole."""
    ds = read_dataset(root)
    assert ds.names == list(expected)
    for name, (image, labels, probs) in expected.items():
        s = ds[name]
        np.testing.assert_array_equal(s.read_image(), image)
        np.testing.assert_array_equal(s.read_mask(), labels)
        np.testing.assert_allclose(s.read_confidence(), probs, atol=1e-3)


def _temp_files(root):
    return [p for p in root.rglob(f"{TEMP_PREFIX}*")]


def test_crash_while_writing_a_sample_leaves_no_file_of_it(tmp_path, monkeypatch):
    keep, lost = _arrays(0), _arrays(1)
    export_sample(tmp_path, "keep", keep[0], keep[1], "a, b", probabilities=keep[2])

    def crash(path, confidence):  # image and mask are already written (to temp files)
        raise OSError("disk full")

    monkeypatch.setattr(files, "write_confidence_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_sample(tmp_path, "lost", lost[0], lost[1], "a, b", probabilities=lost[2])
    _assert_complete(tmp_path, {"keep": keep})
    assert not list(tmp_path.rglob("lost.*")) and not _temp_files(tmp_path)


def test_crash_before_the_index_is_written_leaves_unlisted_files_only(tmp_path, monkeypatch):
    keep, lost = _arrays(0), _arrays(1)
    export_sample(tmp_path, "keep", keep[0], keep[1], "a, b", probabilities=keep[2])
    real_commit = writer._commit_index

    def crash(path, text):
        if '"name": "lost"' in text:  # the commit that would list the sample (after the journal)
            raise KeyboardInterrupt  # e.g. Ctrl-C right after the sample's files were renamed
        return real_commit(path, text)

    monkeypatch.setattr(writer, "_commit_index", crash)
    with pytest.raises(KeyboardInterrupt):
        export_sample(tmp_path, "lost", lost[0], lost[1], "a, b", probabilities=lost[2])
    assert (tmp_path / "masks" / "lost.png").is_file()  # complete, but not listed
    _assert_complete(tmp_path, {"keep": keep})

    # The journal in dataset.json says these files are the exporter's: the next export of that
    # name replaces them without needing --overwrite.
    monkeypatch.setattr(writer, "_commit_index", real_commit)
    again = _arrays(2)
    export_sample(tmp_path, "lost", again[0], again[1], "a, b", probabilities=again[2])
    _assert_complete(tmp_path, {"keep": keep, "lost": again})


def test_interrupted_overwrite_never_pairs_old_and_new_files(tmp_path, monkeypatch):
    old, new = _arrays(0), _arrays(1)
    export_sample(tmp_path, "s", old[0], old[1], "a, b", probabilities=old[2])
    export_sample(tmp_path, "other", old[0], old[1], "a, b", probabilities=old[2])

    def crash(path, mask, colors):
        raise OSError("power cut")

    monkeypatch.setattr(files, "write_mask_file", crash)
    with pytest.raises(OSError):
        export_sample(tmp_path, "s", new[0], new[1], "a, b", probabilities=new[2], overwrite=True)
    # The sample being replaced is out of the dataset; nothing half-new is listed.
    _assert_complete(tmp_path, {"other": old})


_CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from napari_maskclip.export import export_sample, files, writer

    root, point = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(int(sys.argv[3]))
    image = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (5, 24, 30)).astype(np.uint8)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "mid-file":
        real = files.write_mask_file
        calls = []
        def half_then_die(path, mask, colors):
            calls.append(path)
            if len(calls) == 3:  # third slice: half a PNG on disk, then the process is killed
                with open(path, "wb") as handle:
                    handle.write(b"\\x89PNG\\r\\n\\x1a\\n-partial")
                die()
            real(path, mask, colors)
        files.write_mask_file = half_then_die
    elif point == "before-index":
        writer.COMMIT_INTERVAL_S = 0.0  # commit after every slice
        real_commit = writer._commit_index
        def commit_then_die(path, text):
            if '"name": "vol_z0002"' in text:  # slices 0 and 1 listed; slice 2's files in place
                die()
            return real_commit(path, text)
        writer._commit_index = commit_then_die
    export_sample(root, "vol", image=None, labels=labels, classes="a, b")
    print("not killed")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("point", ["mid-file", "before-index"])
def test_killed_export_process_leaves_a_valid_dataset(tmp_path, point):
    keep = _arrays(0)
    export_sample(tmp_path, "keep", keep[0], keep[1], "a, b", probabilities=keep[2])
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), point, "7"],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr

    labels = np.random.default_rng(7)
    labels.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    stack = labels.integers(0, 3, (5, 24, 30)).astype(np.uint8)
    ds = read_dataset(tmp_path)
    listed = ds.names
    assert listed[0] == "keep"
    # Whatever is listed is complete; slice 2 (being written when killed) is not listed.
    assert "vol_z0002" not in listed
    for name in listed[1:]:
        z = int(name[-4:])
        np.testing.assert_array_equal(ds[name].read_mask(), stack[z])
    if point == "before-index":
        assert listed == ["keep", "vol_z0000", "vol_z0001"]
        assert (tmp_path / "masks" / "vol_z0002.png").is_file()  # in place but unlisted
    else:
        assert _temp_files(tmp_path)  # the half-written temp file is still there, and ignored

    # Re-running the export finishes the job: leftovers are replaced or removed.
    done = listed[1:]
    export_sample(tmp_path, "vol", None, stack, "a, b",
                  slices=[z for z in range(5) if f"vol_z{z:04d}" not in done])
    ds = read_dataset(tmp_path)
    assert sorted(ds.names) == ["keep"] + [f"vol_z{z:04d}" for z in range(5)]
    for z in range(5):
        np.testing.assert_array_equal(ds[f"vol_z{z:04d}"].read_mask(), stack[z])
    assert not _temp_files(tmp_path)
