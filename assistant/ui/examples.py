"""Example images for the app: the model's own, else drawn in code.

A checkpoint's model card may name example images inside its folder (`card.Example`): the demo ships held-out
textiles its training never read (normal, local and global defect, with a normal reference), so the examples
suit the model that answers them. A checkpoint without them gets generic parts drawn in code: a brushed-metal
plate with a scratch or a stain, and a second, defect-free plate (different grain) as the normal reference.
"""

from __future__ import annotations

import getpass
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..card import CardError, ModelCard
from ..files import atomic_path

EXAMPLES_DIR = Path(tempfile.gettempdir()) / f"anomaly-assistant-examples-{getpass.getuser()}"  # per user: no clashes
SIZE = (320, 240)  # width, height: small enough to upload and analyse instantly


@dataclass(frozen=True)
class Example:
    image: Path
    reference: Path | None
    question: str


def _inside(folder: Path, name: str) -> Path:
    """A file the card names, which must lie inside the checkpoint folder: the app serves it to anyone."""
    root = folder.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise CardError(f"{folder}: the model card names example {name!r}, which the folder lacks")
    return path


def model_examples(folder: Path, card: ModelCard | None) -> list[Example]:
    """The examples a checkpoint's card names (files inside its folder); none if it names none."""
    if card is None:
        return []
    return [
        Example(_inside(folder, e.image), _inside(folder, e.reference) if e.reference else None, "")
        for e in card.examples
    ]


def metal_plate(seed: int, size: tuple[int, int] = SIZE) -> Image.Image:
    """Brushed metal: horizontal streaks, fine grain and a soft light gradient."""
    width, height = size
    rng = np.random.default_rng(seed)
    streaks = np.repeat(rng.normal(0.0, 10.0, (height, 1)), width, axis=1)
    grain = rng.normal(0.0, 4.0, (height, width))
    light = np.linspace(-12.0, 12.0, width)[None, :]
    grey = 150.0 + streaks + grain + light
    rgb = np.stack([grey, grey + 3.0, grey + 8.0], axis=-1)  # a cool steel tint
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))


def with_scratch(plate: Image.Image) -> Image.Image:
    scratched = plate.copy()
    width, height = plate.size
    ImageDraw.Draw(scratched).line(
        [(width * 0.30, height * 0.70), (width * 0.62, height * 0.38)], fill=(58, 56, 54), width=3
    )
    return scratched


def with_stain(plate: Image.Image) -> Image.Image:
    width, height = plate.size
    mask = Image.new("L", plate.size, 0)
    ImageDraw.Draw(mask).ellipse((width * 0.55, height * 0.50, width * 0.72, height * 0.72), fill=200)
    stain = Image.new("RGB", plate.size, (112, 78, 40))
    return Image.composite(stain, plate, mask.filter(ImageFilter.GaussianBlur(6)))


def _save(image: Image.Image, path: Path) -> Path:
    """Write atomically, so two app instances starting at once never serve a half-written file."""
    with atomic_path(path) as partial:
        image.save(partial, format="PNG")
    return path


def write_examples(directory: Path = EXAMPLES_DIR) -> list[Example]:
    """Draw the example images into `directory` and describe how the app offers them."""
    directory.mkdir(parents=True, exist_ok=True)
    plate = metal_plate(seed=1)
    scratch = _save(with_scratch(plate), directory / "scratched_plate.png")
    stain = _save(with_stain(plate), directory / "stained_plate.png")
    normal = _save(metal_plate(seed=2), directory / "normal_plate.png")
    return [
        Example(scratch, normal, "Is there a defect? If so, what is it and where?"),
        Example(stain, None, "Describe any anomaly on this part."),
        Example(normal, None, "Is this part OK?"),
    ]
