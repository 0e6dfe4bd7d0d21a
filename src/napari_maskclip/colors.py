"""Class colours: maximally distinct, and stable for each class name.

Colours come from a categorical palette made for label maps (colorcet's Glasbey palette
``glasbey_bw_minc_20``: each colour was chosen to be as far as possible from all earlier ones, no
greys; colours darker than CIELAB L* 30 or greyer than chroma 20 are dropped here, so none is close
to the black background of label 0 or lost on a grey image). Which palette colour a class gets is
decided once and then remembered:

1. a *dataset's* colours win inside that dataset (``fixed``: its ``classes.json``);
2. a colour the user set (:func:`set_class_color`) is kept;
3. a colour remembered from an earlier list is kept, unless it is within ΔE :data:`CLASH` of a
   colour already placed in this list (then this list gives the class another colour, without
   forgetting the remembered one);
4. a new name gets the palette colour most distinct (CIELAB ΔE76) from the colours in use in this
   list. Colours at least :data:`DISTINCT_ENOUGH` away all count as distinct; among those a colour
   no other remembered class uses is preferred (so lists do not collide later), then one near a
   colour word in the name ("blue circle" gets a blue if a distinct one is left), then palette
   order. Deterministic: the same registry and list give the same colours.

The remembered colours live in ``class-colors.json`` in the user's config directory
(:func:`~napari_maskclip.config_dir.user_config_dir`): JSON, written atomically under a file
lock, at most :data:`MAX_REMEMBERED` names (oldest automatic colours go first), and a missing,
unreadable or corrupt file only means "nothing remembered yet". Imports neither torch nor Qt.

For the plugin: colour layers with :func:`~napari_maskclip.classes.class_colors` (one call per
class list, so the list stays distinct), and call :func:`set_class_color` when the user picks a
colour (:func:`reset_class_color` to return to an automatic one); the next ``class_colors`` call,
in any process, gives the new colour.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from .errors import InvalidInputError, PreferencesError

__all__ = [
    "RGBA",
    "ColorLike",
    "CLASH",
    "DISTINCT_ENOUGH",
    "MAX_REMEMBERED",
    "assign_colors",
    "color_key",
    "delta_e76",
    "min_delta_e",
    "palette",
    "registry_path",
    "remembered_colors",
    "reset_class_color",
    "set_class_color",
    "srgb_to_lab",
    "to_rgba",
]

RGBA = tuple[float, float, float, float]
#: ``(r, g, b[, a])`` in 0..1, or ``"#rrggbb"`` / ``"#rrggbbaa"``.
ColorLike = Union[Sequence[float], np.ndarray, str]

REGISTRY_FILE = "class-colors.json"
_FORMAT = "napari-maskclip-class-colors"
_VERSION = 1
#: How many class names the registry remembers.
MAX_REMEMBERED = 1000
#: ΔE76 from which two label colours count as clearly distinct (the choice then turns to
#: unused colours and colour words rather than more distance).
DISTINCT_ENOUGH = 40.0
#: A remembered automatic colour closer than this to one already placed in a list is replaced in
#: that list (the target for any 30 classes is 12).
CLASH = 12.0
#: Palette colours darker than this CIELAB L* are dropped (label 0 is black in mask files).
MIN_LIGHTNESS = 30.0
#: Palette colours greyer than this CIELAB chroma are dropped (they vanish on grey images).
MIN_CHROMA = 20.0
_LOCK_TIMEOUT_S = 5.0
_SAME = 1.0  # ΔE below which two colours are the same palette entry

#: Colour words in class names, and the colour they call for (sRGB 0..255).
_COLOR_WORDS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 160, 40), "blue": (30, 80, 240),
    "yellow": (240, 220, 20), "orange": (255, 140, 0), "purple": (140, 40, 180),
    "violet": (160, 80, 240), "pink": (255, 120, 180), "brown": (140, 80, 40),
    "cyan": (0, 200, 220), "magenta": (230, 0, 200), "teal": (0, 140, 140),
    "lime": (160, 230, 0), "gold": (230, 180, 0), "olive": (128, 140, 20),
}

_thread_lock = threading.RLock()


# -- colour arithmetic -----------------------------------------------------------------------------
def srgb_to_lab(rgb: Any) -> np.ndarray:
    """sRGB in 0..1 (``... x 3``) -> CIELAB (D65), the space ΔE76 is measured in."""
    rgb = np.asarray(rgb, dtype=np.float64)[..., :3]
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps = (6.0 / 29.0) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e76(a: ColorLike, b: ColorLike) -> float:
    """CIELAB ΔE76 (Euclidean distance in L*a*b*) between two colours."""
    return float(np.linalg.norm(srgb_to_lab(to_rgba(a)) - srgb_to_lab(to_rgba(b))))


def min_delta_e(colors: Sequence[ColorLike]) -> float:
    """The smallest ΔE76 between any two of ``colors`` (inf for fewer than two)."""
    if len(colors) < 2:
        return float("inf")
    lab = srgb_to_lab(np.array([to_rgba(c) for c in colors]))
    d = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    d[np.eye(len(lab), dtype=bool)] = np.inf
    return float(d.min())


def to_rgba(color: ColorLike) -> RGBA:
    """Validate a colour: ``(r, g, b[, a])`` in 0..1 or ``"#rrggbb[aa]"`` -> RGBA floats."""
    if isinstance(color, str):
        text = color.strip().lstrip("#")
        if len(text) not in (6, 8) or not re.fullmatch(r"[0-9a-fA-F]+", text):
            raise InvalidInputError(f"Colour {color!r} is not '#rrggbb' or '#rrggbbaa'.")
        values = [int(text[i:i + 2], 16) / 255.0 for i in range(0, len(text), 2)]
    else:
        try:
            values = [float(v) for v in np.asarray(color, dtype=np.float64).ravel()]
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"Colour {color!r} is not 3 or 4 numbers.") from exc
    if len(values) == 3:
        values.append(1.0)
    if len(values) != 4 or not all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise InvalidInputError(
            f"Colour {color!r} must be 3 or 4 numbers from 0 to 1 (red, green, blue[, alpha])."
        )
    r, g, b, a = (round(v, 4) for v in values)
    return (r, g, b, a)


def color_key(name: str) -> str:
    """How a class name is remembered: case and spacing do not matter."""
    return " ".join(str(name).split()).casefold()


# -- the palette ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _palette_arrays() -> tuple[tuple[RGBA, ...], np.ndarray]:
    # colorcet ships its palettes as static lists (no runtime dependencies); imported lazily
    # because building its ~200 colormaps takes ~0.1 s (more where matplotlib is installed: it
    # registers them there) and only names without a remembered colour need it.
    import colorcet

    rgb = np.array([[int(h[i:i + 2], 16) / 255.0 for i in (1, 3, 5)]
                    for h in colorcet.palette["glasbey_bw_minc_20"]])
    lab = srgb_to_lab(rgb)
    keep = (lab[:, 0] >= MIN_LIGHTNESS) & (np.hypot(lab[:, 1], lab[:, 2]) >= MIN_CHROMA)
    colors = tuple(to_rgba(c) for c in rgb[keep])
    return colors, lab[keep]


def palette() -> tuple[RGBA, ...]:
    """The label palette, in Glasbey order (each colour far from all earlier ones)."""
    return _palette_arrays()[0]


def _hint_lab(key: str) -> Optional[np.ndarray]:
    for word in re.findall(r"[a-z]+", key):
        if word in _COLOR_WORDS:
            return srgb_to_lab(np.array(_COLOR_WORDS[word]) / 255.0)
    return None


# -- assignment (pure) ---------------------------------------------------------------------------
def _assign(
    keys: Sequence[str],
    fixed: Mapping[str, RGBA],
    remembered: Mapping[str, dict[str, Any]],
) -> tuple[list[RGBA], dict[str, RGBA]]:
    """Colours for ``keys`` and the ones newly chosen for names nothing remembered."""
    chosen: dict[str, RGBA] = {}
    placed: list[np.ndarray] = []

    def place(key: str, color: RGBA) -> None:
        chosen[key] = color
        placed.append(srgb_to_lab(color))

    unique = list(dict.fromkeys(keys))
    for key in unique:  # 1. the dataset's colours
        if key in fixed:
            place(key, fixed[key])
    for key in unique:  # 2. colours the user set
        if key not in chosen and key in remembered and remembered[key]["user"]:
            place(key, remembered[key]["color"])
    for key in unique:  # 3. remembered colours that do not clash in this list
        if key not in chosen and key in remembered:
            lab = srgb_to_lab(remembered[key]["color"])
            if not placed or min(float(np.linalg.norm(lab - p)) for p in placed) >= CLASH:
                place(key, remembered[key]["color"])
    colors, pal_lab = _palette_arrays()
    claimed = [srgb_to_lab(e["color"]) for e in remembered.values()] + [
        srgb_to_lab(c) for c in fixed.values()]
    unclaimed = np.ones(len(colors), dtype=bool)
    if claimed:
        dist = np.linalg.norm(pal_lab[:, None] - np.array(claimed)[None], axis=-1).min(axis=1)
        unclaimed = dist >= _SAME
    new: dict[str, RGBA] = {}
    for key in unique:  # 4. new names (and clashing ones): the most distinct palette colour
        if key in chosen:
            continue
        if placed:
            dist = np.linalg.norm(pal_lab[:, None] - np.array(placed)[None], axis=-1).min(axis=1)
        else:
            dist = np.full(len(colors), np.inf)
        score = np.minimum(dist, DISTINCT_ENOUGH)
        hint = _hint_lab(key)
        to_hint = np.zeros(len(colors)) if hint is None else np.linalg.norm(pal_lab - hint, axis=1)
        # lexsort: last key is primary -> most distinct, then unclaimed, then colour word, order.
        best = int(np.lexsort((np.arange(len(colors)), to_hint, ~unclaimed, -score))[0])
        place(key, colors[best])
        unclaimed[best] = False
        if key not in remembered:
            new[key] = colors[best]
    return [chosen[k] for k in keys], new


# -- the registry (IO) ---------------------------------------------------------------------------
def registry_path() -> Path:
    """The file holding remembered class colours (``class-colors.json`` in the config dir)."""
    from .config_dir import user_config_dir

    return user_config_dir() / REGISTRY_FILE


def _load(path: Path) -> dict[str, dict[str, Any]]:
    """Remembered colours, oldest first; anything unreadable is skipped, never an error."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    entries = raw.get("classes") if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, entry in entries.items():
        if not isinstance(name, str) or not isinstance(entry, dict) or not color_key(name):
            continue
        try:
            color = to_rgba(entry.get("color"))
        except InvalidInputError:
            continue
        out[color_key(name)] = {"color": color, "user": entry.get("user") is True}
    return out


def _save(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    from .atomic import atomic_write_text

    entries = dict(entries)
    if len(entries) > MAX_REMEMBERED:  # forget the oldest automatic colours first
        excess = len(entries) - MAX_REMEMBERED
        order = [k for k, e in entries.items() if not e["user"]] + [
            k for k, e in entries.items() if e["user"]]
        for key in order[:excess]:
            del entries[key]
    # One line per class, so the file stays readable (and diffable) by people.
    lines = [f"  {json.dumps(k, ensure_ascii=False)}: "
             f"{json.dumps({'color': list(e['color']), 'user': e['user']})}"
             for k, e in entries.items()]
    text = (f'{{"format": "{_FORMAT}", "format_version": {_VERSION}, "classes": {{\n'
            + ",\n".join(lines) + "\n}}\n")
    atomic_write_text(path, text)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Hold the registry lock (threads and processes); yields False if it cannot be had."""
    from filelock import FileLock, Timeout

    with _thread_lock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(path) + ".lock", timeout=_LOCK_TIMEOUT_S)
            lock.acquire()
        except (OSError, Timeout):
            yield False
            return
        try:
            yield True
        finally:
            lock.release()


# -- public API ----------------------------------------------------------------------------------
def assign_colors(
    names: Sequence[str],
    *,
    fixed: Optional[Mapping[str, ColorLike]] = None,
    remember: bool = True,
) -> list[RGBA]:
    """RGBA colours (0..1) for ``names``, stable per name (see the module docstring).

    ``fixed`` maps names to colours that win in this list only (a dataset's ``classes.json``:
    reading a dataset never changes the user's colours); names it does not list take their
    remembered colour or a new one, distinct from the fixed ones. With ``remember`` new colours
    are saved, so the name keeps its colour in later runs. A registry that cannot be written
    still gives colours; they are just not remembered.
    """
    keys = [color_key(n) for n in names]
    wanted = set(keys)
    fixed_keyed = {color_key(k): to_rgba(v) for k, v in (fixed or {}).items()}
    fixed_keyed = {k: v for k, v in fixed_keyed.items() if k in wanted}
    if all(k in fixed_keyed for k in keys):
        return [fixed_keyed[k] for k in keys]
    path = registry_path()
    with _locked(path) as locked:
        remembered = _load(path)
        colors, new = _assign(keys, fixed_keyed, remembered)
        if remember and locked and new:
            for key, color in new.items():
                remembered[key] = {"color": color, "user": False}
            with contextlib.suppress(OSError):
                _save(path, remembered)
    return colors


def set_class_color(name: str, color: ColorLike) -> RGBA:
    """Make ``color`` the colour of class ``name`` from now on (the user picked it).

    The colour is remembered in the registry and wins over automatic colours in every later list
    (a dataset's own ``classes.json`` colours still win inside that dataset). Returns the colour
    as stored. Raises :class:`~napari_maskclip.errors.InvalidInputError` for a bad name or colour
    and :class:`~napari_maskclip.errors.PreferencesError` if it cannot be saved.
    """
    key = color_key(name)
    if not key:
        raise InvalidInputError("A class colour needs a class name.")
    rgba = to_rgba(color)
    path = registry_path()
    with _locked(path) as locked:
        if not locked:
            raise PreferencesError(
                f"Cannot save the colour of {name!r}: {path.parent} is not writable or another "
                f"process holds {path.name}.lock. Try again, or set NAPARI_MASKCLIP_CONFIG_DIR "
                "to a writable folder."
            )
        remembered = _load(path)
        remembered.pop(key, None)  # re-insert: most recent last
        remembered[key] = {"color": rgba, "user": True}
        try:
            _save(path, remembered)
        except OSError as exc:
            raise PreferencesError(f"Cannot save the colour of {name!r} in {path}: {exc}") from exc
    return rgba


def reset_class_color(name: str) -> bool:
    """Forget the colour of ``name`` (it gets a fresh one next time); True if one was stored."""
    key = color_key(name)
    path = registry_path()
    with _locked(path) as locked:
        remembered = _load(path)
        if key not in remembered:
            return False
        if not locked:
            raise PreferencesError(f"Cannot change {path}: another process holds its lock.")
        del remembered[key]
        try:
            _save(path, remembered)
        except OSError as exc:
            raise PreferencesError(f"Cannot save {path}: {exc}") from exc
    return True


def remembered_colors() -> dict[str, tuple[RGBA, bool]]:
    """Every remembered class colour: ``{name key: (rgba, set_by_user)}``, oldest first."""
    return {k: (e["color"], e["user"]) for k, e in _load(registry_path()).items()}
