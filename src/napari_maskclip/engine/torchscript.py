"""Reading the weights of a TorchScript archive (OpenAI's original CLIP ``.pt``) without running it.

``torch.jit.load`` compiles the archive's code and runs its modules' ``__setstate__``, so a
crafted file can do anything TorchScript can (write files, for one). This reader never compiles
or runs anything from the archive:

* ``<archive>/data.pkl`` (the pickled module tree) is read by a restricted unpickler that can
  build only tensors (from the archive's own ``data/<key>`` storage records), plain containers and
  inert stand-ins for TorchScript objects (their state is kept as data; no method is ever called).
  Any other global (``os.system``...) refuses the file.
* Which attributes are parameters and buffers (what ``state_dict()`` returns) is read from the
  class definitions in ``<archive>/code/`` with :func:`ast.parse`, which parses and never runs.
* A module that restores itself with its own ``__setstate__`` code is refused: its weights are
  whatever that code makes of the pickled state, which cannot be known without running it.
"""

from __future__ import annotations

import ast
import collections
import io
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, UnsafeCheckpointError

__all__ = ["read_torchscript_state_dict"]

#: Largest code file parsed (OpenAI's largest archive has code files of a few hundred KB).
_MAX_CODE_BYTES = 16 << 20
#: Deepest module nesting followed (CLIP is about 6 deep).
_MAX_DEPTH = 64

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _convert_hint(path: Path) -> str:
    return (
        "To use it, convert it once in a Python session you trust: "
        f"m = torch.jit.load({str(path)!r}); safetensors.torch.save_file("
        "{k: v.contiguous() for k, v in m.state_dict().items()}, 'weights.safetensors'); "
        "then pass weights.safetensors."
    )


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _ClassInfo:
    is_module: bool
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]
    custom_setstate: bool


class _ScriptObject:
    """An inert stand-in for a TorchScript object: it only keeps its pickled state."""

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:  # called by pickle's BUILD; stores data only
        object.__setattr__(self, "_state", state)

    @property
    def state(self) -> Any:
        return getattr(self, "_state", None)


def _restore_type_tag(value: Any, _type: Any = None) -> Any:
    return value


def _as_list(value: Any = ()) -> list:
    return list(value)


def _ordered_dict(*args: Any) -> "collections.OrderedDict[Any, Any]":
    if args:
        raise pickle.UnpicklingError("OrderedDict with arguments")
    return collections.OrderedDict()


def _device(text: Any, *_: Any) -> str:
    return str(text)


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds tensors, containers and inert stand-ins; refuses every other global."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._storages: dict[str, torch.Tensor] = {}
        self._stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            stub = self._stubs.get(qualified)
            if stub is None:
                stub = type(name, (_ScriptObject,), {"qualified_name": qualified})
                self._stubs[qualified] = stub
            return stub
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("collections", "OrderedDict"): _ordered_dict,
            ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
            ("torch.jit._pickle", "build_intlist"): _as_list,
            ("torch.jit._pickle", "build_doublelist"): _as_list,
            ("torch.jit._pickle", "build_boollist"): _as_list,
            ("torch.jit._pickle", "build_tensorlist"): _as_list,
            ("torch", "device"): _device,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise UnsafeCheckpointError(
            f"Refusing to load {self._path}: its TorchScript data refers to {module}.{name}, which "
            f"is not a tensor (loading it could run code). {_convert_hint(self._path)}"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage record {pid!r}")
        cached = self._storages.get(key)
        if cached is not None:
            return cached
        dtype = storage_type.dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        try:
            info = self._archive.getinfo(f"{self._prefix}data/{key}")
        except KeyError:
            raise pickle.UnpicklingError(f"storage record data/{key} is missing") from None
        if info.file_size != numel * itemsize:
            raise pickle.UnpicklingError(
                f"storage record data/{key} holds {info.file_size} bytes, expected {numel * itemsize}"
            )
        raw = bytearray(self._archive.read(info))
        flat = torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        self._storages[key] = flat
        return flat

    @staticmethod
    def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> torch.Tensor:
        if not isinstance(storage, torch.Tensor):
            raise pickle.UnpicklingError("a tensor without a storage record")
        ints = [offset, *size, *stride]
        if not all(isinstance(v, int) and v >= 0 for v in ints) or len(size) != len(stride):
            raise pickle.UnpicklingError("malformed tensor shape")
        if any(s == 0 for s in size):
            return torch.empty(tuple(size), dtype=storage.dtype)
        end = offset + sum((n - 1) * st for n, st in zip(size, stride))
        if end >= storage.numel():
            raise pickle.UnpicklingError("a tensor reaches past its storage")
        return torch.as_strided(storage, tuple(size), tuple(stride), offset)


def _string_list(node: ast.AST) -> tuple[str, ...]:
    if isinstance(node, (ast.List, ast.Tuple)):
        return tuple(e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))
    return ()


def _class_table(archive: zipfile.ZipFile, prefix: str, path: Path) -> dict[str, _ClassInfo]:
    """Parameter / buffer names of every class in ``code/`` (parsed, never compiled or run)."""
    table: dict[str, _ClassInfo] = {}
    code_dir = f"{prefix}code/"
    for info in archive.infolist():
        if not (info.filename.startswith(code_dir) and info.filename.endswith(".py")):
            continue
        if info.file_size > _MAX_CODE_BYTES:
            raise ModelLoadError(f"{path}: {info.filename} is too large for a TorchScript code file.")
        module = info.filename[len(code_dir):-3].replace("/", ".")
        try:
            tree = ast.parse(archive.read(info).decode("utf-8"))
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError) as exc:
            raise ModelLoadError(f"{path}: cannot parse {info.filename} ({type(exc).__name__}).") from exc
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            fields: dict[str, tuple[str, ...]] = {}
            methods = set()
            for item in node.body:
                if isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name):
                    fields[item.targets[0].id] = _string_list(item.value)
                elif isinstance(item, ast.FunctionDef):
                    methods.add(item.name)
            bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
            table[f"{module}.{node.name}"] = _ClassInfo(
                is_module="Module" in bases,
                parameters=fields.get("__parameters__", ()),
                buffers=fields.get("__buffers__", ()),
                custom_setstate="__setstate__" in methods,
            )
    return table


def _archive_prefix(archive: zipfile.ZipFile, path: Path) -> str:
    roots = [n[: -len("data.pkl")] for n in archive.namelist()
             if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise ModelLoadError(
            f"{path} is not a TorchScript archive this version can read (no single data.pkl). "
            + _convert_hint(path)
        )
    return roots[0]


def _collect(obj: _ScriptObject, classes: dict[str, _ClassInfo], path: Path,
             out: dict[str, torch.Tensor], prefix: str = "", depth: int = 0) -> None:
    """Add ``obj``'s parameters and buffers, then its submodules', as ``state_dict()`` does."""
    if depth > _MAX_DEPTH:
        raise ModelLoadError(f"{path}: modules are nested more than {_MAX_DEPTH} deep.")
    info = classes.get(obj.qualified_name)
    if info is None:
        raise ModelLoadError(f"{path}: class {obj.qualified_name} has no definition in the archive.")
    state = obj.state
    if info.custom_setstate or not isinstance(state, dict):
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: its module {obj.qualified_name} restores its weights with "
            f"its own code (__setstate__), which napari-maskclip never runs. {_convert_hint(path)}"
        )
    for name in (*info.parameters, *info.buffers):
        value = state.get(name)
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
    for name, value in state.items():
        if isinstance(value, _ScriptObject):
            child = classes.get(value.qualified_name)
            if child is not None and child.is_module:
                _collect(value, classes, path, out, f"{prefix}{name}.", depth + 1)


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``torch.jit.load(path).state_dict()``, read without compiling or running the archive."""
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as archive:
            prefix = _archive_prefix(archive, p)
            byteorder = f"{prefix}byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).strip() != sys.byteorder.encode():
                raise ModelLoadError(f"{p} was saved on a {archive.read(byteorder).decode()}-endian machine; "
                                     "convert it there. " + _convert_hint(p))
            classes = _class_table(archive, prefix, p)
            unpickler = _RestrictedUnpickler(archive.read(f"{prefix}data.pkl"), archive, prefix, p)
            root = unpickler.load()
    except ModelLoadError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, OSError, EOFError, ValueError, TypeError,
            KeyError, IndexError, AttributeError, RuntimeError, RecursionError, MemoryError) as exc:
        raise ModelLoadError(f"Cannot read TorchScript checkpoint {p}: {exc}") from exc
    if not isinstance(root, _ScriptObject):
        raise ModelLoadError(f"{p}: its data.pkl holds no TorchScript module.")
    state: dict[str, torch.Tensor] = {}
    _collect(root, classes, p, state)
    return state
