"""Huge images (``segment BIG --out OUT.zarr``, :func:`segment_large`): zarr, OME-Zarr and TIFF
sources tiled with a halo, here and on real dask clusters; the result must equal the engine's
single-process sliding-window run on the whole image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

zarr = pytest.importorskip("zarr")
pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

from napari_maskclip.cli import main  # noqa: E402
from napari_maskclip.engine import Segmenter, load_clip  # noqa: E402
from napari_maskclip.engine.settings import SegmentSettings  # noqa: E402
from napari_maskclip.engine.windows import axis_starts  # noqa: E402
from napari_maskclip.errors import InvalidInputError, OutputError  # noqa: E402
from napari_maskclip.huge import read_large_meta, segment_large  # noqa: E402
from napari_maskclip.progress import run_to_completion  # noqa: E402
from napari_maskclip.synthetic import make_scene  # noqa: E402

CLASSES = "red circle, green square, blue triangle, yellow star"
WINDOW = 64  # the demo model's patch is 8: 64-px windows every 32 px
OPTIONS = dict(classes=CLASSES, model="demo", device="cpu", precision="fp32",
               settings=SegmentSettings(window=WINDOW))


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter(load_clip("demo", None, device="cpu", precision="fp32"))


@pytest.fixture(scope="module")
def scene():
    """An RGB scene (not a multiple of any chunk size) and the engine's whole-image result."""
    return make_scene(seed=3, size=(170, 150), n_objects=(3, 4)).image


@pytest.fixture(scope="module")
def reference(segmenter, scene):
    result = segmenter(scene, CLASSES, window=WINDOW)
    assert result.settings["inference"] == "sliding" and result.settings["stride_used"] == 32
    assert len(np.unique(result.labels)) >= 3  # several classes found: equality means something
    return result


@pytest.fixture(scope="module")
def cluster_client():
    from napari_maskclip.distributed import open_client

    with open_client(workers=2) as client:
        yield client


def _zarr_array(path: Path, image: np.ndarray, chunks) -> Path:
    z = zarr.open_array(str(path), mode="w", shape=image.shape, chunks=chunks, dtype=image.dtype)
    z[:] = image
    return path


#: How far the tiled run's float32 maps may lie from the whole-image run's before the float16
#: rounding. The arithmetic is the same but not always bit for bit: a class's text embedding
#: encoded in another batch or process (another run's disk cache, a dask worker) can differ in its
#: last bit, which the softmax at CLIP's logit scale turns into up to ~5e-6 (measured: 4.8e-6).
FLOAT32_NOISE = 2.0 ** -16


def _half_float16_step(x: np.ndarray) -> np.ndarray:
    """Half the float16 spacing at ``x`` (0 <= x <= 1): 2**-12 on [0.5, 1), halving per binade
    down to the subnormals' fixed 2**-25."""
    _, exponent = np.frexp(x.astype(np.float64))
    return np.ldexp(1.0, np.maximum(exponent, -13) - 12)


def _assert_float16_of(stored: np.ndarray, reference: np.ndarray) -> None:
    """``stored`` (float16 values, maybe widened to float32 by the reader) is ``reference``
    (float32) rounded to the nearest float16, allowing FLOAT32_NOISE before the rounding: every
    value within half a float16 step plus that noise.

    Half a step alone (the former atol 2**-12) is not the right bound: where the reference lies
    within the noise of a rounding midpoint, the tiled value and the reference round to
    neighbouring float16s, one step apart (issue 20: 2.44e-4 + 6e-8). A whole step (2**-11)
    would be too loose: it also passes truncation instead of rounding, which this bound fails."""
    assert stored.shape == reference.shape
    assert (stored.astype(np.float16) == stored).all()  # float16 numbers, whatever the dtype
    error = np.abs(stored.astype(np.float64) - reference.astype(np.float64))
    excess = error - (_half_float16_step(reference) + FLOAT32_NOISE)
    assert (excess <= 0).all(), (
        f"{int((excess > 0).sum())} of {excess.size} values further than half a float16 step "
        f"(+{FLOAT32_NOISE:.1e}) from the reference; worst by {excess.max():.2e}")


def _assert_equal(out: Path, labels: np.ndarray, probabilities: np.ndarray) -> None:
    root = zarr.open_group(str(out), mode="r")
    assert root["labels"].dtype == np.uint8 and root["confidence"].dtype == np.float16
    np.testing.assert_array_equal(root["labels"][:], labels)
    _assert_float16_of(root["confidence"][:], probabilities)


def _run(source, out, **kwargs):
    steps = []
    result = run_to_completion(segment_large(source, out, **{**OPTIONS, **kwargs}), steps.append)
    return result, steps


@pytest.mark.parametrize("chunk", [64, 48, (100, 70), 512])
def test_zarr_tiles_equal_the_whole_image_sliding_window_run(scene, reference, tmp_path, chunk):
    """Chunks aligned to the stride (64), not aligned to it or to the image (48, 100x70), and
    one larger than the image: labels identical, confidence within float16 rounding."""
    source = _zarr_array(tmp_path / "big.zarr", scene, (50, 40, 3))
    out = tmp_path / "out.zarr"
    result, steps = _run(source, out, chunk=chunk)
    _assert_equal(out, reference.labels, reference.probabilities)
    chunks = (chunk, chunk) if isinstance(chunk, int) else chunk
    chunks = tuple(min(c, s) for c, s in zip(chunks, scene.shape[:2]))
    assert zarr.open_array(str(out / "labels"), mode="r").chunks == chunks
    assert result.tiles == len([s for s in steps if s.stage == "segment" and "tile " in s.message])
    assert [s.stage for s in steps].index("segment") > [s.stage for s in steps].index("encode")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_tiff_on_a_local_cluster_equals_the_whole_image_run(segmenter, tmp_path, cluster_client):
    """A uint16 gray TIFF (percentile scaling from the whole image), read through tifffile's
    zarr store by two worker processes."""
    rng = np.random.default_rng(0)
    gray = (make_scene(seed=5, size=(150, 180), n_objects=(3, 4)).image.mean(-1) * 200).astype(
        np.uint16) + rng.integers(0, 300, (150, 180), dtype=np.uint16)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, gray, tile=(64, 64))
    ref = segmenter(gray, CLASSES, window=WINDOW)
    out = tmp_path / "out.zarr"
    result, steps = _run(path, out, chunk=80, client=cluster_client)
    _assert_equal(out, ref.labels, ref.probabilities)
    assert result.tiles == 6
    workers = {s.info["stats"].worker for s in steps if "stats" in s.info}
    assert len(workers) == 2  # both workers took tiles


def test_ome_zarr_level_with_channels_first(segmenter, scene, tmp_path):
    """An OME-Zarr group (axes c, y, x; two levels): level 0 is read, channels found by axes."""
    root = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    cyx = np.moveaxis(scene, -1, 0)
    root.create_array("0", shape=cyx.shape, chunks=(3, 64, 64), dtype=cyx.dtype)[:] = cyx
    half = cyx[:, ::2, ::2]
    root.create_array("1", shape=half.shape, chunks=(3, 64, 64), dtype=half.dtype)[:] = half
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"},
            {"name": "x", "type": "space"}]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes,
                                  "datasets": [{"path": "0"}, {"path": "1"}]}]
    out = tmp_path / "out.zarr"
    _run(tmp_path / "ome.zarr", out, chunk=64)
    ref = segmenter(scene, CLASSES, window=WINDOW)
    _assert_equal(out, ref.labels, ref.probabilities)
    _run(tmp_path / "ome.zarr", tmp_path / "half.zarr", level=1, chunk=64)
    assert zarr.open_array(str(tmp_path / "half.zarr" / "labels"), mode="r").shape == (85, 75)


def test_each_task_reads_only_its_tile_and_halo(scene, tmp_path):
    """Memory is bounded by the chunk: no task reads more of the source than its tile plus one
    window, nor more window cosines than cover the tile, on an image of many tiles."""
    big = np.tile(scene, (3, 3, 1))  # 510 x 450
    source = _zarr_array(tmp_path / "big.zarr", big, (64, 64, 3))
    chunk = 96
    result, steps = _run(source, tmp_path / "out.zarr", chunk=chunk)
    stats = [(s.stage, s.info["stats"]) for s in steps if "stats" in s.info]
    assert len(stats) == 2 * result.tiles == 2 * 6 * 5
    n_windows = len(axis_starts(510, WINDOW, 32)) * len(axis_starts(450, WINDOW, 32))
    assert sum(st.windows for stage, st in stats if stage == "encode") == n_windows  # once each
    halo = WINDOW - 32
    for stage, st in stats:
        if stage == "encode":
            assert st.read_pixels <= (chunk + halo) ** 2 < big.shape[0] * big.shape[1] / 8
            assert st.windows <= (chunk // 32) ** 2
            assert (st.read_pixels > 0) == (st.windows > 0)  # (the last tiles start no window)
        else:
            assert st.read_pixels == 0  # pass 2 reads stored cosines, not the image
            assert st.windows <= (chunk // 32 + 1) ** 2


def test_output_opens_lazily_in_the_reader(scene, reference, tmp_path):
    from napari_maskclip.plugin.reader import get_reader

    out = tmp_path / "out.zarr"
    _run(_zarr_array(tmp_path / "big.zarr", scene, (64, 64, 3)), out, chunk=64)
    assert get_reader(str(tmp_path / "big.zarr")) is None  # not ours: other readers' turn
    reader = get_reader(str(out))
    layers = reader(str(out))
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image", "labels"]  # one confidence layer for the run, as in the dock
    for data, _, _ in layers:
        assert isinstance(data, da.Array)  # lazy: nothing read yet
        assert data.chunksize[-2:] == (64, 64)
    np.testing.assert_array_equal(layers[-1][0].compute(), reference.labels)
    confidence = layers[0][1]
    assert confidence["name"] == "out [maskclip] confidence" and confidence["visible"] is False
    from napari_maskclip.plugin.records import ConfidenceRecord

    record = ConfidenceRecord.from_metadata(confidence["metadata"])
    maps = record.maps_by_class()
    assert list(maps) == ["red circle", "green square", "blue triangle", "yellow star"]
    assert isinstance(maps["green square"], da.Array)  # every class's map kept, still lazy
    _assert_float16_of(maps["green square"].compute(), reference.probabilities[1])
    _assert_float16_of(layers[0][0].compute(), reference.probabilities[0])
    assert read_large_meta(out)["state"] == "complete"


def test_rerun_is_done_other_request_refused_overwrite_replaces(scene, tmp_path):
    source = _zarr_array(tmp_path / "big.zarr", scene, (64, 64, 3))
    out = tmp_path / "out.zarr"
    _run(source, out, chunk=64)
    stamp = (out / "labels" / "zarr.json").stat().st_mtime_ns
    again, _ = _run(source, out, chunk=64)
    assert again.already_done and (out / "labels" / "zarr.json").stat().st_mtime_ns == stamp
    with pytest.raises(OutputError, match="another request"):
        _run(source, out, chunk=64, classes="red circle, green square")
    replaced, _ = _run(source, out, chunk=64, classes="red circle, green square",
                       overwrite=True)
    assert replaced.classes == ["red circle", "green square"]
    assert [c["name"] for c in read_large_meta(out)["classes"]] == replaced.classes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_stopped_run_resumes_its_finished_tiles(scene, reference, tmp_path):
    source = _zarr_array(tmp_path / "big.zarr", scene, (64, 64, 3))
    out = tmp_path / "out.zarr"
    run = segment_large(source, out, chunk=64, **OPTIONS)
    for step in run:
        if step.stage == "segment" and step.done == 3:
            break
    run.close()  # stopped: the temporary store stays, the target does not exist
    assert not out.exists()
    (temp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-out.zarr-")]
    result, steps = _run(source, out, chunk=64)
    assert result.resumed == 3
    assert [s.done for s in steps if s.stage == "encode"][0] == 9  # no window encoded again
    assert not temp.exists()
    _assert_equal(out, reference.labels, reference.probabilities)


def _cli(*args: str) -> list[str]:
    return ["segment", *args, "--classes", CLASSES, "--model", "demo", "--device", "cpu",
            "--precision", "fp32", "--window", str(WINDOW), "--quiet"]


def test_cli_workers_writes_the_store_and_a_rerun_is_done(scene, reference, tmp_path, capsys):
    source = _zarr_array(tmp_path / "big.zarr", scene, (64, 64, 3))
    out = tmp_path / "out.zarr"
    assert main(_cli(str(source), "--out", str(out), "--chunk", "64", "--workers", "2")) == 0
    assert capsys.readouterr().out.strip() == "out.zarr: 150x170 px in 9 tile(s)"
    _assert_equal(out, reference.labels, reference.probabilities)
    assert main(_cli(str(source), "--out", str(out), "--chunk", "64")) == 0
    assert "already done" in capsys.readouterr().out


def _text_file(d: Path) -> Path:
    (d / "notes.txt").write_text("hi")
    return d / "notes.txt"


def _empty_folder(d: Path) -> Path:
    (d / "plain.zarr").mkdir()
    return d / "plain.zarr"


def _four_d(d: Path) -> Path:
    zarr.open_array(str(d / "4d.zarr"), mode="w", shape=(2, 3, 40, 40), dtype="u1")
    return d / "4d.zarr"


def _plain_group(d: Path) -> Path:
    zarr.open_group(str(d / "group.zarr"), mode="w")
    return d / "group.zarr"


@pytest.mark.parametrize("make, message", [
    (_text_file, "read from a .zarr"), (_empty_folder, "not a zarr array"),
    (_four_d, "huge images are 2D"), (_plain_group, "without OME-Zarr multiscales"),
])
def test_bad_inputs_end_in_one_line(tmp_path, capsys, make, message):
    source = make(tmp_path)
    assert main(_cli(str(source), "--out", str(tmp_path / "out.zarr"))) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "out.zarr").exists()


def test_a_store_not_ours_in_the_way_is_refused(scene, tmp_path, capsys):
    source = _zarr_array(tmp_path / "big.zarr", scene, (64, 64, 3))
    theirs = _zarr_array(tmp_path / "theirs.zarr", scene[..., 0], (64, 64))
    before = sorted(p.name for p in theirs.rglob("*"))
    for extra in ([], ["--overwrite"]):
        assert main(_cli(str(source), "--out", str(theirs), *extra)) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "did not make it" in err
    assert sorted(p.name for p in theirs.rglob("*")) == before


def test_refused_settings(scene, tmp_path):
    source = _zarr_array(tmp_path / "big.zarr", scene, (64, 64, 3))
    for settings, message in [(SegmentSettings(window=WINDOW, short_side=100), "native resolution"),
                              (SegmentSettings(window=WINDOW, pamr=True), "PAMR")]:
        with pytest.raises(InvalidInputError, match=message):
            _run(source, tmp_path / "out.zarr", settings=settings)
    with pytest.raises(InvalidInputError, match="level"):
        _run(source, tmp_path / "out.zarr", level=1)
    with pytest.raises(InvalidInputError, match="zarr store"):
        _run(source, tmp_path / "out.tif")


def test_key_smoothing_and_background_threshold_match_too(segmenter, scene, tmp_path):
    """Key smoothing (keys re-encoded per window in pass 2) and a background threshold, with
    denoising dropping a class absent from the scene: still the whole-image result."""
    settings = SegmentSettings(window=WINDOW, key_smoothing=True, background_threshold=0.4)
    classes = CLASSES + ", purple elephant"
    ref = segmenter(scene, classes, settings=settings)
    out = tmp_path / "out.zarr"
    result, _ = _run(_zarr_array(tmp_path / "big.zarr", scene, (64, 64, 3)), out, chunk=72,
                     classes=classes, settings=settings)
    assert result.removed_classes == ref.removed_classes
    _assert_equal(out, ref.labels, ref.probabilities)


def test_napari_opens_the_store_lazily_with_the_plugin(scene, tmp_path, make_napari_viewer):
    out = tmp_path / "out.zarr"
    _run(_zarr_array(tmp_path / "big.zarr", scene, (64, 64, 3)), out, chunk=64)
    viewer = make_napari_viewer()
    layers = viewer.open(str(out), plugin="napari-maskclip")
    assert [layer.name for layer in layers][-1] == "out [maskclip]"
    labels = viewer.layers["out [maskclip]"]
    assert type(labels).__name__ == "Labels" and isinstance(labels.data, da.Array)
    images = [layer for layer in viewer.layers if type(layer).__name__ == "Image"]
    assert len(images) == 1 and isinstance(images[0].data, da.Array) and not images[0].visible


def test_traced_memory_stays_far_below_the_image_results(scene, tmp_path):
    """tracemalloc (NumPy and Python allocations; torch's own buffers are not traced) over a
    whole run here, the model and text already loaded by a first run: the peak stays below a
    third of what the image's labels and float32 maps take, which a single-process run holds."""
    import tracemalloc

    _run(_zarr_array(tmp_path / "warm.zarr", scene, (64, 64, 3)), tmp_path / "warm_out.zarr",
         chunk=64)
    big = np.tile(scene, (3, 3, 1))  # 510 x 450
    source = _zarr_array(tmp_path / "big.zarr", big, (64, 64, 3))
    image_results = big.shape[0] * big.shape[1] * (1 + 4 * 4)  # uint8 labels + 4 float32 maps
    tracemalloc.start()
    try:
        _run(source, tmp_path / "out.zarr", chunk=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < image_results / 3, (peak, image_results)


def test_a_damaged_chunk_is_one_line_naming_it_in_the_reader_and_as_a_source(scene, tmp_path):
    """A result store or a source whose chunk no longer decodes: one InvalidInputError naming the
    store and the chunk (not the codec's RuntimeError from deep inside zarr)."""
    from napari_maskclip.lazy_source import open_source
    from napari_maskclip.plugin.reader import read_large_result

    source = _zarr_array(tmp_path / "big.zarr", scene, (64, 64, 3))
    out = tmp_path / "out.zarr"
    _run(source, out, chunk=64)
    labels = zarr.open_array(str(out / "labels"), mode="r")
    key = labels.metadata.encode_chunk_key((1, 0))
    (out / "labels" / key).write_bytes(b"not a chunk")
    layers = read_large_result(out)
    with pytest.raises(InvalidInputError, match=f"{key}.*cannot be read") as info:
        layers[-1][0].compute()
    assert str(out / "labels") in str(info.value) and "\n" not in str(info.value)
    (source / zarr.open_array(str(source), mode="r").metadata.encode_chunk_key((0, 1, 0))
     ).write_bytes(b"garbage")
    lazy = open_source(source)
    assert lazy.read(0, 10, 0, 10).shape == (10, 10, 3)  # the good chunks still read
    with pytest.raises(InvalidInputError, match=r"c/0/1/0 \(pixels \[0:64, 64:128, 0:3\]\)"):
        lazy.read(0, 100, 0, 150)
