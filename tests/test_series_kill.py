"""A series process killed (SIGKILL, from outside) in the middle of a save leaves a valid dataset:
what was saved stays, the image being saved is not listed (nor half-written), and reopening
resumes at it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from napari_maskclip.atomic import TEMP_PREFIX
from napari_maskclip.export import read_dataset
from napari_maskclip.series import SeriesSession, list_images

from hang_guard import HANG_GUARD_S

CLASSES = "cat, dog"

_CHILD = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    import numpy as np
    from napari_maskclip.export import files, writer
    from napari_maskclip.series import SeriesSession, list_images

    folder, ds, point, marker = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    session = SeriesSession.open(list_images(folder), ds, "cat, dog")

    def labels_of(i, shape):
        return (np.arange(shape[0] * shape[1]).reshape(shape) + i) % 3

    def hang():  # tell the parent we are mid-save, then wait to be killed (however late)
        marker.touch()
        threading.Event().wait()

    for i in range(len(session)):
        if i == 2:
            if point == "mid-file":
                def half(path, mask, colors):
                    with open(path, "wb") as handle:
                        handle.write(b"\\x89PNG\\r\\n\\x1a\\n-partial")
                    hang()
                files.write_mask_file = half
            else:
                real = writer._commit_index
                def before_commit(path, text):
                    if '"name": "img2"' in text:  # img2's files are in place, not listed yet
                        hang()
                    return real(path, text)
                writer._commit_index = before_commit
        image = session.read_image(i)
        session.save(i, image, labels_of(i, image.shape[:2]).astype(np.uint8),
                     reviewed=(i == 1))
    print("not killed")
""")


def _labels_of(i, shape):
    return ((np.arange(shape[0] * shape[1]).reshape(shape) + i) % 3).astype(np.uint8)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("point", ["mid-file", "before-index"])
def test_kill_during_save_leaves_a_valid_dataset_and_resumes(tmp_path, point):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (14 + k, 11, 3), dtype=np.uint8)).save(folder / f"img{k}.png")
    ds, marker = tmp_path / "ds", tmp_path / "mid-save"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), str(ds), point, str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the child never reached the save"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, out + err

    dataset = read_dataset(ds)  # valid: every listed file is there and reads
    assert dataset.names == ["img0", "img1"]
    for sample in dataset:
        sample.read_image()
        sample.read_edited()
        np.testing.assert_array_equal(sample.read_mask(), _labels_of(int(sample.name[-1]), sample.shape))
    assert dataset["img1"].provenance["reviewed"] is True
    leftovers = list(ds.rglob(f"{TEMP_PREFIX}*")) + [p for p in (ds / "masks").iterdir() if p.stem == "img2"]
    assert leftovers  # the killed save left files behind, which nobody lists

    # Reopen: resume at the image being saved; saved images give their labels.
    session = SeriesSession.open(list_images(folder), ds, CLASSES)
    assert session.first_unsaved() == 2 and session.saved_count() == 2
    np.testing.assert_array_equal(session.saved_labels(0), _labels_of(0, (14, 11)))
    assert session.is_reviewed(1)
    for i in (2, 3):
        image = session.read_image(i)
        session.save(i, image, _labels_of(i, image.shape[:2]))
    dataset = read_dataset(ds)
    assert dataset.names == ["img0", "img1", "img2", "img3"]
    np.testing.assert_array_equal(dataset["img2"].read_mask(), _labels_of(2, (16, 11)))
    assert not list(ds.rglob(f"{TEMP_PREFIX}*"))
    assert "pending" not in (ds / "dataset.json").read_text()
