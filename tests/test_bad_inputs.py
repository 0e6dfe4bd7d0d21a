"""A table of bad inputs through the real command line: one line, no traceback, non-zero exit,
and nothing changed outside the output folder.

Each case builds its inputs in ``inputs/``, runs ``python -m napari_maskclip.cli ...`` in a
subprocess (the shipped demo model keeps it fast and offline), and checks:

* the exit code is not 0;
* stderr is exactly one line, naming the problem (and, for files, the file);
* no "Traceback" anywhere;
* every file under ``inputs/`` is unchanged (bytes and modification time), and no file other
  than the command's own output appeared.
"""

from __future__ import annotations

import json
import os
import struct
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_maskclip.image_files import write_label_image

SEGMENT = ["--model", "demo", "--templates", "single", "--quiet"]


def run_cli(*args: str, timeout: float = 300, memory: int | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; ``memory``: its RLIMIT_DATA in bytes (heap and anonymous maps),
    so an input that allocates without bound fails (MemoryError) instead of taking the machine."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))

    return subprocess.run([sys.executable, "-m", "napari_maskclip.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=None if memory is None else limit)


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_failure(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- bad files -------------------------------------------------------------------------------
def _png_bytes(shape=(40, 48, 3), seed=0) -> bytes:
    import io

    buffer = io.BytesIO()
    iio.imwrite(buffer, (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8),
                extension=".png")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (8-bit gray) and holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _tiff_header_only(width: int, height: int) -> bytes:
    """A little-endian baseline TIFF whose tags claim ``width x height`` uint8 with one tiny strip."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 8),
               (262, 3, 1, 1), (273, 4, 1, 0), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 0)]
    data = zlib.compress(b"\0" * 64)
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(entries) + 4
    body = b""
    for tag, kind, count, value in entries:
        if tag == 273:
            value = data_offset
        if tag == 279:
            value = len(data)
        packed = struct.pack("<HHI", tag, kind, count)
        packed += struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        body += packed
    return b"II*\0" + struct.pack("<I", ifd_offset) + struct.pack("<H", len(entries)) + body + b"\0\0\0\0" + data


def _write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif path.suffix == ".tif" and content.size == 0:
        with pytest.warns(UserWarning, match="zero-size"):  # tifffile: a nonconformant TIFF
            tifffile.imwrite(path, content)
    elif path.suffix == ".tif":
        tifffile.imwrite(path, content)
    else:
        iio.imwrite(path, content)
    return path


def _nan_image():
    data = np.random.default_rng(0).random((40, 48)).astype(np.float32)
    data[5, 7] = np.nan
    return data


def _inf_image():
    data = np.random.default_rng(0).random((40, 48)).astype(np.float32)
    data[5, 7] = np.inf
    return data


# (case id, file name, content, words the one line must hold)
IMAGE_CASES = [
    ("empty-file", "empty.png", b"", ["empty.png", "Cannot read"]),
    ("empty-tif", "empty.tif", b"", ["empty.tif", "Cannot read"]),
    ("truncated-png", "cut.png", _png_bytes()[:300], ["cut.png", "Cannot read"]),
    ("text-as-png", "notes.png", b"these are my notes, not a picture\n" * 20, ["notes.png", "Cannot read"]),
    ("text-as-tif", "notes.tif", b"these are my notes\n" * 20, ["notes.tif", "Cannot read"]),
    ("zero-size", "zero.tif", np.zeros((0, 10), np.uint8), ["zero.tif", "no pixels"]),
    ("one-pixel", "dot.png", np.full((1, 1, 3), 200, np.uint8), ["smaller than one"]),
    ("nan", "nan.tif", _nan_image(), ["NaN"]),
    ("inf", "inf.tif", _inf_image(), ["infinite"]),
    ("5d", "five.tif", np.zeros((2, 2, 2, 16, 16), np.uint8), ["five.tif", "stack"]),
    ("huge-tiff-header", "huge.tif", _tiff_header_only(100000, 100000), ["huge.tif", "larger than"]),
    ("huge-png-header", "huge.png", _png_header_only(100000, 100000), ["huge.png", "larger than"]),
    ("complex", "complex.tif", (np.ones((16, 16)) * (1 + 1j)).astype(np.complex64), ["omplex"]),
]


@pytest.mark.parametrize("name, content, needles", [c[1:] for c in IMAGE_CASES],
                         ids=[c[0] for c in IMAGE_CASES])
def test_bad_image_through_segment(tmp_path, name, content, needles):
    inputs = tmp_path / "inputs"
    image = _write(inputs / name, content)
    before = snapshot(inputs)
    proc = run_cli("segment", image, "--classes", "red circle", "--out", tmp_path / "out", *SEGMENT)
    assert_one_line_failure(proc, *needles)
    assert snapshot(inputs) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---- bad options and output paths ------------------------------------------------------------
def test_bad_options_and_outputs(tmp_path):
    inputs = tmp_path / "inputs"
    good = _write(inputs / "good.png", _png_bytes())
    long_name = _write(inputs / ("x" * 245 + ".png"), _png_bytes())
    a_file = _write(inputs / "a-file", b"keep me")
    before = snapshot(inputs)
    cases = [
        (["--classes", "red circle, ;", "--out", tmp_path / "o1"], ["Empty class name"]),
        (["--classes", "cat, Cat", "--out", tmp_path / "o1"], ["Duplicate"]),
        (["--classes", "red circle", "--out", a_file], ["is a file"]),
        (["--classes", "red circle", "--out", a_file / "sub"], ["is a file"]),
    ]
    for extra, needles in cases:
        assert_one_line_failure(run_cli("segment", good, *extra, *SEGMENT), *needles)
    assert_one_line_failure(run_cli("segment", long_name, "--classes", "red circle", "--out",
                                    tmp_path / "o2", *SEGMENT), "at most 255")
    assert snapshot(inputs) == before
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.fixture
def small_mount(tmp_path):
    """A 200 kB tmpfs (skipped where mounting is not allowed): ``(path, remount(read_only))``."""
    where = tmp_path / "mnt"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("mount is not allowed here (tests run as root; chmod would not stop root)")

    def read_only() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)

    yield where, read_only
    subprocess.run(["umount", str(where)], capture_output=True)


def test_read_only_output_folder_is_refused_before_the_work(tmp_path, small_mount):
    where, read_only = small_mount
    (where / "results").mkdir()
    read_only()
    image = _write(tmp_path / "inputs" / "good.png", _png_bytes())
    for out in (where / "results", where / "new" / "results"):
        line = assert_one_line_failure(run_cli("segment", image, "--classes", "red circle",
                                               "--out", out, *SEGMENT))
        assert "read-only" in line and str(where) in line


def test_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, small_mount):
    where, _ = small_mount
    image = _write(tmp_path / "inputs" / "big.png", _png_bytes((256, 256, 3)))
    before = snapshot(tmp_path / "inputs")
    proc = run_cli("segment", image, "--classes", "red circle, blue square, green triangle",
                   "--out", where, *SEGMENT)
    line = assert_one_line_failure(proc, "disk is full")
    assert str(where) in line
    assert not [p.name for p in where.iterdir() if p.name.startswith(".tmp-")]
    assert not (where / "big_classes.json").exists()
    assert snapshot(tmp_path / "inputs") == before


# ---- extreme values: fine, and never NaN in a file -------------------------------------------
@pytest.mark.parametrize("dtype, big", [(np.float32, 3e38), (np.float64, 1e308)])
def test_extreme_finite_floats_segment_without_nan(tmp_path, dtype, big):
    rng = np.random.default_rng(0)
    data = (rng.random((40, 48)) * 2 - 1).astype(dtype) * dtype(big)
    data[:20] = dtype(big)
    data[20:, :10] = -dtype(big)
    image = _write(tmp_path / "inputs" / "extreme.tif", data)
    proc = run_cli("segment", image, "--classes", "red circle, blue square", "--out",
                   tmp_path / "out", *SEGMENT)
    assert proc.returncode == 0, proc.stderr
    confidence = tifffile.imread(tmp_path / "out" / "extreme_confidence.tif")
    assert np.isfinite(confidence).all()
    assert np.all((confidence >= 0) & (confidence <= 1))


# ---- bad masks in evaluate and bad dataset metadata ------------------------------------------
def _dataset(tmp_path: Path) -> Path:
    from napari_maskclip.export import export_sample

    rng = np.random.default_rng(0)
    ds = tmp_path / "inputs" / "ds"
    for i in range(2):
        image = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
        labels = rng.integers(0, 3, (24, 30)).astype(np.uint8)
        export_sample(ds, f"img{i}", image, labels, "cat, dog", edited=True)
    return ds


def _masks_folder(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    gt, pred = tmp_path / "inputs" / "gt" / "masks", tmp_path / "inputs" / "pred"
    for folder in (gt, pred):
        folder.mkdir(parents=True)
        for stem in ("a", "b"):
            write_label_image(folder / f"{stem}.png", rng.integers(0, 3, (20, 26)).astype(np.uint8))
    return gt, pred


MASK_CASES = [
    ("truncated-mask", "b.png", lambda p: p.write_bytes(p.read_bytes()[:60]), ["b.png", "Cannot read"]),
    ("text-as-mask", "b.png", lambda p: p.write_text("not a mask"), ["b.png", "Cannot read"]),
    ("empty-mask", "b.png", lambda p: p.write_bytes(b""), ["b.png", "Cannot read"]),
    ("colour-mask", "b.png", lambda p: iio.imwrite(p, np.zeros((20, 26, 3), np.uint8)), ["b.png", "colour"]),
    ("huge-mask-header", "b.png", lambda p: p.write_bytes(_png_header_only(100000, 100000)), ["b.png", "larger than"]),
    ("wrong-size-mask", "b.png", lambda p: write_label_image(p, np.zeros((5, 5), np.uint8)), ["b", "5x5"]),
]


@pytest.mark.parametrize("side", ["gt", "pred"])
@pytest.mark.parametrize("name, damage, needles", [c[1:] for c in MASK_CASES], ids=[c[0] for c in MASK_CASES])
def test_bad_masks_in_evaluate(tmp_path, side, name, damage, needles):
    gt, pred = _masks_folder(tmp_path)
    damage((gt if side == "gt" else pred) / name)
    before = snapshot(tmp_path / "inputs")
    assert_one_line_failure(run_cli("evaluate", pred, gt), *needles)
    assert snapshot(tmp_path / "inputs") == before


def _edit_index(ds: Path, change) -> None:
    index = json.loads((ds / "dataset.json").read_text())
    change(index)
    (ds / "dataset.json").write_text(json.dumps(index))


DATASET_CASES = [
    ("huge-shape", lambda ds: _edit_index(ds, lambda i: i["samples"][0].update(shape=[10**9, 10**9])), ["malformed"]),
    ("shape-not-list", lambda ds: _edit_index(ds, lambda i: i["samples"][0].update(shape="24x30")), ["malformed"]),
    ("path-escapes", lambda ds: _edit_index(ds, lambda i: i["samples"][0].update(mask="../../etc/passwd")), ["malformed"]),
    ("bad-class-count", lambda ds: _edit_index(ds, lambda i: i["samples"][0].update(num_classes=-3)), ["malformed"]),
    ("more-classes-than-table", lambda ds: _edit_index(ds, lambda i: i["samples"][0].update(num_classes=9)), ["9 classes"]),
    ("samples-not-list", lambda ds: _edit_index(ds, lambda i: i.update(samples={"a": 1})), ["no sample list"]),
    ("index-not-json", lambda ds: (ds / "dataset.json").write_text("{not json"), ["dataset.json"]),
    ("classes-garbage", lambda ds: (ds / "classes.json").write_text('{"classes": [{"index": "x"}]}'), ["classes.json"]),
    ("classes-synonyms-not-list", lambda ds: (ds / "classes.json").write_text(
        '{"classes": [{"index": 1, "name": "cat", "synonyms": "cat"}]}'), ["classes.json"]),
    ("mask-truncated", lambda ds: (ds / "masks" / "img1.png").write_bytes((ds / "masks" / "img1.png").read_bytes()[:50]),
     ["img1", "Cannot read"]),
    ("mask-wrong-size", lambda ds: write_label_image(ds / "masks" / "img1.png", np.zeros((5, 5), np.uint8)), ["img1"]),
]


@pytest.mark.parametrize("damage, needles", [c[1:] for c in DATASET_CASES], ids=[c[0] for c in DATASET_CASES])
def test_bad_dataset_metadata_in_evaluate(tmp_path, damage, needles):
    ds = _dataset(tmp_path)
    pred = tmp_path / "inputs" / "pred"
    shutil.copytree(ds / "masks", pred)  # intact predictions: only the ground truth is damaged
    damage(ds)
    before = snapshot(tmp_path / "inputs")
    assert_one_line_failure(run_cli("evaluate", pred, ds), *needles)
    assert snapshot(tmp_path / "inputs") == before


def test_bad_dataset_files_reach_training_as_one_line(tmp_path):
    """The student's data loading reads through the same checked reader."""
    ds = _dataset(tmp_path)
    write_label_image(ds / "edited" / "img1.png", np.zeros((5, 5), np.uint8))  # edited mask, wrong size
    before = snapshot(tmp_path / "inputs")
    proc = run_cli("train", ds, "--out", tmp_path / "student.safetensors", "--iterations", "1",
                   "--backbone", "tiny", "--backbone-weights", "random", "--quiet")
    assert_one_line_failure(proc, "img1", "edited")
    assert snapshot(tmp_path / "inputs") == before
    assert not (tmp_path / "student.safetensors").exists()


# ---- bad inputs to export --------------------------------------------------------------------
def test_bad_export_inputs(tmp_path):
    inputs = tmp_path / "inputs"
    image = _write(inputs / "a.png", _png_bytes((20, 26, 3)))
    labels = inputs / "a_lab.png"
    write_label_image(labels, np.ones((20, 26), np.uint8))
    small = inputs / "small_edit.png"
    write_label_image(small, np.ones((5, 5), np.uint8))
    cut = _write(inputs / "cut_lab.png", labels.read_bytes()[:40])
    conf = inputs / "conf.tif"
    tifffile.imwrite(conf, np.full((1, 20, 26), np.nan, np.float32))
    before = snapshot(inputs)
    base = ["export", "--images", image, "--classes", "cat", "--out", tmp_path / "ds", "--quiet"]
    cases = [
        (["--labels", labels, "--edited", small], ["small_edit.png", "same size"]),
        (["--labels", cut], ["cut_lab.png", "Cannot read"]),
        (["--labels", labels, "--confidence", conf], ["conf.tif", "0..1"]),
    ]
    for extra, needles in cases:
        assert_one_line_failure(run_cli(*base, *extra), *needles)
    assert snapshot(inputs) == before
    assert not (tmp_path / "ds" / "dataset.json").exists()


# ---- the same guarantees, in process (fast) --------------------------------------------------
@pytest.mark.parametrize("dtype, big", [(np.float32, 3e38), (np.float32, -3.4e38), (np.float64, 1e308),
                                        (np.float64, -1.7e308)])
def test_extreme_floats_normalise_without_overflow(dtype, big):
    import warnings

    from napari_maskclip.engine.preprocess import prepare_image

    data = (np.random.default_rng(1).random((30, 40)) * 2 - 1).astype(dtype) * dtype(big)
    data[:10] = dtype(big)
    data[10:, :5] = -dtype(big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning either
        unit = prepare_image(data)
    assert np.isfinite(unit).all() and unit.min() >= 0 and unit.max() <= 1
    assert len(np.unique(unit)) > 100  # the values still differ: not saturated to two levels


def test_writers_refuse_nan(tmp_path):
    from napari_maskclip.errors import InvalidInputError
    from napari_maskclip.image_files import FloatStackWriter, write_float_stack

    maps = np.full((2, 8, 9), 0.5, np.float32)
    maps[1, 3, 4] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        write_float_stack(tmp_path / "c.tif", maps)
    writer = FloatStackWriter(tmp_path, 2, 8, 9)
    with pytest.raises(InvalidInputError, match="NaN"):
        writer(0, 8, maps)
    writer.discard()
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_result_table_with_nan_setting_is_refused(tmp_path):
    from napari_maskclip.classes import parse_classes
    from napari_maskclip.engine import SegmentationResult
    from napari_maskclip.errors import InvalidInputError
    from napari_maskclip.result_files import write_result

    result = SegmentationResult(labels=np.zeros((4, 4), np.uint8),
                                probabilities=np.zeros((1, 4, 4), np.float32),
                                classes=parse_classes("cat"), settings={"logit_scale": float("nan")})
    with pytest.raises(InvalidInputError, match="NaN|not JSON compliant|Out of range"):
        write_result(result, tmp_path, "a")
    assert not (tmp_path / "a_classes.json").exists()


# ---- issue 21 (items 1, 2, 5, 8): names that leave their folder, numbers that would allocate ---
# without bound, corrupt files; each row one class of input, under a memory limit that a correct
# run fits with room to spare (RLIMIT_DATA: about 0.15 GiB for import, 1 GiB for segment with the
# demo model) and the input, read as its numbers say, would exceed.
GiB = 1 << 30
IMPORT_MEMORY = 1 * GiB  # import's VmData is ~0.15 GiB
SEGMENT_MEMORY = 2 * GiB + GiB // 2  # segment + demo model ~1.0 GiB; a 16000^2 RGB decode +1.5 GiB


def _coco(folder: Path, images: list[dict], anns: list[dict] | None = None) -> Path:
    """A COCO file in ``folder`` over ``images`` (one cat annotation per image unless ``anns``)."""
    if anns is None:
        anns = [{"id": i + 1, "image_id": im["id"], "category_id": 1, "iscrowd": 0,
                 "segmentation": [[1, 1, 6, 1, 6, 6]]} for i, im in enumerate(images)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "cat"}]}))
    return path


def _one_image(folder: Path, file_name: str = "a.png", size=(32, 32)) -> dict:
    if not (folder / file_name).exists():
        _write(folder / file_name, np.full((*size, 3), 90, np.uint8))
    return {"id": 1, "file_name": file_name, "width": size[1], "height": size[0]}


def _secret(inputs: Path) -> Path:
    return _write(inputs / "private" / "photo.png", np.full((32, 32, 3), 7, np.uint8))


def _coco_escape(kind: str):
    def build(inputs: Path, out: Path) -> list:
        secret = _secret(inputs)
        folder = inputs / "coco"
        name = {"dotdot": "../private/photo.png", "absolute": str(secret), "link": "photo.png"}[kind]
        if kind == "link":
            folder.mkdir(parents=True)
            (folder / "photo.png").symlink_to(secret)
        image = {"id": 1, "file_name": name, "width": 32, "height": 32}
        return ["import", _coco(folder, [_one_image(folder), dict(image, id=2)]), "--out", out]
    return build


def _voc_split_escape(inputs: Path, out: Path) -> list:
    _secret(inputs)
    root = inputs / "VOC"
    _write(root / "JPEGImages" / "a.png", np.zeros((32, 32, 3), np.uint8))
    write_label_image(root / "SegmentationClass" / "a.png", np.zeros((32, 32), np.uint8))
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n../../private/photo\n")
    return ["import", root, "--split", "val", "--out", out]


def _mask_folder_link(inputs: Path, out: Path) -> list:
    secret = _secret(inputs)
    _write(inputs / "images" / "a.png", np.zeros((32, 32, 3), np.uint8))
    (inputs / "images" / "b.png").symlink_to(secret)
    for stem in "ab":
        write_label_image(inputs / "masks" / f"{stem}.png", np.zeros((32, 32), np.uint8))
    return ["import", inputs / "images", "--masks", inputs / "masks", "--classes", "cat", "--out", out]


def _coco_written_elsewhere(inputs: Path, out: Path) -> list:
    from napari_maskclip.export import export_sample
    from napari_maskclip.export.coco import export_coco

    labels = np.zeros((24, 30), np.uint8)
    labels[4:12, 5:20] = 1
    export_sample(inputs / "ds", "s0", np.zeros((24, 30, 3), np.uint8), labels, "cat")
    (inputs / "shared").mkdir()
    export_coco(inputs / "ds", inputs / "shared" / "x.json")
    return ["import", inputs / "shared" / "x.json", "--out", out]


def _coco_geometry(segmentation=None, bbox=None, size=(32, 32), counts=None):
    def build(inputs: Path, out: Path) -> list:
        folder = inputs / "coco"
        image = _one_image(folder, size=(32, 32))
        image.update(width=size[1], height=size[0])
        ann = {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0}
        if segmentation is not None:
            ann["segmentation"] = segmentation
        if bbox is not None:
            ann["bbox"] = bbox
        if counts is not None:
            ann["segmentation"] = {"size": list(size), "counts": counts}
        return ["import", _coco(folder, [image], [ann]), "--out", out]
    return build


_ZIGZAG = [v for i in range(20000) for v in ((-1e300 if i % 2 else 1e300), float(i % 32))]


def _image_file(name: str, content):
    """``segment`` of one image file; ``content``: its bytes, or a function making them."""
    def build(inputs: Path, out: Path) -> list:
        data = content() if callable(content) else content
        return ["segment", _write(inputs / name, data), "--classes", "red circle", "--out", out,
                *SEGMENT]
    return build


def _png_zeros(width: int, height: int) -> bytes:
    """A complete, valid RGB PNG of zeros (deflate at its best: ~1/1000 of the pixels' size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, parts = zlib.compressobj(9), b"\0" * (1 + 3 * width), []
    for _ in range(height):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def _zarr_source(damage):
    def build(inputs: Path, out: Path) -> list:
        zarr = pytest.importorskip("zarr")
        path = inputs / "img.zarr"
        z = zarr.create_array(str(path), shape=(128, 128), chunks=(64, 64), dtype="float32")
        z[:] = np.random.default_rng(0).random((128, 128), dtype=np.float32)
        damage(path)
        return ["segment", path, "--classes", "red circle", "--out", out.with_suffix(".zarr"),
                *SEGMENT]
    return build


def _zarr_meta(path: Path, change) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    change(meta)
    (path / "zarr.json").write_text(json.dumps(meta))


# (case id, build(inputs, out) -> CLI args, exit code, words the one stderr line must hold
#  (rc 0: none), memory limit)
BOUNDED_CASES = [
    # 21.1: a file name must resolve inside the folder it is relative to (links followed)
    ("coco-name-dotdot", _coco_escape("dotdot"), 1, ["outside the images folder", "'../private/photo.png'"], IMPORT_MEMORY),
    ("coco-name-absolute", _coco_escape("absolute"), 1, ["outside the images folder", "photo.png"], IMPORT_MEMORY),
    ("coco-name-symlink", _coco_escape("link"), 1, ["outside the images folder", "private"], IMPORT_MEMORY),
    ("voc-split-name-escapes", _voc_split_escape, 1, ["outside the masks folder", "private/photo"], IMPORT_MEMORY),
    ("mask-folder-symlink", _mask_folder_link, 1, ["outside the images folder", "b.png"], IMPORT_MEMORY),
    # 20.4: a COCO file exported elsewhere says which --images it needs
    ("coco-exported-elsewhere", _coco_written_elsewhere, 1, ["--images", "ds"], IMPORT_MEMORY),
    # 21.2: geometry clipped or refused against the image, never sized by the file's numbers
    ("polygon-1.7e308", _coco_geometry([[-1.7e308, 0, 1.7e308, 0, 0, 1.7e308]]), 0, [], IMPORT_MEMORY),
    ("polygon-zigzag-1e300", _coco_geometry([_ZIGZAG]), 1, ["Nothing was imported", "outline"], IMPORT_MEMORY),
    ("bbox-1e300", _coco_geometry([], bbox=[0, 0, 1e300, 1e300]), 0, [], IMPORT_MEMORY),
    ("rle-counts-1e15", _coco_geometry(counts=[10**15]), 1, ["Nothing was imported", "RLE"], IMPORT_MEMORY),
    ("declared-1e6-square", _coco_geometry([[1, 1, 6, 1, 6, 6]], size=(10**6, 10**6)), 1, ["pixel limit"], IMPORT_MEMORY),
    # 21.5: a header that declares more than its file holds, a damaged chunk, a store's metadata
    ("png-header-16000", _image_file("huge.png", _png_header_only(16000, 16000)), 1, ["huge.png", "declares"], SEGMENT_MEMORY),
    ("tiff-header-16000", _image_file("huge.tif", _tiff_header_only(16000, 16000)), 1, ["huge.tif", "declares"], SEGMENT_MEMORY),
    ("png-over-memory-limit", _image_file("zeros.png", lambda: _png_zeros(12000, 12000)), 1,
     ["zeros.png", "decodes to", "RLIMIT_DATA"], 600 << 20),
    ("zarr-garbage-chunk", _zarr_source(lambda p: (p / "c" / "0" / "1").write_bytes(b"garbage" * 9)), 1,
     ["img.zarr", "chunk c/0/1", "cannot be read"], SEGMENT_MEMORY),
    ("zarr-declares-1e9-square", _zarr_source(lambda p: _zarr_meta(p, lambda m: m.update(shape=[10**9, 10**9]))), 1,
     ["img.zarr", "declares"], SEGMENT_MEMORY),
    ("zarr-metadata-nested", _zarr_source(lambda p: (p / "zarr.json").write_text("[" * 100000)), 1,
     ["img.zarr"], SEGMENT_MEMORY),
]


@pytest.mark.parametrize("build, rc, needles, memory", [c[1:] for c in BOUNDED_CASES],
                         ids=[c[0] for c in BOUNDED_CASES])
def test_inputs_that_escape_or_claim_too_much(tmp_path, build, rc, needles, memory):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    args = build(inputs, out)
    before = snapshot(inputs)
    proc = run_cli(*args, "--quiet", memory=memory, timeout=120)
    if rc == 0:
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        from napari_maskclip.export import read_dataset

        mask = read_dataset(out)[read_dataset(out).names[0]].read_mask()
        assert mask.shape == (32, 32) and (mask != 0).any()  # the clipped geometry landed
    else:
        assert_one_line_failure(proc, *needles)
        assert proc.returncode == rc
        assert not out.exists() and not out.with_suffix(".zarr").exists()
    assert snapshot(inputs) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["inputs"] + (["out"] if rc == 0 else []))


# 21.8: arrays of the wrong shape or kind through the Python API: InvalidInputError saying what
# was expected, never numpy's broadcast/KeyError from deep inside.
def _series(tmp_path: Path):
    from napari_maskclip.series import SeriesSession, list_images

    _write(tmp_path / "imgs" / "a.png", np.zeros((20, 30, 3), np.uint8))
    return SeriesSession.open(list_images(tmp_path / "imgs"), tmp_path / "sds", "cat, dog")


def _export(tmp_path: Path, **kwargs):
    from napari_maskclip.export import export_sample

    args = dict(image=np.zeros((20, 30, 3), np.uint8), labels=np.zeros((20, 30), np.uint8))
    args.update(kwargs)
    return export_sample(tmp_path / "ds", "a", args.pop("image"), args.pop("labels"), "cat", **args)


_IMG, _LAB = np.zeros((20, 30, 3), np.uint8), np.zeros((20, 30), np.uint8)
API_CASES = [
    ("series-edited-shape", lambda t: _series(t).save(0, _IMG, _LAB, edited=np.ones((5, 5), bool)),
     ["edited mask of image 0", "(5, 5)", "20 x 30"]),
    ("series-edited-3d", lambda t: _series(t).save(0, _IMG, _LAB, edited=np.ones((20, 30, 3), bool)),
     ["edited mask", "20 x 30"]),
    ("series-edited-float", lambda t: _series(t).save(0, _IMG, _LAB, edited=np.full((20, 30), 0.5)),
     ["edited mask", "booleans", "float64"]),
    ("series-image-objects", lambda t: _series(t).save(0, np.full((20, 30), None), _LAB),
     ["Image 0", "numbers", "object"]),
    ("series-image-shape", lambda t: _series(t).save(0, np.zeros((30,), np.uint8), _LAB),
     ["Image 0", "(30,)", "20 x 30"]),
    ("series-labels-float", lambda t: _series(t).save(0, _IMG, _LAB.astype(float)), ["integers"]),
    ("series-labels-text", lambda t: _series(t).save(0, _IMG, "labels"), ["labels of image 0", "array"]),
    ("export-image-objects", lambda t: _export(t, image=np.full((20, 30), None)), ["image", "numbers"]),
    ("export-image-complex", lambda t: _export(t, image=np.zeros((20, 30), np.complex64)), ["complex"]),
    ("export-edited-float", lambda t: _export(t, edited=np.full((20, 30), 0.5)), ["edited mask", "booleans"]),
    ("export-probabilities-int", lambda t: _export(t, probabilities=np.zeros((1, 20, 30), np.int64)),
     ["probabilities", "floats"]),
    ("export-probabilities-text", lambda t: _export(t, probabilities="maps"), ["probabilities", "array"]),
    ("evaluate-gt-float", lambda t: __import__("napari_maskclip.evaluate", fromlist=["x"]).confusion_matrix(
        _LAB, np.full((20, 30), 0.5), 3), ["ground truth", "integer"]),
    ("evaluate-classes-1e9", lambda t: __import__("napari_maskclip.evaluate", fromlist=["x"]).confusion_matrix(
        _LAB, _LAB, 10**9), ["num_classes", "65536"]),
    ("evaluate-not-pairs", lambda t: __import__("napari_maskclip.evaluate", fromlist=["x"]).evaluate_arrays(
        [_LAB], 3), ["pair"]),
]


@pytest.mark.parametrize("call, needles", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_wrong_arrays_through_the_python_api(tmp_path, call, needles):
    from napari_maskclip.errors import InvalidInputError

    with pytest.raises(InvalidInputError) as info:
        call(tmp_path)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert not (tmp_path / "ds").exists()  # refused before anything was written
