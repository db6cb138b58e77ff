"""Synthetic defects with exact masks, for training without (enough) real anomalies.

Four generators in the spirit of the self-supervised anomaly literature: a Perlin-noise blend of a
foreign texture (DRAEM's "natural-synthetic" anomalies), CutPaste with a colour shift, thin scratches and
soft stains. Each takes an RGB image and a numpy Generator and returns (image, uint8 mask with 255 on the
defect); the same seed always gives the same defect. `normal_part` draws defect-free parts to put them
on, so tests and demos need no real data.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

Defect = tuple[Image.Image, np.ndarray]


def perlin_noise(shape: tuple[int, int], periods: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise in about [-1, 1] with `periods` lattice cells along (y, x)."""
    height, width = shape
    angles = rng.uniform(0, 2 * np.pi, (periods[0] + 1, periods[1] + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    ys, xs = np.linspace(0, periods[0], height, endpoint=False), np.linspace(0, periods[1], width, endpoint=False)
    yi, xi = ys.astype(int), xs.astype(int)
    yf, xf = (ys - yi)[:, None], (xs - xi)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[yi[:, None] + dy, xi[None, :] + dx]
        return g[..., 0] * (yf - dy) + g[..., 1] * (xf - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(xf), fade(yf)
    top = corner(0, 0) + u * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + u * (corner(1, 1) - corner(1, 0))
    return np.sqrt(2) * (top + v * (bottom - top))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _result(pixels: np.ndarray, mask: np.ndarray) -> Defect:
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), (mask > 0).astype(np.uint8) * 255


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def perlin_blend(image: Image.Image, rng: np.random.Generator) -> Defect:
    """A foreign noise texture blended into Perlin-shaped blobs covering a few percent of the image."""
    pixels = _pixels(image)
    shape = pixels.shape[:2]
    periods = tuple(int(p) for p in rng.integers(2, 7, size=2))
    noise = perlin_noise(shape, periods, rng)
    mask = noise > np.quantile(noise, 1 - rng.uniform(0.03, 0.12))
    texture = _random_colour(rng) + 60 * perlin_noise(shape, (8, 8), rng)[..., None]
    opacity = rng.uniform(0.6, 0.95)
    blended = np.where(mask[..., None], (1 - opacity) * pixels + opacity * texture, pixels)
    return _result(blended, mask)


def _box(shape: tuple[int, int], rng: np.random.Generator, low: float, high: float) -> tuple[int, int, int, int]:
    height, width = shape
    box_h = max(2, int(height * rng.uniform(low, high)))
    box_w = max(2, int(width * rng.uniform(low, high)))
    y0, x0 = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
    return y0, x0, box_h, box_w


def cut_paste(image: Image.Image, rng: np.random.Generator) -> Defect:
    """A patch cut from one place, colour-shifted and pasted somewhere else (CutPaste)."""
    pixels = _pixels(image)
    y0, x0, box_h, box_w = _box(pixels.shape[:2], rng, 0.08, 0.25)
    ty, tx = int(rng.integers(0, pixels.shape[0] - box_h + 1)), int(rng.integers(0, pixels.shape[1] - box_w + 1))
    patch = pixels[y0 : y0 + box_h, x0 : x0 + box_w].copy()
    gain = rng.choice([rng.uniform(0.4, 0.75), rng.uniform(1.3, 1.8)])
    patch = patch * gain + rng.uniform(-30, 30, 3)
    out, mask = pixels.copy(), np.zeros(pixels.shape[:2], bool)
    out[ty : ty + box_h, tx : tx + box_w] = patch
    mask[ty : ty + box_h, tx : tx + box_w] = True
    return _result(out, mask)


def scratch(image: Image.Image, rng: np.random.Generator) -> Defect:
    """A thin bright or dark polyline across part of the image."""
    pixels = _pixels(image)
    height, width = pixels.shape[:2]
    start = rng.uniform([0.1 * width, 0.1 * height], [0.9 * width, 0.9 * height])
    steps = rng.normal(0, 0.15 * max(height, width), (int(rng.integers(2, 5)), 2))
    points = np.clip(start + np.cumsum(steps, axis=0), 0, [width - 1, height - 1])
    points = np.vstack([start, points]).astype(np.int32)
    thickness = max(1, round(min(height, width) * rng.uniform(0.01, 0.03)))
    mask = np.zeros((height, width), np.uint8)
    cv2.polylines(mask, [points], isClosed=False, color=255, thickness=thickness)
    dark = pixels[mask > 0].mean() > 128  # contrast with what lies under the line
    colour = rng.uniform(0, 50) if dark else rng.uniform(200, 255)
    return _result(np.where(mask[..., None] > 0, colour, pixels), mask)


def stain(image: Image.Image, rng: np.random.Generator) -> Defect:
    """A soft-edged, noise-modulated blob of discoloured material."""
    pixels = _pixels(image)
    height, width = pixels.shape[:2]
    centre = (int(rng.integers(width // 8, width - width // 8)), int(rng.integers(height // 8, height - height // 8)))
    axes = (max(2, int(width * rng.uniform(0.05, 0.15))), max(2, int(height * rng.uniform(0.05, 0.15))))
    alpha = np.zeros((height, width), np.float32)
    cv2.ellipse(alpha, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, thickness=-1)
    blur = 2 * max(1, min(axes) // 2) + 1
    alpha = cv2.GaussianBlur(alpha, (blur, blur), 0) * (0.8 + 0.2 * perlin_noise((height, width), (4, 4), rng))
    alpha = np.where(alpha < 0.2, 0.0, np.clip(alpha, 0, 1))  # no faint halo outside the mask
    colour = rng.uniform([40, 25, 10], [140, 100, 60]).astype(np.float32)  # brownish
    strength = rng.uniform(0.6, 0.9)
    blended = pixels * (1 - strength * alpha[..., None]) + colour * strength * alpha[..., None]
    return _result(blended, alpha > 0)


def speckle(image: Image.Image, rng: np.random.Generator) -> Defect:
    """A small elliptical patch of salt-and-pepper pixels (pilling, broken fibres, sensor noise)."""
    pixels = _pixels(image)
    height, width = pixels.shape[:2]
    axes = (max(2, int(width * rng.uniform(0.015, 0.04))), max(2, int(height * rng.uniform(0.03, 0.07))))
    centre = (int(rng.integers(axes[0], width - axes[0])), int(rng.integers(axes[1], height - axes[1])))
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, thickness=-1)
    inside = mask > 0
    density = rng.uniform(0.5, 0.9)  # share of the patch's pixels that turn into noise
    noisy = inside & (rng.random((height, width)) < density)
    values = np.where(
        rng.random((height, width)) < 0.5, rng.uniform(0, 60, (height, width)), rng.uniform(190, 255, (height, width))
    )
    return _result(np.where(noisy[..., None], values[..., None], pixels), inside)


DEFECT_GENERATORS: dict[str, Callable[[Image.Image, np.random.Generator], Defect]] = {
    "contamination": perlin_blend,
    "color_patch": cut_paste,
    "scratch": scratch,
    "stain": stain,
    "speckle": speckle,
}


def synthesize_defect(
    image: Image.Image, seed: int, kind: str | None = None, region: np.ndarray | None = None
) -> tuple[Image.Image, np.ndarray, str]:
    """(defective image, mask, kind) from a seed, kept inside `region` (e.g. the object, not the background).

    Re-draws when the defect misses the region entirely.
    """
    rng = np.random.default_rng(seed)
    if kind is not None and kind not in DEFECT_GENERATORS:
        raise ValueError(f"unknown defect kind {kind!r}: use one of {sorted(DEFECT_GENERATORS)}")
    for _ in range(20):
        chosen = kind or str(rng.choice(sorted(DEFECT_GENERATORS)))
        defective, mask = DEFECT_GENERATORS[chosen](image, rng)
        if region is not None:
            mask = np.where(region, mask, 0).astype(np.uint8)
            defective = Image.fromarray(
                np.where(mask[..., None] > 0, np.asarray(defective), np.asarray(image.convert("RGB")))
            )
        if mask.any():
            return defective, mask, chosen
    raise RuntimeError(f"could not draw a non-empty {kind or 'random'} defect (image {image.size})")


NORMAL_CATEGORIES = ("textile", "pill")


def normal_part(category: str, size: int, seed: int) -> tuple[Image.Image, np.ndarray]:
    """A defect-free part drawn in code and where the part is (bool mask): a woven textile or a pill on a tray."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    grain = 8 * rng.standard_normal((size, size)).astype(np.float32)
    if category == "textile":
        period = size / rng.uniform(6, 10)
        weave = 25 * np.sin(2 * np.pi * xs / period) * np.sin(2 * np.pi * ys / period)
        base = rng.uniform([120, 110, 90], [170, 160, 140]).astype(np.float32)
        pixels = base + (weave + grain)[..., None]
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), np.ones((size, size), bool)
    if category == "pill":
        pixels = np.full((size, size, 3), 40, np.float32) + grain[..., None] / 2
        centre = (size / 2 + rng.uniform(-0.05, 0.05) * size, size / 2 + rng.uniform(-0.05, 0.05) * size)
        inside = ((xs - centre[0]) / (0.38 * size)) ** 2 + ((ys - centre[1]) / (0.22 * size)) ** 2 <= 1
        pixels[inside] = rng.uniform([200, 190, 170], [235, 225, 210]) + grain[inside][:, None] / 2
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), inside
    raise ValueError(f"unknown synthetic category {category!r}: use one of {NORMAL_CATEGORIES}")
