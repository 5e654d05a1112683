"""The `scenes` data set: procedural landscape images in ten classes, rendered with vectorised numpy.

No image data can be downloaded where gansteer is built, so the project renders its own: the first source
document tunes a GAN of mountains and coasts, and these are landscape-like scenes of that kind. Every image is a
deterministic function of (seed, resolution). The scene parameters (layout, palette, shapes) are drawn before any
per-pixel randomness, so the same seed gives the same layout at 32 or 128 pixels; only pixel grain, flowers and
lit windows differ between resolutions.

Each class varies along independent parameters (palette jitter, horizon height, the count, sizes and positions
of its shapes, texture noise), and every image carries a second, independent label, the time of day, used to
reuse a generator on labels it was not trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "mountains",
    "volcano",
    "coast",
    "lake",
    "desert",
    "canyon",
    "forest",
    "meadow",
    "snowfield",
    "city",
)
TIME_NAMES: tuple[str, ...] = ("day", "dusk", "night")

# Sky colours (top, horizon) per time of day, and how much light reaches the ground.
_SKY_TOP = np.array([[0.20, 0.45, 0.85], [0.30, 0.20, 0.50], [0.02, 0.03, 0.12]], dtype=np.float32)
_SKY_HORIZON = np.array([[0.65, 0.80, 0.95], [0.95, 0.55, 0.30], [0.10, 0.12, 0.28]], dtype=np.float32)
_GROUND_LIGHT = np.array([1.0, 0.75, 0.35], dtype=np.float32)
_BODY_COLOUR = np.array([[1.0, 0.95, 0.70], [1.0, 0.60, 0.25], [0.90, 0.90, 0.85]], dtype=np.float32)

Array = np.ndarray


@dataclass(frozen=True)
class Scenes:
    """A rendered batch: uint8 images (N, R, R, 3), class labels and time-of-day labels (N,)."""

    images: Array
    labels: Array
    times: Array


@dataclass
class _Canvas:
    """Per-class drawing state: pixel coordinates in [0, 1] and the RGB image being painted, (n, R, R, 3)."""

    x: Array
    y: Array
    image: Array
    rng: np.random.Generator
    times: Array

    @property
    def n(self) -> int:
        return self.image.shape[0]

    def uniform(self, low: float, high: float, *shape: int) -> Array:
        return self.rng.uniform(low, high, size=(self.n, *shape)).astype(np.float32)

    def paint(self, mask: Array, colour: Array) -> None:
        """Alpha-blend `colour` (n, 3) or (n, R, R, 3) where `mask` (n, R, R) is in [0, 1]."""
        if colour.ndim == 2:
            colour = colour[:, None, None, :]
        self.image[:] = self.image * (1 - mask[..., None]) + colour * mask[..., None]

    def soft(self, signed_distance: Array) -> Array:
        """Anti-aliased coverage from a signed distance in image units (positive inside)."""
        resolution = self.x.shape[-1]
        return np.clip(signed_distance * resolution + 0.5, 0.0, 1.0)

    def lit(self, colour: Array) -> Array:
        """Darken a ground colour by the time of day."""
        return colour * _GROUND_LIGHT[self.times][:, None]

    def palette(self, base: tuple[float, float, float], jitter: float) -> Array:
        """A base colour jittered per image (the palette parameter), lit by the time of day."""
        colour = np.asarray(base, dtype=np.float32)[None] + self.uniform(-jitter, jitter, 3)
        return self.lit(np.clip(colour, 0, 1))

    def value_noise(self, cells: int, amplitude: Array) -> Array:
        """Smooth texture (n, R, R): a random grid of `cells` x `cells` values, bilinearly interpolated."""
        grid = self.rng.uniform(-1, 1, size=(self.n, cells + 1, cells + 1)).astype(np.float32)
        gx = self.x[0] * cells
        gy = self.y[0] * cells
        x0 = np.clip(np.floor(gx).astype(int), 0, cells - 1)
        y0 = np.clip(np.floor(gy).astype(int), 0, cells - 1)
        fx, fy = gx - x0, gy - y0
        top = grid[:, y0, x0] * (1 - fx) + grid[:, y0, x0 + 1] * fx
        bottom = grid[:, y0 + 1, x0] * (1 - fx) + grid[:, y0 + 1, x0 + 1] * fx
        return (top * (1 - fy) + bottom * fy) * amplitude[:, None, None]


def render_scenes(n: int, seed: int = 0, resolution: int = 32) -> Scenes:
    """Render `n` scenes with classes and times of day drawn uniformly, deterministic from `seed`."""
    if resolution < 8 or resolution > 128 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two from 8 to 128, got {resolution}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASS_NAMES), size=n)
    times = rng.integers(0, len(TIME_NAMES), size=n)
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    centres = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    for class_id, draw in enumerate(_DRAWERS):
        index = np.flatnonzero(labels == class_id)
        if index.size == 0:
            continue
        class_rng = np.random.default_rng([seed, class_id])
        canvas = _Canvas(
            x=np.broadcast_to(centres[None, None, :], (1, resolution, resolution)),
            y=np.broadcast_to(centres[None, :, None], (1, resolution, resolution)),
            image=np.zeros((index.size, resolution, resolution, 3), dtype=np.float32),
            rng=class_rng,
            times=times[index],
        )
        horizon = draw_sky(canvas)
        draw(canvas, horizon)
        grain = canvas.uniform(0.0, 0.02)
        canvas.image += class_rng.normal(size=canvas.image.shape).astype(np.float32) * grain[:, None, None, None]
        images[index] = np.clip(canvas.image * 255 + 0.5, 0, 255).astype(np.uint8)
    return Scenes(images=images, labels=labels, times=times)


def draw_sky(c: _Canvas) -> Array:
    """Sky gradient, an optional sun or moon and clouds; returns each image's horizon height (n,) in [0, 1]."""
    horizon = c.uniform(0.35, 0.7, 1)[:, 0]
    top, low = _SKY_TOP[c.times], _SKY_HORIZON[c.times]
    shift = c.uniform(-0.08, 0.08, 3)
    t = np.clip(c.y / horizon[:, None, None], 0, 1)[..., None]
    c.image[:] = np.clip((top + shift)[:, None, None] * (1 - t) + (low + shift)[:, None, None] * t, 0, 1)
    has_body = c.uniform(0, 1, 1)[:, 0] < 0.6
    bx, by, radius = c.uniform(0.15, 0.85, 1), c.uniform(0.08, 0.3, 1), c.uniform(0.05, 0.11, 1)
    distance = np.sqrt((c.x - bx[:, :, None]) ** 2 + (c.y - by[:, :, None] * horizon[:, None, None]) ** 2)
    c.paint(c.soft(radius[:, :, None] - distance) * has_body[:, None, None], _BODY_COLOUR[c.times])
    cloud = c.value_noise(4, c.uniform(0.0, 1.0, 1)[:, 0])
    c.paint(np.clip(cloud - 0.3, 0, 1) * (c.y < horizon[:, None, None]), c.lit(np.full((c.n, 3), 0.9, np.float32)))
    return horizon


def _ground(c: _Canvas, surface: Array, colour: Array, texture: float, cells: int = 6) -> Array:
    """Fill below `surface` (n, R, R heights per column) with a textured colour; returns the coverage mask."""
    mask = c.soft(c.y - surface)
    shade = 1 + c.value_noise(cells, c.uniform(0.0, texture, 1)[:, 0])
    c.paint(mask, np.clip(colour[:, None, None, :] * shade[..., None], 0, 1))
    return mask


def _flat(horizon: Array) -> Array:
    return np.broadcast_to(horizon[:, None, None], (horizon.shape[0], 1, 1))


def _peaks(c: _Canvas, horizon: Array, count: Array, height: tuple[float, float], width: tuple[float, float]) -> Array:
    """Height map of up to 5 triangular peaks per image (only the first `count` are drawn)."""
    k = 5
    px, ph, pw = c.uniform(0.0, 1.0, k), c.uniform(*height, k), c.uniform(*width, k)
    active = np.arange(k)[None] < count[:, None]
    rise = (
        ph[:, :, None, None] - np.abs(c.x[:, None] - px[:, :, None, None]) * ph[:, :, None, None] / pw[:, :, None, None]
    )
    rise = np.where(active[:, :, None, None], rise, 0).max(axis=1)
    return horizon[:, None, None] - np.maximum(rise, 0)


def draw_mountains(c: _Canvas, horizon: Array) -> None:
    count = c.rng.integers(1, 6, size=c.n)
    surface = _peaks(c, horizon, count, (0.15, 0.4), (0.15, 0.35))
    rock = c.palette((0.42, 0.38, 0.36), 0.1)
    _ground(c, surface, rock, 0.25)
    snow_line = horizon - c.uniform(0.12, 0.35, 1)[:, 0]
    has_snow = c.uniform(0, 1, 1)[:, 0] < 0.7
    snow = c.soft(snow_line[:, None, None] - c.y) * c.soft(c.y - surface) * has_snow[:, None, None]
    c.paint(snow, c.lit(np.full((c.n, 3), 0.95, np.float32)))
    _ground(c, _flat(horizon + c.uniform(0.05, 0.15, 1)[:, 0]), c.palette((0.30, 0.45, 0.25), 0.08), 0.2)


def draw_volcano(c: _Canvas, horizon: Array) -> None:
    centre, height, slope = c.uniform(0.25, 0.75, 1), c.uniform(0.2, 0.4, 1), c.uniform(0.8, 1.6, 1)
    top = c.uniform(0.04, 0.1, 1)
    cone = height[:, :, None] - np.maximum(np.abs(c.x - centre[:, :, None]) - top[:, :, None], 0) * slope[:, :, None]
    surface = horizon[:, None, None] - np.maximum(cone, 0)
    _ground(c, surface, c.palette((0.30, 0.25, 0.24), 0.08), 0.3)
    summit = horizon - height[:, 0]
    glow = c.soft(top[:, :, None] - np.abs(c.x - centre[:, :, None])) * c.soft(
        0.04 - np.abs(c.y - summit[:, None, None])
    )
    c.paint(glow, np.tile(np.array([[1.0, 0.35, 0.05]], np.float32), (c.n, 1)))
    plume = c.value_noise(5, c.uniform(0.3, 1.0, 1)[:, 0]) + 0.4
    above = c.soft(summit[:, None, None] - c.y) * c.soft(0.12 - np.abs(c.x - centre[:, :, None]) * 0.7)
    c.paint(np.clip(plume, 0, 1) * above, c.lit(np.full((c.n, 3), 0.45, np.float32)))


def draw_coast(c: _Canvas, horizon: Array) -> None:
    sea = c.palette((0.10, 0.35, 0.60), 0.1)
    waves = np.sin(c.y * c.uniform(40, 90, 1)[:, :, None] + c.value_noise(3, np.full(c.n, 3.0, np.float32)))
    water = c.soft(c.y - horizon[:, None, None])
    c.paint(water, np.clip(sea[:, None, None] * (1 + 0.15 * waves * c.uniform(0.2, 1, 1)[:, :, None])[..., None], 0, 1))
    beach_top = horizon + c.uniform(0.1, 0.35, 1)[:, 0]
    tilt = c.uniform(-0.2, 0.2, 1)
    surface = beach_top[:, None, None] + tilt[:, :, None] * (c.x - 0.5)
    _ground(c, surface, c.palette((0.85, 0.75, 0.50), 0.08), 0.15)


def draw_lake(c: _Canvas, horizon: Array) -> None:
    hills = horizon[:, None, None] - c.uniform(0.03, 0.12, 1)[:, :, None] * (
        1 + np.sin(c.x * c.uniform(4, 12, 1)[:, :, None] + c.uniform(0, 6.28, 1)[:, :, None])
    )
    _ground(c, hills, c.palette((0.25, 0.45, 0.25), 0.1), 0.2)
    shore = horizon + c.uniform(0.15, 0.35, 1)[:, 0]
    ripple = 1 + 0.1 * np.sin(c.y * 70 + c.value_noise(3, np.full(c.n, 2.0, np.float32)))
    water_mask = c.soft(c.y - horizon[:, None, None] - 0.01) * c.soft(shore[:, None, None] - c.y)
    reflection = np.clip(_SKY_HORIZON[c.times] * 0.8 + 0.1 * c.uniform(-1, 1, 3), 0, 1)
    c.paint(water_mask, np.clip(reflection[:, None, None] * ripple[..., None], 0, 1))
    _ground(c, _flat(shore), c.palette((0.35, 0.50, 0.25), 0.1), 0.25)


def draw_desert(c: _Canvas, horizon: Array) -> None:
    frequency, amplitude, phase = c.uniform(5, 14, 1), c.uniform(0.02, 0.08, 1), c.uniform(0, 6.28, 1)
    surface = horizon[:, None, None] - amplitude[:, :, None] * np.sin(c.x * frequency[:, :, None] + phase[:, :, None])
    sand = c.palette((0.85, 0.68, 0.40), 0.08)
    _ground(c, surface, sand, 0.2, cells=4)
    count = c.rng.integers(0, 4, size=c.n)
    k = 3
    cx, base, tall = c.uniform(0.05, 0.95, k), c.uniform(0.05, 0.3, k), c.uniform(0.1, 0.25, k)
    bottom = horizon[:, None] + base
    stem = c.soft(0.02 - np.abs(c.x[:, None] - cx[:, :, None, None])) * c.soft(bottom[:, :, None, None] - c.y[:, None])
    stem = stem * c.soft(c.y[:, None] - (bottom - tall)[:, :, None, None])
    cactus = np.where((np.arange(k)[None] < count[:, None])[:, :, None, None], stem, 0).max(axis=1)
    c.paint(cactus, c.palette((0.2, 0.45, 0.2), 0.05))


def draw_canyon(c: _Canvas, horizon: Array) -> None:
    gap, depth, centre = c.uniform(0.08, 0.3, 1), c.uniform(0.2, 0.45, 1), c.uniform(0.3, 0.7, 1)
    wall = horizon[:, None, None] - depth[:, :, None] * c.soft(np.abs(c.x - centre[:, :, None]) - gap[:, :, None])
    rock = c.palette((0.70, 0.35, 0.20), 0.1)
    bands = 1 + 0.15 * np.sin(c.y * c.uniform(30, 80, 1)[:, :, None])
    mask = c.soft(c.y - wall)
    c.paint(mask, np.clip(rock[:, None, None] * bands[..., None], 0, 1))
    floor = horizon + c.uniform(0.1, 0.3, 1)[:, 0]
    _ground(c, _flat(floor), c.palette((0.60, 0.40, 0.25), 0.08), 0.25)


def _trees(c: _Canvas, horizon: Array, count: Array, k: int, size: tuple[float, float], colour: Array) -> None:
    tx, depth, tall = c.uniform(0.0, 1.0, k), c.uniform(0.0, 0.35, k), c.uniform(*size, k)
    base = horizon[:, None] + depth
    half_width = tall * 0.35
    local_y = (base[:, :, None, None] - c.y[:, None]) / tall[:, :, None, None]
    inside = half_width[:, :, None, None] * (1 - local_y) - np.abs(c.x[:, None] - tx[:, :, None, None])
    tree = c.soft(inside) * c.soft(local_y * tall[:, :, None, None]) * c.soft((1 - local_y) * tall[:, :, None, None])
    tree = np.where((np.arange(k)[None] < count[:, None])[:, :, None, None], tree, 0).max(axis=1)
    c.paint(tree, colour)


def draw_forest(c: _Canvas, horizon: Array) -> None:
    _ground(c, _flat(horizon), c.palette((0.20, 0.35, 0.15), 0.08), 0.25)
    _trees(c, horizon, c.rng.integers(5, 13, size=c.n), 12, (0.15, 0.35), c.palette((0.08, 0.25, 0.10), 0.05))


def draw_meadow(c: _Canvas, horizon: Array) -> None:
    _ground(c, _flat(horizon), c.palette((0.40, 0.65, 0.25), 0.1), 0.2)
    _trees(c, horizon, c.rng.integers(0, 3, size=c.n), 2, (0.12, 0.25), c.palette((0.10, 0.30, 0.12), 0.05))
    density = c.uniform(0.0, 0.25, 1)[:, :, None]
    flowers = (c.rng.uniform(size=(c.n, *c.x.shape[1:])) < density) * c.soft(c.y - horizon[:, None, None] - 0.03)
    c.paint(flowers.astype(np.float32), c.palette((0.9, 0.85, 0.3), 0.1))


def draw_snowfield(c: _Canvas, horizon: Array) -> None:
    surface = horizon[:, None, None] - c.uniform(0.0, 0.05, 1)[:, :, None] * np.sin(
        c.x * c.uniform(3, 8, 1)[:, :, None] + c.uniform(0, 6.28, 1)[:, :, None]
    )
    _ground(c, surface, c.palette((0.92, 0.94, 0.98), 0.04), 0.1, cells=4)
    _trees(c, horizon, c.rng.integers(0, 4, size=c.n), 3, (0.08, 0.2), c.palette((0.15, 0.25, 0.20), 0.05))


def draw_city(c: _Canvas, horizon: Array) -> None:
    k = 10
    count = c.rng.integers(4, k + 1, size=c.n)
    left, width, height = c.uniform(0.0, 0.95, k), c.uniform(0.05, 0.16, k), c.uniform(0.1, 0.45, k)
    x = c.x[:, None]
    inside = c.soft(x - left[:, :, None, None]) * c.soft(left[:, :, None, None] + width[:, :, None, None] - x)
    inside = inside * c.soft(c.y[:, None] - (horizon[:, None] - height)[:, :, None, None])
    buildings = np.where((np.arange(k)[None] < count[:, None])[:, :, None, None], inside, 0).max(axis=1)
    c.paint(buildings, c.palette((0.35, 0.35, 0.40), 0.1))
    street = c.palette((0.25, 0.25, 0.25), 0.05)
    lit_share = np.where(c.times == 2, 0.6, 0.15)[:, None, None] * c.uniform(0.3, 1.0, 1)[:, :, None]
    resolution = c.x.shape[-1]
    windows = ((np.floor(c.x * resolution) % 2 == 0) & (np.floor(c.y * resolution) % 2 == 0)).astype(np.float32)
    lights = windows * (c.rng.uniform(size=(c.n, *c.x.shape[1:])) < lit_share) * buildings
    c.paint(lights.astype(np.float32), np.tile(np.array([[1.0, 0.85, 0.4]], np.float32), (c.n, 1)))
    _ground(c, _flat(horizon), street, 0.1)


_DRAWERS: tuple[Callable[[_Canvas, Array], None], ...] = (
    draw_mountains,
    draw_volcano,
    draw_coast,
    draw_lake,
    draw_desert,
    draw_canyon,
    draw_forest,
    draw_meadow,
    draw_snowfield,
    draw_city,
)
