"""Seeded synthetic scenes with exact masks: coloured shapes on textured backgrounds.

UI-free and torch-free (numpy + scikit-image only). Used to train the offline demo model
(``tools/train_toy_clip.py``), as the demo sample image, and for quality benchmarks and tests.

A scene is a textured, desaturated background (one of :data:`BACKGROUND_KINDS`: a smooth ramp
"plain", low-frequency "cloudy" noise, "striped" or "checkered"; sometimes with grey clutter
shapes, which count as background) with coloured objects on top. Each object is one of
:data:`CLASS_NAMES` = colour x shape (4 x 3 = 12 classes), with a random size, position, hue,
saturation, brightness, shading and a small rotation. The mask is exact: ``0`` is background
and ``k`` is ``CLASS_NAMES[k - 1]``.

The caption names every class present once and the background, in random order, in the prompt
template the demo model was trained with, e.g. ``"a photo of a blue square, a striped background
and a red circle."``; an empty scene is captioned ``"a photo of a striped background."``. So
the prompts for inference are ``TEMPLATE.format(name)`` for the class names, and the names in
:data:`BACKGROUND_NAMES` (synonyms: take the max over them) for background.

Everything is deterministic per seed: ``make_scene(7)`` always returns the same scene, and so
does ``make_batch(7, 32)`` (a batch is not the same as 32 calls of ``make_scene``; it draws its
backgrounds vectorised, about 1 ms per 96 x 96 scene).

Example::

    from napari_maskclip.synthetic import CLASS_NAMES, make_scene
    scene = make_scene(0, size=(96, 96), n_objects=(2, 4))
    scene.image.shape, scene.mask.max(), scene.caption
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from skimage.draw import disk, polygon

__all__ = [
    "BACKGROUND_KINDS",
    "BACKGROUND_NAME",
    "BACKGROUND_NAMES",
    "CLASS_NAMES",
    "COLOURS",
    "SHAPES",
    "TEMPLATE",
    "Scene",
    "SceneObject",
    "caption_for",
    "class_prompt",
    "make_batch",
    "make_scene",
]

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Class names; mask value ``k`` means ``CLASS_NAMES[k - 1]`` (0 is background).
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
#: Background textures; a scene's caption names its background, e.g. "striped background".
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "cloudy", "striped", "checkered")
#: The names that mean background (synonyms: at inference, take the max over them).
BACKGROUND_NAMES: tuple[str, ...] = tuple(f"{k} background" for k in BACKGROUND_KINDS)
#: A generic background name (not used in training captions).
BACKGROUND_NAME = "background"
#: Prompt template for one class, as used in training and at inference.
TEMPLATE = "a photo of a {}."

# HSV ranges of the object colours (hue in turns). Backgrounds and clutter stay below
# _BG_MAX_SAT, objects start at _OBJ_MIN_SAT, so colour is never ambiguous.
_HUE = {"red": (-0.03, 0.03), "yellow": (0.13, 0.17), "green": (0.27, 0.40), "blue": (0.57, 0.67)}
_OBJ_MIN_SAT, _BG_MAX_SAT = 0.6, 0.25


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. ``class_id`` is 1-based (the mask value); ``area`` counts its visible
    pixels (after later objects were drawn over it)."""

    class_id: int
    name: str
    center: tuple[float, float]  # (row, col) in pixels
    radius: float  # circumradius-like size in pixels
    angle: float  # rotation in radians (0 for circles)
    area: int


@dataclass
class Scene:
    """A synthetic scene: ``image`` (H, W, 3) uint8, ``mask`` (H, W) uint8, objects and caption."""

    image: np.ndarray
    mask: np.ndarray
    objects: list[SceneObject] = field(default_factory=list)
    caption: str = ""
    background: str = ""  # one of BACKGROUND_NAMES

    @property
    def class_ids(self) -> list[int]:
        """Sorted distinct class ids present in the mask (without background)."""
        return sorted({o.class_id for o in self.objects})


def class_prompt(name: str, template: str = TEMPLATE) -> str:
    """The text prompt for one class name, e.g. ``"a photo of a red circle."``."""
    return template.format(name)


def caption_for(
    class_ids: Sequence[int],
    rng: np.random.Generator | int | None = None,
    template: str = TEMPLATE,
    background: str | None = None,
) -> str:
    """Caption naming each distinct class once (and ``background`` if given), in random order
    (sorted, background last, if ``rng`` is None).

    One item gives exactly :func:`class_prompt` (an empty scene with ``background="striped
    background"`` gives ``"a photo of a striped background."``); several give
    ``"a photo of a red circle, a striped background and a green triangle."``. With neither
    classes nor background, the generic background prompt ``"a photo of a background."``.
    """
    names = [CLASS_NAMES[i - 1] for i in sorted(set(int(i) for i in class_ids))]
    if background is not None:
        names.append(background)
    if not names:
        return class_prompt(BACKGROUND_NAME, template)
    if rng is not None:
        rng = np.random.default_rng(rng)
        names = [names[i] for i in rng.permutation(len(names))]
    if len(names) == 1:
        return class_prompt(names[0], template)
    # "a photo of a {}." -> "a photo of a X, a Y and a Z."
    joined = names[0] + "".join(f", a {n}" for n in names[1:-1]) + f" and a {names[-1]}"
    return class_prompt(joined, template)


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB, hue in turns (any real), s and v in [0, 1]. Returns (..., 3)."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _upsample(grid: np.ndarray, H: int, W: int) -> np.ndarray:
    """Bilinear upsampling of (N, gh, gw) to (N, H, W) (separable, align-corners)."""
    N, gh, gw = grid.shape
    ys = np.linspace(0, gh - 1, H)
    xs = np.linspace(0, gw - 1, W)
    y0 = np.clip(np.floor(ys).astype(int), 0, gh - 2)
    x0 = np.clip(np.floor(xs).astype(int), 0, gw - 2)
    fy = (ys - y0)[None, :, None]
    fx = (xs - x0)[None, None, :]
    rows = grid[:, y0] * (1 - fy) + grid[:, y0 + 1] * fy  # (N, H, gw)
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x0 + 1] * fx


def _backgrounds(rng: np.random.Generator, n: int, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, H, W, 3) float32 backgrounds in [0, 1] and their kinds (index into BACKGROUND_KINDS).

    Two desaturated colours (brightness at least 0.2 apart) blended by a pattern: a linear ramp
    ("plain"), low-frequency value noise ("cloudy"), stripes or checks.
    """
    S = float(max(H, W))
    yy = (np.arange(H, dtype=np.float32) / S)[None, :, None]
    xx = (np.arange(W, dtype=np.float32) / S)[None, None, :]
    kind = rng.integers(0, 4, n)
    theta = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    ct, st = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    w = np.empty((n, H, W), np.float32)
    # Each pattern is computed only for the images that use it (still vectorised).
    for k in range(4):
        idx = np.flatnonzero(kind == k)
        if idx.size == 0:
            continue
        m = idx.size
        if k == 0:  # ramp in a random direction, spanning [0, 1]
            u = xx * ct[idx] + yy * st[idx]
            u -= u.min(axis=(1, 2), keepdims=True)
            w[idx] = u / (u.max(axis=(1, 2), keepdims=True) + 1e-6)
        elif k == 1:  # low-frequency value noise
            g = int(rng.integers(3, 9))
            w[idx] = _upsample(rng.uniform(0, 1, (m, g, g)).astype(np.float32), H, W)
        elif k == 2:  # stripes, period 4-16 px
            u = xx * ct[idx] + yy * st[idx]
            period = (rng.uniform(4.0, 16.0, m) / S).astype(np.float32)[:, None, None]
            phase = rng.uniform(0, 2 * np.pi, m).astype(np.float32)[:, None, None]
            w[idx] = 0.5 + 0.5 * np.sin(u * (2 * np.pi / period) + phase)
        else:  # checks, cell 4-14 px
            cell = (rng.uniform(4.0, 14.0, m) / S).astype(np.float32)[:, None, None]
            w[idx] = (np.floor(xx / cell) + np.floor(yy / cell)) % 2
    w *= rng.uniform(0.5, 1.0, (n, 1, 1)).astype(np.float32)  # pattern contrast

    v1 = rng.uniform(0.15, 0.9, n)
    dv = rng.uniform(0.2, 0.5, n)
    v2 = np.where(v1 + dv <= 0.95, v1 + dv, v1 - dv)  # the other side if it would clip
    v2 = np.clip(v2, 0.05, 0.95)

    def colour(v):
        h = rng.uniform(0, 1, n)
        s = rng.uniform(0, _BG_MAX_SAT, n)
        return _hsv_to_rgb(h, s, v).astype(np.float32)[:, None, None, :]

    c1, c2 = colour(v1), colour(v2)
    w = w[..., None]
    return c1 + (c2 - c1) * w, kind


def _shape_pixels(shape: str, center, radius, angle, H, W):
    r0, c0 = center
    if shape == "circle":
        return disk((r0, c0), radius, shape=(H, W))
    if shape == "square":
        k = np.arange(4)
        half_diag = radius  # vertices at circumradius
        a = angle + np.pi / 4 + k * np.pi / 2
    else:  # triangle, circumradius a bit larger so its area is comparable
        k = np.arange(3)
        half_diag = radius * 1.25
        a = angle + np.pi / 2 + k * 2 * np.pi / 3
    rows = r0 - half_diag * np.sin(a)
    cols = c0 + half_diag * np.cos(a)
    return polygon(rows, cols, shape=(H, W))


def _draw_scene(
    rng: np.random.Generator,
    img: np.ndarray,
    classes: Sequence[int],
    radius_frac: tuple[float, float],
    clutter: bool,
    max_overlap: float,
    max_rotation: float,
) -> tuple[np.ndarray, list[SceneObject]]:
    """Draw clutter and objects into ``img`` (H, W, 3 float) in place; return mask and objects."""
    H, W = img.shape[:2]
    S = min(H, W)
    mask = np.zeros((H, W), np.uint8)
    owner = np.zeros((H, W), np.int16)  # 1 + index of the object that owns each pixel

    # Grey clutter (desaturated shapes): part of the background.
    if clutter:
        for _ in range(int(rng.integers(1, 4))):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            rad = rng.uniform(*radius_frac) * S * rng.uniform(0.5, 1.0)
            cen = (rng.uniform(0, H), rng.uniform(0, W))
            rr, cc = _shape_pixels(shape, cen, rad, rng.uniform(0, 2 * np.pi), H, W)
            col = _hsv_to_rgb(rng.uniform(), rng.uniform(0, _BG_MAX_SAT), rng.uniform(0.15, 0.9))
            img[rr, cc] = col

    objects: list[tuple] = []
    for cls in classes:
        cls = int(cls)
        colour_name, shape = CLASS_NAMES[cls - 1].split(" ")
        for _attempt in range(30):
            rad = rng.uniform(*radius_frac) * S
            # Centre may sit a little outside the frame edge margin: partially cut objects happen.
            cen = (rng.uniform(0.6 * rad, H - 0.6 * rad), rng.uniform(0.6 * rad, W - 0.6 * rad))
            ang = 0.0 if shape == "circle" else rng.uniform(-max_rotation, max_rotation)
            rr, cc = _shape_pixels(shape, cen, rad, ang, H, W)
            if len(rr) < 12:
                continue
            if np.count_nonzero(mask[rr, cc]) <= max_overlap * len(rr):
                break
        else:
            continue  # no room: the scene gets fewer objects
        lo, hi = _HUE[colour_name]
        rgb = _hsv_to_rgb(rng.uniform(lo, hi), rng.uniform(_OBJ_MIN_SAT, 1.0), rng.uniform(0.55, 1.0))
        # Mild shading across the object.
        sa = rng.uniform(0, 2 * np.pi)
        shade = 1.0 + rng.uniform(0, 0.25) * (
            ((rr - cen[0]) * np.sin(sa) + (cc - cen[1]) * np.cos(sa)) / max(rad, 1)
        )
        img[rr, cc] = rgb[None, :] * shade[:, None]
        mask[rr, cc] = cls
        objects.append((cls, (float(cen[0]), float(cen[1])), float(rad), float(ang)))
        owner[rr, cc] = len(objects)

    area = np.bincount(owner.ravel(), minlength=len(objects) + 1)
    out = [
        SceneObject(cls, CLASS_NAMES[cls - 1], cen, rad, ang, int(area[j + 1]))
        for j, (cls, cen, rad, ang) in enumerate(objects)
        if area[j + 1] > 0  # drop objects that were painted over completely
    ]
    return mask, out


def make_batch(
    seed: np.random.Generator | int | Sequence[int] | None,
    n: int,
    size: tuple[int, int] = (96, 96),
    n_objects: tuple[int, int] = (1, 3),
    *,
    empty_prob: float = 0.0,
    radius_frac: tuple[float, float] = (0.1, 0.25),
    clutter_prob: float = 0.3,
    noise: tuple[float, float] = (0.0, 0.06),
    max_overlap: float = 0.15,
    max_rotation: float = 15.0,
    template: str = TEMPLATE,
    classes: Sequence[Sequence[int]] | None = None,
    caption_background: bool = True,
) -> list[Scene]:
    """``n`` scenes, deterministic per ``seed`` (backgrounds drawn vectorised, so fast).

    Args:
        seed: an int, a sequence of ints (numpy ``SeedSequence`` entropy) or a Generator.
        n: number of scenes.
        size: (H, W) in pixels.
        n_objects: inclusive range of the number of objects per scene (repeats of a class allowed;
            objects that find no free place are skipped, so a scene may hold fewer).
        empty_prob: probability that a scene has no object at all (caption = background prompt).
        radius_frac: object size range as a fraction of min(H, W) (circle radius; squares and
            triangles are of similar area).
        clutter_prob: probability of 1-3 grey (desaturated) background shapes.
        noise: range of the per-pixel Gaussian noise sigma (fraction of full scale).
        max_overlap: largest allowed fraction of a new object's pixels covering older objects.
        max_rotation: squares and triangles are rotated by up to +- this many degrees
            (0: squares axis-aligned, triangles pointing up).
        template: prompt template used for the caption.
        classes: optional, one sequence of class ids (1-based) per scene, drawn in that order;
            overrides ``n_objects`` and ``empty_prob`` (an empty sequence gives an empty scene).
        caption_background: name the background texture in the caption (as in training).
    """
    rng = _rng(seed)
    if classes is not None and len(classes) != n:
        raise ValueError(f"classes has {len(classes)} entries for {n} scenes")
    H, W = int(size[0]), int(size[1])
    imgs, kinds = _backgrounds(rng, n, H, W)
    masks = []
    objects = []
    for i in range(n):
        if classes is not None:
            cls = [int(c) for c in classes[i]]
        else:
            empty = rng.uniform() < empty_prob
            k = 0 if empty else int(rng.integers(n_objects[0], n_objects[1] + 1))
            cls = [int(c) for c in rng.integers(1, len(CLASS_NAMES) + 1, k)]
        clutter = rng.uniform() < clutter_prob
        mask, objs = _draw_scene(
            rng, imgs[i], cls, radius_frac, clutter, max_overlap, np.deg2rad(max_rotation)
        )
        masks.append(mask)
        objects.append(objs)
    # Slow illumination change and per-pixel noise over whole images, vectorised.
    S = float(max(H, W))
    yy = (np.arange(H, dtype=np.float32) / S)[None, :, None]
    xx = (np.arange(W, dtype=np.float32) / S)[None, None, :]
    a = rng.uniform(0, 2 * np.pi, n).astype(np.float32)[:, None, None]
    amp = rng.uniform(-0.2, 0.2, n).astype(np.float32)[:, None, None]
    illum = 1.0 + amp * (yy * np.sin(a) + xx * np.cos(a) - 0.5)
    sigma = rng.uniform(noise[0], noise[1], n).astype(np.float32)[:, None, None, None]
    imgs *= illum[..., None]
    imgs += sigma * rng.standard_normal(imgs.shape, dtype=np.float32)
    images = np.clip(np.rint(imgs * 255.0), 0, 255).astype(np.uint8)
    scenes = []
    for i in range(n):
        bg = BACKGROUND_NAMES[int(kinds[i])]
        caption = caption_for(
            [o.class_id for o in objects[i]], rng, template, bg if caption_background else None
        )
        scenes.append(
            Scene(image=images[i], mask=masks[i], objects=objects[i], caption=caption, background=bg)
        )
    return scenes


def make_scene(
    seed: np.random.Generator | int | Sequence[int] | None = None,
    size: tuple[int, int] = (96, 96),
    n_objects: tuple[int, int] = (1, 3),
    **kwargs,
) -> Scene:
    """One scene, deterministic per ``seed``; keyword arguments as in :func:`make_batch`."""
    return make_batch(seed, 1, size, n_objects, **kwargs)[0]
