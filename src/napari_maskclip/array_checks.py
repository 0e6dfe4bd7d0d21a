"""Checks of the arrays handed to the public Python API, with messages that say what was expected.

Without them a wrong argument surfaces deep inside numpy (``operands could not be broadcast``,
``KeyError: 'O'``) far from the call that caused it. Each check raises
:class:`~napari_maskclip.errors.InvalidInputError` naming the argument, what it got and what it
needed. Lazy arrays (dask, zarr) pass untouched: only ``shape`` and ``dtype`` are looked at.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from .errors import InvalidInputError

__all__ = ["require_array", "require_kind", "require_shape", "KINDS"]

#: numpy dtype kinds by what they hold: the project's names for them in messages.
KINDS = {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "c": "complex numbers",
         "O": "Python objects", "U": "text", "S": "bytes", "V": "raw records", "M": "dates",
         "m": "time spans"}


def require_array(value: Any, what: str) -> Any:
    """``value`` when it is array-like with a shape and a dtype (numpy, dask, zarr), a nested list
    of numbers as a numpy array; anything else is refused."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return value
    if isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as exc:  # ragged lists
            raise InvalidInputError(f"{what} must be an array; got a list that is not one "
                                    f"({exc}).") from exc
        if array.dtype.kind in "biuf" and array.ndim:
            return array
    raise InvalidInputError(f"{what} must be a numpy (or dask/zarr) array, got "
                            f"{type(value).__name__}.")


def require_kind(array: Any, what: str, kinds: str, expected: str) -> None:
    """Refuse an array whose dtype kind is not one of ``kinds`` (e.g. ``"biu"``)."""
    kind = np.dtype(array.dtype).kind
    if kind not in kinds:
        raise InvalidInputError(
            f"{what} must hold {expected}, got {KINDS.get(kind, kind)} ({np.dtype(array.dtype)})."
        )


def require_shape(array: Any, what: str, expected: Sequence[Optional[int]],
                  meaning: str = "") -> None:
    """Refuse an array whose shape is not ``expected`` (``None``: any size on that axis)."""
    shape = tuple(int(n) for n in array.shape)
    if len(shape) != len(expected) or any(e is not None and s != e
                                          for s, e in zip(shape, expected)):
        want = " x ".join("N" if e is None else str(e) for e in expected)
        raise InvalidInputError(
            f"{what} has shape {shape}; expected {want}{f' ({meaning})' if meaning else ''}."
        )
