"""The suite's warning guard (pyproject.toml, [tool.pytest.ini_options] filterwarnings): a
deprecation warning that a library attributes to one of napari_maskclip's own frames is an error,
so a call that napari, numpy or torch deprecate fails the suite the day it starts warning.

The checks apply the configured filters themselves, in pytest's order, so they test what
``./run.sh test`` runs with even when a ``-W`` option on the command line overrides them."""

import builtins
import contextlib
import importlib
import re
import warnings

import numpy as np
import pytest
import torch

GUARDED = ("DeprecationWarning", "PendingDeprecationWarning", "FutureWarning")


def _category(name: str) -> type[Warning]:
    if not name:
        return Warning
    if "." not in name:
        return getattr(builtins, name)
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


@contextlib.contextmanager
def suite_filters(config: pytest.Config):
    """The ini ``filterwarnings`` lines in force, later lines first (as pytest applies them)."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for line in config.getini("filterwarnings"):
            action, message, category, module = (line.split(":") + [""] * 4)[:4]
            warnings.filterwarnings(action, message, _category(category), module)
        yield


def _warn_from(module: str, category: type[Warning]) -> None:
    """Issue ``category`` as a library does when its stacklevel points at a caller in ``module``."""
    warnings.warn_explicit("this call is deprecated", category, filename=f"{module}.py",
                           lineno=1, module=module)


def _run_as(module: str, source: str) -> None:
    """Run ``source`` in a frame of module ``module`` (what warnings attribute a call to)."""
    path = module.replace(".", "/") + ".py"
    exec(compile(source, path, "exec"), {"__name__": module, "np": np, "torch": torch})


def test_the_config_turns_our_deprecations_into_errors(pytestconfig):
    lines = pytestconfig.getini("filterwarnings")
    for name in GUARDED:
        assert f"error::{name}:napari_maskclip" in lines
    # No later line (later lines win) applies to our modules: an empty module field would.
    last_guard = max(lines.index(f"error::{name}:napari_maskclip") for name in GUARDED)
    later_modules = [(line.split(":") + [""] * 4)[3] for line in lines[last_guard + 1:]]
    assert not [m for m in later_modules if re.match(m, "napari_maskclip.plugin.layers")]


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
@pytest.mark.parametrize("module", ["napari_maskclip", "napari_maskclip.plugin._qt.segment_panel"])
def test_a_deprecation_attributed_to_our_code_is_an_error(pytestconfig, module, category):
    with suite_filters(pytestconfig), pytest.raises(category, match="this call is deprecated"):
        _warn_from(module, category)


# Calls these libraries deprecate today (their own warnings, stacklevel at the caller).
REAL_DEPRECATIONS = [
    ("numpy", "np.row_stack([[1], [2]])", DeprecationWarning),
    ("torch", "torch.cuda.amp.autocast()", FutureWarning),
]


@pytest.mark.parametrize("library, source, category", REAL_DEPRECATIONS,
                         ids=[d[0] for d in REAL_DEPRECATIONS])
def test_a_real_deprecated_call_from_our_module_fails(pytestconfig, library, source, category):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _run_as("someone_else", source)
    except AttributeError:
        pytest.skip(f"{library} has removed {source} (no longer a deprecation to probe with)")
    with suite_filters(pytestconfig), pytest.raises(category):
        _run_as("napari_maskclip._guard_probe", source)


def test_the_guard_is_scoped_to_our_modules(pytestconfig):
    """The same warnings attributed to another package stay warnings."""
    with suite_filters(pytestconfig), warnings.catch_warnings(record=True) as caught:
        _warn_from("someone_else.module", DeprecationWarning)
        _run_as("someone_else", REAL_DEPRECATIONS[0][1])
    assert [type(w.message) for w in caught] == [DeprecationWarning, DeprecationWarning]
