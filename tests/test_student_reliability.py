"""Training never loses a run: the checkpoint's place is checked before the first iteration, a
failed save keeps the last good checkpoint, Ctrl-C acts between iterations only (so resuming stays
bit-exact, batch-norm statistics included), a killed run's temporary files are removed, and two
runs cannot write one checkpoint at once.

Disks that are read-only or full are real: small tmpfs mounts (the tests run as root, so file
modes would not stop a write); without permission to mount, those tests are skipped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import napari_maskclip
from napari_maskclip.cli import main
from napari_maskclip.errors import OutputError
from napari_maskclip.progress import run_to_completion
from napari_maskclip.student import load_checkpoint, read_checkpoint_meta, train, train_iter
from napari_maskclip.student.network import StudentNet

from foreground import TerminalSigint, sigint_as_in_a_terminal
from hang_guard import HANG_GUARD_S
from test_student_cli import TINY, dataset  # noqa: F401  (fixture)
from test_student_train import random_embeddings, shapes_data, tiny_settings


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One torch thread for the whole module, its module fixtures included: ``straight`` is
    compared bit for bit with runs made in the tests, and torch's reductions (convolution weight
    gradients) round differently with another number of threads (5 of 52 tensors differ with 2).
    A function-scoped pin came too late for ``straight`` (module fixtures are set up first), so
    whenever the process ran with another thread count (OMP_NUM_THREADS=2, say) exactly the five
    tests that compare with it failed (issue 20)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return shapes_data(6, size=48)


@pytest.fixture(scope="module")
def emb():
    return random_embeddings(4, 16)


def settings(**changes):
    """8 iterations, saved every 2, validated every 3: saves, validations and batch norm."""
    return tiny_settings(save_interval=2, **changes)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data, emb) -> Path:
    """The uninterrupted run every other run must equal."""
    path = tmp_path_factory.mktemp("straight") / "s.safetensors"
    train(data, path, settings=settings(), class_embeddings=emb, device="cpu")
    return path


def assert_same_run(a: Path, b: Path) -> None:
    """Every tensor (weights, batch-norm buffers, momentum) bit for bit, and the same history.
    Both runs must have used the same number of torch threads (see ``_one_torch_thread``)."""
    assert torch.get_num_threads() == 1
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    assert any(k.endswith("running_mean") for k in ta) and any(k.startswith("optimizer/") for k in ta)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different
    ma, mb = read_checkpoint_meta(a), read_checkpoint_meta(b)
    assert ma["iteration"] == mb["iteration"] and ma["complete"] == mb["complete"]
    assert ma["history"] == mb["history"]


def train_steps(gen) -> list[int]:
    """Run a training generator to its end; the iterations it reported."""
    done = []
    while True:
        try:
            step = next(gen)
        except StopIteration:
            return done
        if step.stage == "train":
            done.append(step.done)


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size, read_only=False)``: a real tmpfs of that size; unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str, *, read_only: bool = False) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                  capture_output=True, text=True)
        except OSError as exc:
            pytest.skip(f"cannot mount here: {exc}")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        for _ in range(3):  # a test may have stacked another mount on it
            if os.path.ismount(where):
                subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path) -> Path:
    """Fill the disk at ``where`` to the last byte with one file; return it."""
    filler = where / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (2**16, 2**12, 1):
            try:
                while True:
                    os.write(fd, bytes(size))
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


# ---- 9.4: the output is checked before the first iteration -------------------------------------

def refused_before_training(gen) -> OutputError:
    """Step ``gen`` until it fails; it must fail with OutputError before any iteration."""
    with pytest.raises(OutputError) as info:
        for step in gen:
            assert step.stage != "train" or step.done == 0, "an iteration ran before the refusal"
    return info.value


def test_a_folder_as_output_is_refused_before_training(tmp_path, data, emb):
    folder = tmp_path / "out.safetensors"
    (folder / "mine").mkdir(parents=True)
    for overwrite in (False, True):
        error = refused_before_training(train_iter(data, folder, settings=settings(),
                                                   class_embeddings=emb, overwrite=overwrite,
                                                   device="cpu"))
        assert "is a folder" in str(error) and str(folder) in str(error)
    assert [p.name for p in folder.iterdir()] == ["mine"]


def test_an_output_inside_a_file_is_refused_before_training(tmp_path, data, emb):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    error = refused_before_training(train_iter(data, notes / "s.safetensors", settings=settings(),
                                               class_embeddings=emb, device="cpu"))
    assert str(notes) in str(error)
    assert notes.read_text() == "mine"


def test_a_pipe_or_link_as_output_is_refused(tmp_path, data, emb):
    """Only a regular file is ever replaced: not a pipe (or a device: as root, a rename would
    replace the device node), not a link (the link would be lost). A pipe and a link in the test
    folder stand for them; a real device is never used as a target."""
    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)
    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    link = tmp_path / "link.safetensors"
    link.symlink_to(mine)
    for path in (pipe, link):
        error = refused_before_training(train_iter(data, path, settings=settings(),
                                                   class_embeddings=emb, overwrite=True,
                                                   device="cpu"))
        assert "not a regular file" in str(error) and str(path) in str(error)
    assert pipe.is_fifo() and link.is_symlink() and mine.read_text() == "mine"


def test_a_read_only_disk_is_refused_before_training(small_disk, data, emb):
    disk = small_disk("1m", read_only=True)
    error = refused_before_training(train_iter(data, disk / "s.safetensors", settings=settings(),
                                               class_embeddings=emb, device="cpu"))
    assert "read-only" in str(error)


@pytest.mark.parametrize("size, words", [("32k", "disk is full"), ("256k", "free")])
def test_a_full_disk_is_refused_before_training(small_disk, data, emb, size, words):
    """32 KiB: the probe file cannot be written. 256 KiB: the probe fits, the checkpoint (about
    0.7 MB for the tiny student) would not."""
    disk = small_disk(size)
    error = refused_before_training(train_iter(data, disk / "s.safetensors", settings=settings(),
                                               class_embeddings=emb, device="cpu"))
    assert words in str(error)
    assert sorted(p.name for p in disk.iterdir()) == [".s.safetensors.lock"]  # no probe left


def test_cli_unwritable_outputs_are_one_line(dataset, tmp_path, small_disk, capsys):  # noqa: F811
    folder = tmp_path / "folder"
    folder.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    read_only = small_disk("1m", read_only=True)
    full = small_disk("32k")
    for out in (folder, notes / "s.safetensors", read_only / "s.safetensors", full / "s.safetensors"):
        args = ["train", str(dataset), "--out", str(out), "--iterations", "2", *TINY]
        assert main([*args, "--overwrite"]) == 1, out
        assert str(out) in one_line_error(capsys)
    assert list(folder.iterdir()) == [] and notes.read_text() == "mine"


# ---- 9.4: a failed save later keeps the last good checkpoint -----------------------------------

@pytest.mark.parametrize("failure", ["full", "read-only"])
def test_a_failed_save_keeps_the_last_good_checkpoint(small_disk, data, emb, straight, failure):
    disk = small_disk("4m")
    path = disk / "s.safetensors"
    gen = train_iter(data, path, settings=settings(), class_embeddings=emb, device="cpu")
    filler = None
    with pytest.raises(OutputError) as info:
        for step in gen:
            if step.stage == "train" and step.done == 3:  # saved at 2, the next save is at 4
                assert load_checkpoint(path).iteration == 2
                if failure == "full":
                    filler = fill(disk)
                else:  # the folder turns read-only: a read-only disk mounted over it
                    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs",
                                    str(disk)], check=True)
    message = str(info.value)
    assert "iteration 4" in message and f"{path} still holds iteration 2" in message
    assert ("disk is full" if failure == "full" else "read-only") in message
    if filler is not None:
        filler.unlink()
    else:
        subprocess.run(["umount", str(disk)], check=True)
    assert load_checkpoint(path).iteration == 2  # intact
    assert not [p for p in disk.iterdir() if p.name.startswith(".tmp-")]
    # Fixed: resuming loses nothing but the two unsaved iterations, and ends where the
    # uninterrupted run ended, bit for bit.
    assert train_steps(train_iter(data, path, resume=True, device="cpu"))[-1] == 8
    assert_same_run(straight, path)


# ---- 9.5: Ctrl-C takes effect between iterations -----------------------------------------------

class _CtrlC:
    """Sends this process SIGINT from inside training forward pass number ``at`` (after its
    batch-norm layers have updated their statistics), ``times`` times in a row. SIGINT raises
    ``KeyboardInterrupt`` during the block even where the suite runs with it ignored (a background
    job); ``after`` is the handler training left installed."""

    def __init__(self, at: int, times: int = 1) -> None:
        self.at, self.times, self.calls = at, times, 0
        self._sigint = TerminalSigint()

    def __call__(self, module, args, output) -> None:
        if isinstance(module, StudentNet) and module.training:
            self.calls += 1
            if self.calls == self.at:
                for _ in range(self.times):
                    signal.raise_signal(signal.SIGINT)

    def __enter__(self) -> "_CtrlC":
        self._sigint.__enter__()
        self.handle = torch.nn.modules.module.register_module_forward_hook(self)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        self._sigint.__exit__(*exc)
        self.after = self._sigint.after


def test_ctrl_c_inside_an_iteration_waits_for_its_end(tmp_path, data, emb, straight):
    path = tmp_path / "b.safetensors"
    with _CtrlC(at=4) as ctrl_c, pytest.raises(KeyboardInterrupt):
        run_to_completion(train_iter(data, path, settings=settings(), class_embeddings=emb,
                                     device="cpu"))
    # The 4th step completed and was saved with its own batch-norm statistics (before the fix:
    # iteration 3 was saved with statistics of 4 forward passes, and 15 of 52 tensors of the
    # resumed run differed from the uninterrupted one).
    assert load_checkpoint(path).iteration == 4
    assert ctrl_c.after is signal.default_int_handler  # training put the handler back
    run_to_completion(train_iter(data, path, resume=True, device="cpu"))
    assert_same_run(straight, path)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_save(tmp_path, data, emb, straight):
    path = tmp_path / "b.safetensors"
    with _CtrlC(at=6, times=2), pytest.raises(KeyboardInterrupt):
        run_to_completion(train_iter(data, path, settings=settings(), class_embeddings=emb,
                                     device="cpu"))
    assert load_checkpoint(path).iteration == 4  # the half-done 6th step was not saved
    run_to_completion(train_iter(data, path, resume=True, device="cpu"))
    assert_same_run(straight, path)


def test_cancel_between_iterations_resumes_exactly(tmp_path, data, emb, straight):
    """The widget's Cancel closes the generator at a yield (it cannot close a running one)."""
    path = tmp_path / "b.safetensors"
    gen = train_iter(data, path, settings=settings(), class_embeddings=emb, device="cpu")
    for step in gen:
        if step.stage == "train" and step.done == 3:
            gen.close()
    assert load_checkpoint(path).iteration == 3
    run_to_completion(train_iter(data, path, resume=True, device="cpu"))
    assert_same_run(straight, path)


def _child(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh Python with this napari_maskclip first on the path."""
    env = dict(os.environ, PYTHONPATH=str(Path(napari_maskclip.__file__).parents[1]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=env, timeout=HANG_GUARD_S, preexec_fn=sigint_as_in_a_terminal)


SIGINT_IN_FORWARD = """
import os, signal, sys
import torch
from napari_maskclip.student.network import StudentNet

at, calls = int(sys.argv[1]), [0]

def ctrl_c(module, args, output):  # SIGINT from inside forward pass number `at`
    if isinstance(module, StudentNet) and module.training:
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGINT)

torch.set_num_threads(1)
torch.nn.modules.module.register_module_forward_hook(ctrl_c)
from napari_maskclip.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_cli_ctrl_c_mid_step_then_resume_is_bit_exact(dataset, tmp_path):  # noqa: F811
    """A real process gets SIGINT in the middle of its 4th training step: it finishes that step,
    saves it, says so, exits 130; resuming ends where an uninterrupted run ends, bit for bit."""
    args = [str(dataset), "--iterations", "7", "--save-every", "0", *TINY]
    reference = tmp_path / "straight.safetensors"
    assert main(["train", *args, "--out", str(reference)]) == 0
    path = tmp_path / "s.safetensors"
    child = _child(SIGINT_IN_FORWARD, "4", "train", *args, "--out", str(path))
    assert child.returncode == 130, child.stderr
    assert f"{path} holds iteration 4" in child.stderr and "Traceback" not in child.stderr
    assert read_checkpoint_meta(path)["iteration"] == 4
    assert main(["train", str(dataset), "--out", str(path), "--resume", "--quiet"]) == 0
    assert_same_run(reference, path)


# ---- 9.6: a killed run's temporary files; one writer per checkpoint ----------------------------

KILLED_WHILE_SAVING = """
import os, signal, sys
import torch

real_fsync = os.fsync

def fsync(fd):  # SIGKILL once the second checkpoint is written, before it is renamed
    name = os.readlink(f"/proc/self/fd/{fd}")
    if os.path.basename(name).startswith(".tmp-s.safetensors-") and os.path.exists(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)

os.fsync = fsync
torch.set_num_threads(1)
from napari_maskclip.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_killed_runs_temporary_files_are_removed_by_the_next(dataset, tmp_path):  # noqa: F811
    path = tmp_path / "s.safetensors"
    child = _child(KILLED_WHILE_SAVING, str(path), "train", str(dataset), "--out", str(path),
                   "--iterations", "6", "--save-every", "2", *TINY)
    assert child.returncode == -signal.SIGKILL, child.stderr
    leftovers = sorted(p.name for p in tmp_path.glob(".tmp-*"))
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-s.safetensors-"), leftovers
    assert read_checkpoint_meta(path)["iteration"] == 2
    # Files the next run must not touch: other checkpoints' temporary files (maybe another live
    # run's), files named almost like a leftover, a link and a folder named exactly like one.
    keep = [".tmp-t.safetensors-abcd1234.safetensors", ".tmp-s.safetensors-abcd1234.json",
            ".tmp-s.safetensors-abc.safetensors", ".tmp-abcd1234.safetensors",
            "s.safetensors-abcd1234.safetensors"]
    for name in keep:
        (tmp_path / name).write_text("not yours")
    (tmp_path / ".tmp-s.safetensors-link0000.safetensors").symlink_to(tmp_path / keep[0])
    (tmp_path / ".tmp-s.safetensors-fold0000.safetensors").mkdir()
    assert main(["train", str(dataset), "--out", str(path), "--resume", "--quiet"]) == 0
    assert read_checkpoint_meta(path)["iteration"] == 6
    assert not (tmp_path / leftovers[0]).exists()
    for name in keep:
        assert (tmp_path / name).read_text() == "not yours"
    assert (tmp_path / ".tmp-s.safetensors-link0000.safetensors").is_symlink()
    assert (tmp_path / ".tmp-s.safetensors-fold0000.safetensors").is_dir()


def test_two_runs_cannot_write_one_checkpoint(tmp_path, data, emb, dataset, capsys):  # noqa: F811
    path = tmp_path / "s.safetensors"
    first = train_iter(data, path, settings=settings(), class_embeddings=emb, device="cpu")
    next(first)  # set up: the checkpoint is locked from here to the end of the run
    with pytest.raises(OutputError, match="Another training is writing"):
        next(train_iter(data, path, settings=settings(), class_embeddings=emb, overwrite=True,
                        device="cpu"))
    with pytest.raises(OutputError, match="Another training is writing"):
        next(train_iter(data, path, resume=True, device="cpu"))
    assert main(["train", str(dataset), "--out", str(path), "--overwrite", "--iterations", "2",
                 *TINY]) == 1
    assert "Another training is writing" in one_line_error(capsys)
    assert train_steps(first)[-1] == 8  # the first run was not disturbed
    assert read_checkpoint_meta(path)["iteration"] == 8
    # Ended: the lock is free again.
    assert train_steps(train_iter(data, path, resume=True, iterations=9, device="cpu"))[-1] == 9


def test_a_lock_is_released_when_a_run_fails_or_is_closed(tmp_path, data, emb):
    path = tmp_path / "s.safetensors"
    with pytest.raises(Exception, match="class_embeddings"):
        run_to_completion(train_iter(data, path, settings=settings(),
                                     class_embeddings=random_embeddings(2), device="cpu"))
    gen = train_iter(data, path, settings=settings(), class_embeddings=emb, device="cpu")
    next(gen)
    gen.close()
    train(data, path, settings=settings(iterations=2), class_embeddings=emb, device="cpu")
    assert load_checkpoint(path).iteration == 2
