"""napari reader for huge-image results (``segment BIG --out OUT.zarr``), opened lazily.

``napari OUT.zarr`` (or File > Open Folder) shows the labels and the run's confidence layer (every
class's map kept with it, as for a run in the dock) as dask arrays over the store's chunks: nothing is read until napari draws it. Stores that
napari-maskclip did not make are left to other readers (``None``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["get_reader", "read_large_result"]

LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: Any) -> Optional[Callable[[Any], list[LayerData]]]:
    """The reader of a napari-maskclip zarr result, or None for anything else."""
    from ..huge import read_large_meta

    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, Path)) or read_large_meta(path) is None:
        return None
    return lambda p: read_large_result(p[0] if isinstance(p, (list, tuple)) else p)


def _lazy(path: Path, component: str) -> Any:
    """A dask array over the store's ``component``: a damaged chunk is one line naming it
    (:mod:`napari_maskclip.checked_chunks`), a store that does not open too."""
    import dask.array as da
    import zarr

    from ..checked_chunks import CheckedArray
    from ..errors import InvalidInputError

    try:
        array = zarr.open_array(str(path / component), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for damaged metadata
        raise InvalidInputError(
            f"{path}: its {component} array cannot be opened ({type(exc).__name__}); the result "
            "is damaged: run segment again."
        ) from exc
    checked = CheckedArray(array, str(path / component))
    return da.from_array(checked, chunks=checked.chunks, asarray=False, fancy=False)


class _LazyResult:
    """What :func:`~.layers.result_layer_data` reads from a result, over dask arrays."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        classes = record.get("classes") or []
        self.class_names = [str(c["name"]) for c in classes]
        self.colors = [tuple(c["color"]) for c in classes]
        self.labels = _lazy(path, "labels")
        #: ``C x H x W`` float16 maps, lazy (the confidence layer's maps stay a dask array).
        self.probabilities: Any = []
        if (path / "confidence").is_dir():
            self.probabilities = _lazy(path, "confidence")

    def class_pixel_counts(self) -> list[int]:
        """Not counted (that would read the whole image): the confidence layer starts hidden,
        on the first class."""
        return [0] * len(self.class_names)


def read_large_result(path: str | Path) -> list[LayerData]:
    """Layer data (confidence images, then labels) of the zarr result at ``path``, lazily."""
    from ..errors import InvalidInputError
    from ..huge import read_large_meta
    from .layers import result_layer_data

    path = Path(path)
    record = read_large_meta(path)
    if record is None or record.get("state") != "complete":
        raise InvalidInputError(f"{path} is not a finished napari-maskclip result.")
    result = _LazyResult(path, record)
    name = path.name[:-len(".zarr")] if path.name.endswith(".zarr") else path.name
    layers = result_layer_data(result, source_name=name)
    for data, kwargs, kind in layers:
        kwargs.setdefault("metadata", {})["napari_maskclip_store"] = str(path)
        if kind == "image":
            kwargs["visible"] = False  # shown on request: drawing it reads the store
    return layers
