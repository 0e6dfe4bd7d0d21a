"""The batch writer (ExportSession): few dataset.json commits, the journal ahead of every write, and
a valid dataset after a kill -9 at any point of a session."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from napari_maskclip.atomic import TEMP_PREFIX
from napari_maskclip.export import ExportSession, export_sample, read_dataset, writer
from napari_maskclip.export.layout import sample_file_slots

from hang_guard import HANG_GUARD_S


def _arrays(seed: int, size: int = 8):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (size, size)).astype(np.uint8)
    return image, labels


def _disk_index(root) -> dict:
    return json.loads((root / "dataset.json").read_text(encoding="utf-8"))


def _own_files(root) -> set[str]:
    """Every file in the dataset's sample folders, as paths relative to the dataset."""
    return {p.relative_to(root).as_posix() for d in ("images", "masks", "confidence", "edited")
            if (root / d).is_dir() for p in (root / d).iterdir()}


def _assert_valid(root, expected: dict[str, tuple]) -> list[str]:
    """Every listed sample is one of ``expected`` and reads back whole; returns the names."""
    ds = read_dataset(root)  # check_files: every listed file exists
    for name in ds.names:
        image, labels = expected[name]
        np.testing.assert_array_equal(ds[name].read_image(), image)
        np.testing.assert_array_equal(ds[name].read_mask(), labels)
    return ds.names


def test_200_samples_in_one_session_commit_the_index_a_few_times(tmp_path, monkeypatch):
    """Counts writes of dataset.json, not time: the time-based commits are switched off."""
    commits = []
    real = writer._commit_index
    monkeypatch.setattr(writer, "_commit_index", lambda path, text: commits.append(text) or real(path, text))
    monkeypatch.setattr(writer, "COMMIT_INTERVAL_S", 1e9)
    names = [f"s{i:03d}" for i in range(200)]
    expected = {n: _arrays(i) for i, n in enumerate(names)}
    with ExportSession(tmp_path) as session:
        session.expect(names)
        for n in names:
            session.export(n, *expected[n], "a, b")
    assert session.commits == len(commits)
    # journal of 64, then of 128 (twice the samples since), then the rest, and the final commit
    assert len(commits) <= 5, len(commits)
    assert _assert_valid(tmp_path, expected) == names
    assert "pending" not in _disk_index(tmp_path)
    assert _own_files(tmp_path) == {f"{d}/{n}.png" for n in names for d in ("images", "masks")}

    # The one-sample API still commits twice per sample (journal, then the listing).
    commits.clear()
    for i in range(3):
        export_sample(tmp_path / "one", f"x{i}", *expected[names[i]], "a, b")
    assert len(commits) == 6


def test_unannounced_samples_are_journaled_one_commit_each(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "COMMIT_INTERVAL_S", 1e9)
    with ExportSession(tmp_path) as session:
        for i in range(5):
            session.export(f"u{i}", *_arrays(i), "a, b")
        assert session.commits == 5
    assert session.commits == 6
    assert read_dataset(tmp_path).names == [f"u{i}" for i in range(5)]


def test_the_journal_lists_every_file_before_it_is_written_and_commits_list_complete_samples(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(writer, "COMMIT_INTERVAL_S", 0.0)  # commit after every sample, too
    monkeypatch.setattr(writer, "JOURNAL_AHEAD", 4)
    export_sample(tmp_path, "old", *_arrays(99), "a, b")
    real_write = writer._write_sample_files
    real_commit = writer._commit_index
    real_sync = writer._sync_files
    checked = []
    synced = {(tmp_path / rel).as_posix() for e in _disk_index(tmp_path)["samples"]
              for rel in (e["image"], e["mask"])}

    def sync(paths):
        real_sync(paths)
        synced.update(p.as_posix() for p in paths)

    def write(root, jobs, **options):
        on_disk = _disk_index(root)
        journal = set(on_disk.get("pending", []))
        listed = {e["name"] for e in on_disk["samples"]}
        for rel, _ in jobs:
            assert rel in journal, rel
            assert rel.split("/")[1].rsplit(".", 1)[0] not in listed  # replaced: dropped first
        checked.append(len(jobs))
        return real_write(root, jobs, **options)

    def commit(path, text):
        for entry in json.loads(text)["samples"]:  # everything listed is complete already
            for key in ("image", "mask"):
                assert (tmp_path / entry[key]).is_file()
                assert (tmp_path / entry[key]).as_posix() in synced  # flushed to disk first
                assert not list(tmp_path.rglob(f"{TEMP_PREFIX}*"))
        return real_commit(path, text)

    monkeypatch.setattr(writer, "_write_sample_files", write)
    monkeypatch.setattr(writer, "_commit_index", commit)
    monkeypatch.setattr(writer, "_sync_files", sync)
    names = [f"n{i}" for i in range(10)] + ["old"]
    with ExportSession(tmp_path) as session:
        session.expect(names, overwrite=True)
        for i, n in enumerate(names):
            session.export(n, *_arrays(i), "a, b", overwrite=True)
    assert len(checked) == 11
    assert read_dataset(tmp_path).names == names


def test_replaced_samples_never_reached_are_kept(tmp_path, monkeypatch):
    """expect(overwrite=True) drops listed samples ahead; close lists again those not exported."""
    monkeypatch.setattr(writer, "COMMIT_INTERVAL_S", 1e9)
    old = {f"s{i}": _arrays(i) for i in range(6)}
    with ExportSession(tmp_path) as session:
        for n, arrays in old.items():
            session.export(n, *arrays, "a, b")
    new = {n: _arrays(100 + i) for i, n in enumerate(old)}
    with ExportSession(tmp_path) as session:
        session.expect(list(old), overwrite=True)
        session.export("s0", *new["s0"], "a, b", overwrite=True)
        assert "s3" not in session._index  # dropped by the journal ahead
    got = _assert_valid(tmp_path, {**old, "s0": new["s0"]})
    assert sorted(got) == sorted(old)
    assert "pending" not in _disk_index(tmp_path)
    assert len(_own_files(tmp_path)) == 12


def test_a_file_put_at_a_journaled_path_of_a_sample_never_written_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "COMMIT_INTERVAL_S", 1e9)
    with ExportSession(tmp_path) as session:
        session.expect(["a", "b"])
        session.export("a", *_arrays(0), "x, y")
        assert "masks/b.png" in _disk_index(tmp_path)["pending"]
        (tmp_path / "masks" / "b.png").write_bytes(b"the user's")
    assert (tmp_path / "masks" / "b.png").read_bytes() == b"the user's"
    assert read_dataset(tmp_path).names == ["a"]
    assert "pending" not in _disk_index(tmp_path)


def test_a_stopped_import_lists_what_is_complete_and_releases_the_lock(tmp_path):
    from napari_maskclip.export.importing import ImportItem, ImportPlan, Loaded, import_plan_iter
    from napari_maskclip.export.class_table import DatasetClasses

    def item(i):
        image, labels = _arrays(i)
        return ImportItem(f"i{i}", tmp_path / f"i{i}.png", lambda: Loaded(image, labels))

    plan = ImportPlan("test", tmp_path, DatasetClasses.from_user("a, b"), [item(i) for i in range(8)])
    gen = import_plan_iter(plan, tmp_path / "ds")
    steps = [next(gen) for _ in range(5)]  # the start, then 4 images
    assert steps[-1].done == 4
    gen.close()
    assert read_dataset(tmp_path / "ds").names == [f"i{i}" for i in range(4)]
    assert "pending" not in _disk_index(tmp_path / "ds")
    export_sample(tmp_path / "ds", "after", *_arrays(0), "a, b", lock_timeout=1)  # lock is free


# ---- kill -9 during a session ---------------------------------------------------------------------
N = 40
_CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from napari_maskclip.export import ExportSession, files, writer, ownership

    root, point, seed, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    writer.COMMIT_INTERVAL_S = 0.0 if point == "timed-commit" else 1e9
    writer.JOURNAL_AHEAD = 8  # several journal commits along the way
    overwrite = seed != 0

    def arrays(i):
        rng = np.random.default_rng(seed * 1000 + i)
        return (rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                rng.integers(0, 3, (8, 8)).astype(np.uint8))

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    count = {"mask": 0, "written": 0, "commit": 0}
    if point == "mid-file":
        real_mask = files.write_mask_file
        def mask(path, m, colors):
            count["mask"] += 1
            if count["mask"] == kill_at + 1:
                with open(path, "wb") as handle:
                    handle.write(b"\\x89PNG\\r\\n\\x1a\\n-partial")
                die()
            real_mask(path, m, colors)
        files.write_mask_file = mask
    elif point == "after-rename":
        real_write = writer._write_sample_files
        def write(r, jobs, **options):
            out = real_write(r, jobs, **options)
            count["written"] += 1
            if count["written"] == kill_at + 1:
                die()  # the sample's files are in place, no commit lists them yet
            return out
        writer._write_sample_files = write
    elif point in ("mid-commit", "after-commit", "timed-commit"):
        real_commit = writer._commit_index
        def commit(path, text):
            count["commit"] += 1
            if count["commit"] == kill_at:
                if point == "mid-commit":  # half the new index in a temp file, then killed
                    from napari_maskclip.atomic import atomic_write
                    with atomic_write(path) as tmp:
                        tmp.write_text(text[: len(text) // 2])
                        die()
                out = real_commit(path, text)
                die()
            return real_commit(path, text)
        writer._commit_index = commit
    elif point == "close":
        real_remove = ownership.remove_own_files
        def remove(r, rels):
            if count.get("closing"):
                die()  # the final settle and commit of the session
            return real_remove(r, rels)
        writer.remove_own_files = remove
        real_close = writer.ExportSession.close
        def close(self):
            count["closing"] = 1
            return real_close(self)
        writer.ExportSession.close = close

    names = [f"s{i:03d}" for i in range(int(sys.argv[5]))]
    with ExportSession(root) as session:
        session.expect(names, overwrite=overwrite)
        for i, n in enumerate(names):
            session.export(n, *arrays(i), "a, b", overwrite=overwrite)
    print("not killed")
""")


def _expected(seed: int, n: int):
    out = {}
    for i in range(n):
        rng = np.random.default_rng(seed * 1000 + i)
        out[f"s{i:03d}"] = (rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                            rng.integers(0, 3, (8, 8)).astype(np.uint8))
    return out


def _run_child(root, point, seed, kill_at, n=N):
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(root), point, str(seed), str(kill_at), str(n)],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    return proc


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("point,kill_at", [
    ("mid-file", 13), ("after-rename", 13), ("mid-commit", 3), ("after-commit", 2),
    ("timed-commit", 17), ("close", 0),
])
def test_killed_session_leaves_a_valid_dataset(tmp_path, point, kill_at):
    root = tmp_path / "ds"
    keep = _arrays(7)
    export_sample(root, "keep", *keep, "a, b")
    proc = _run_child(root, point, 0, kill_at)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    expected = {"keep": keep, **_expected(0, N)}
    listed = _assert_valid(root, expected)
    assert listed[0] == "keep"
    assert listed[1:] == [f"s{i:03d}" for i in range(len(listed) - 1)]  # in order, no gap
    if point in ("mid-file", "after-rename"):
        assert len(listed) - 1 <= kill_at  # the sample being written is not listed
    if point == "close":
        assert len(listed) - 1 == N or "pending" in _disk_index(root)

    # A new session over the same names finishes the job; no leftover of the killed one remains.
    done = set(listed)
    with ExportSession(root) as session:
        for n, arrays in _expected(0, N).items():
            if n not in done:
                session.export(n, *arrays, "a, b")
    assert sorted(_assert_valid(root, expected)) == sorted(expected)
    assert not list(root.rglob(f"{TEMP_PREFIX}*"))
    assert "pending" not in _disk_index(root)
    assert _own_files(root) == {f"{d}/{n}.png" for n in expected for d in ("images", "masks")}


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("point,kill_at", [("timed-commit", 12), ("mid-file", 15)])
def test_killed_overwrite_session_never_pairs_old_and_new_files(tmp_path, point, kill_at):
    root = tmp_path / "ds"
    n = 30
    old = _expected(0, n)
    proc = _run_child(root, "none", 0, 0, n)
    assert proc.returncode == 0, proc.stderr
    proc = _run_child(root, point, 1, kill_at, n)  # seed 1: new arrays, overwrite
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    new = _expected(1, n)
    ds = read_dataset(root)
    versions = []
    for name in ds.names:
        image, mask = ds[name].read_image(), ds[name].read_mask()
        if np.array_equal(image, new[name][0]):
            np.testing.assert_array_equal(mask, new[name][1])
            versions.append("new")
        else:
            np.testing.assert_array_equal(image, old[name][0])
            np.testing.assert_array_equal(mask, old[name][1])
            versions.append("old")
    assert "new" in versions and "old" in versions
    if point == "timed-commit":  # every sample committed: only the journal ahead (8) is gone
        assert len(ds.names) >= n - 8
    proc = _run_child(root, "none", 1, 0, n)  # the re-run replaces everything
    assert proc.returncode == 0, proc.stderr
    assert _assert_valid(root, new) == sorted(new)
    assert _own_files(root) == {f"{d}/{m}.png" for m in new for d in ("images", "masks")}
    assert not list(root.rglob(f"{TEMP_PREFIX}*"))


def test_a_name_differing_in_case_from_a_journaled_one_is_refused(tmp_path, monkeypatch):
    """'Cat' replaced ahead is out of the index for a while; 'cat' still may not take its files."""
    from napari_maskclip.errors import DatasetError

    monkeypatch.setattr(writer, "COMMIT_INTERVAL_S", 1e9)
    export_sample(tmp_path, "Cat", *_arrays(0), "a, b")
    with ExportSession(tmp_path) as session:
        session.expect(["Cat"], overwrite=True)
        session.export("dog", *_arrays(1), "a, b")
        assert "Cat" not in session._index
        with pytest.raises(DatasetError, match="letter case"):
            session.export("cat", *_arrays(2), "a, b", overwrite=True)
    assert _assert_valid(tmp_path, {"Cat": _arrays(0), "dog": _arrays(1)}) == ["dog", "Cat"]


def test_a_malformed_index_is_refused_with_one_line(tmp_path):
    from napari_maskclip.errors import DatasetError

    export_sample(tmp_path, "a", *_arrays(0), "a, b")
    info = _disk_index(tmp_path)
    info["samples"].append(dict(info["samples"][0]))
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="twice"):
        export_sample(tmp_path, "b", *_arrays(1), "a, b")


def test_import_and_cli_export_of_many_inputs_use_one_session(tmp_path, monkeypatch):
    """Counted: 30 images -> one journal commit and the final one, not two per image."""
    from PIL import Image

    from napari_maskclip.cli import main
    from napari_maskclip.export.import_folders import plan_mask_folder
    from napari_maskclip.export.importing import class_list, import_plan

    commits = []
    real = writer._commit_index
    monkeypatch.setattr(writer, "_commit_index", lambda path, text: commits.append(path) or real(path, text))
    monkeypatch.setattr(writer, "COMMIT_INTERVAL_S", 1e9)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(30):
        image, labels = _arrays(i)
        Image.fromarray(image).save(images / f"p{i:02d}.png")
        Image.fromarray(labels).save(masks / f"p{i:02d}.png")
    report = import_plan(plan_mask_folder(images, masks, class_list("a, b")), tmp_path / "imp")
    assert len(report.samples) == 30 and len(read_dataset(tmp_path / "imp")) == 30
    assert len(commits) == 2

    commits.clear()
    stems = [f"p{i:02d}" for i in range(30)]
    argv = ["export", "--images", *[str(images / f"{s}.png") for s in stems],
            "--labels", *[str(masks / f"{s}.png") for s in stems],
            "--classes", "a, b", "--out", str(tmp_path / "exp"), "--quiet"]
    assert main(argv) == 0
    assert read_dataset(tmp_path / "exp").names == stems
    assert len(commits) == 2


def test_cli_export_waits_for_the_lock_once_then_stops_with_one_line(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from napari_maskclip.cli import main
    from napari_maskclip.export.lock import DatasetLock

    root = tmp_path / "ds"
    export_sample(root, "first", *_arrays(0), "a, b")
    for i in range(3):
        image, labels = _arrays(i)
        Image.fromarray(image).save(tmp_path / f"in{i}.png")
        Image.fromarray(labels).save(tmp_path / f"in{i}_labels.png")
    args = ["export", "--images", *[str(tmp_path / f"in{i}.png") for i in range(3)],
            "--labels", *[str(tmp_path / f"in{i}_labels.png") for i in range(3)],
            "--classes", "a, b", "--out", str(root), "--quiet"]
    monkeypatch.setattr(writer, "LOCK_TIMEOUT_S", 0.5)
    waits = []

    class Counted(DatasetLock):
        def acquire_iter(self, timeout):
            waits.append(timeout)
            return super().acquire_iter(timeout)

    holder = DatasetLock(root)
    list(holder.acquire_iter(timeout=1))
    monkeypatch.setattr(writer, "DatasetLock", Counted)
    try:
        assert main(args) != 0
        assert waits == [0.5]  # one wait, not one per input
    finally:
        holder.release()
    err = capsys.readouterr().err.strip()
    assert "Another export is writing" in err and "\n" not in err, err
    assert read_dataset(root).names == ["first"]
    assert main(args) == 0
    assert read_dataset(root).names == ["first", "in0", "in1", "in2"]
