"""Option types and option groups shared by the subcommands, written once.

argparse calls the ``*_type`` functions on the text of an option; they raise
:class:`argparse.ArgumentTypeError`, which argparse turns into a one-line usage error (exit 2).
The ``add_*`` functions add the same options, with the same help, to every command that has them.
This module imports neither torch nor numpy: ``--help`` answers instantly.
"""

from __future__ import annotations

import argparse

__all__ = [
    "positive_int",
    "nonneg_int",
    "unit_float",
    "channels_list",
    "add_channel_options",
    "add_batch_output_options",
    "add_precision_option",
]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from exc


def positive_int(text: str) -> int:
    """An integer of at least 1 (windows, iterations, batch sizes)."""
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonneg_int(text: str) -> int:
    """An integer of at least 0 (intervals where 0 means never)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def unit_float(text: str) -> float:
    """A number in 0..1 (thresholds, fractions)."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a number in 0..1, got {text!r}") from exc
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must lie in 0..1, got {text}")
    return value


def channels_list(text: str) -> list[int]:
    """``0`` or ``2,1,0``: 1 or 3 channel indices of a multichannel image."""
    try:
        picks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"channels are integers separated by commas, got {text!r}") from exc
    if len(picks) not in (1, 3):
        raise argparse.ArgumentTypeError("give 1 or 3 channels, e.g. 0 or 2,1,0")
    return picks


def add_channel_options(parser: argparse._ActionsContainer, *, plural: bool = False) -> None:
    """``--channel-axis`` and ``--channels`` for multichannel images."""
    images = "multichannel images" if plural else "a multichannel image"
    parser.add_argument("--channel-axis", type=int, default=None, metavar="AXIS",
                        help=f"axis holding channels of {images}")
    parser.add_argument("--channels", type=channels_list, default=None, metavar="I[,J,K]",
                        help=f"1 or 3 channels to use from {images}")


def add_batch_output_options(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--overwrite``, ``--no-confidence``, ``--quiet`` of ``segment``/``predict``."""
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--no-confidence", action="store_true",
                        help="skip the confidence TIFF (saves space)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar and no notes on stderr (errors only)")


#: ``--precision`` values (those of :data:`napari_maskclip.engine.precision.PRECISIONS`, written
#: out here so that ``--help`` needs no torch).
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


def add_precision_option(parser: argparse._ActionsContainer, *, kind: str = "clip") -> None:
    """``--precision`` of the CLIP encoders (``clip``: segment), of the student's autocast
    (``student``: predict) or of a training run (``train``: student and teacher, no fp16)."""
    if kind == "train":
        parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES[:3],
                            help="of the student (autocast; loss and optimiser fp32) and the "
                            "teacher; auto (default): bf16 on a CPU with native bf16 "
                            "(AVX512-BF16/AMX), else fp32 on the CPU")
        return
    if kind == "student":
        auto = "bf16 on a CPU with native bf16 (AVX512-BF16/AMX) or a bf16 GPU, else fp32"
    else:
        auto = "fp16 on a GPU; on the CPU bf16 where it has native bf16 (AVX512-BF16/AMX), else fp32"
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                        help=f"auto (default): {auto}")


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """``--scheduler`` / ``--workers``: run the batch on dask.distributed (the distributed extra)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run on the dask cluster at ADDRESS (tcp://host:port; start it with "
                       "'dask scheduler' and 'dask worker ADDRESS')")
    group.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="run on N worker processes on this machine (a dask LocalCluster)")
