"""Labelled images -> Anomaly-Instruct-style conversations (LLaVA JSON records).

Each record opens with Anomaly-OV's Yes/No detection question, then a description of the defect (type,
location words from the mask's bounding box, size words from its area) or of the normal part, then a few
follow-up turns. Anomaly-OV balances Yes and No answers so the model does not learn a prior; we do the same
by subsampling the larger class. On request each image also gets MMAD-format multiple-choice records
(`data.mmad_format`), so the model answers those with a letter.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from assistant.prompts import DEFECT_QUESTION, DETECTION_QUESTION, IMAGE_TOKEN

from .errors import DataError
from .folder import LabelledImage
from .mmad_format import multiple_choice_records, rotated_types

ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")

DESCRIBE_DEFECT = (
    "Describe the defect and where it is.",
    "What is wrong with this {category}?",
    "Please describe the anomaly in detail.",
)
DESCRIBE_NORMAL = ("Describe the {category} in the image.", "Is there anything unusual about this {category}?")


@dataclass(frozen=True)
class DefectRegion:
    """Where a mask's defect is: bounding box as fractions of the image, and the area fraction."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1]
    area: float

    @property
    def location(self) -> str:
        """'top left', 'top', ..., 'center', ..., 'bottom right' from the box centre on a 3x3 grid."""
        x0, y0, x1, y1 = self.box
        row = ROWS[min(2, int((y0 + y1) / 2 * 3))]
        column = COLUMNS[min(2, int((x0 + x1) / 2 * 3))]
        if row == "middle":
            return column
        return row if column == "center" else f"{row} {column}"

    @property
    def size(self) -> str:
        return (
            "tiny" if self.area < 0.01
            else "small" if self.area < 0.05
            else "medium-sized" if self.area < 0.15
            else "large"
        )


def defect_region(mask: np.ndarray) -> DefectRegion | None:
    """The region of the non-zero mask pixels, or None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    height, width = mask.shape
    box = (xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height)
    return DefectRegion(box=tuple(float(v) for v in box), area=float(len(ys) / mask.size))


def _turn(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _category_words(category: str) -> str:
    return category.replace("_", " ")


def anomalous_turns(
    defect: str, category: str, region: DefectRegion | None, rng: random.Random, follow_ups: int
) -> list[dict]:
    where = f", in the {region.location} of the image" if region else ""
    description = f"There is a {region.size + ' ' if region else ''}{defect} on the {category}{where}."
    turns = _turn(rng.choice(DESCRIBE_DEFECT).format(category=category), description)
    extra = [(DEFECT_QUESTION, f"It is {'an' if defect[0] in 'aeiou' else 'a'} {defect}.")]
    extra.append(
        ("Should this part pass inspection?", f"No. The {defect} is a defect, so the {category} should be rejected.")
    )
    if region:
        centre_x, centre_y = (region.box[0] + region.box[2]) / 2, (region.box[1] + region.box[3]) / 2
        extra.append(
            (
                "Where exactly is the defect?",
                f"In the {region.location} of the image, around {centre_x:.0%} of the width "
                f"and {centre_y:.0%} of the height.",
            )
        )
        extra.append(
            (
                "How large is the defect?",
                f"It is {region.size}: it covers about {max(region.area, 0.001):.1%} of the image.",
            )
        )
    for question, answer in rng.sample(extra, min(follow_ups, len(extra))):
        turns += _turn(question, answer)
    return turns


def normal_turns(category: str, rng: random.Random, follow_ups: int) -> list[dict]:
    turns = _turn(
        rng.choice(DESCRIBE_NORMAL).format(category=category), f"The {category} looks normal: I see no defect."
    )
    extra = [
        ("Should this part pass inspection?", f"Yes. The {category} has no visible defect."),
        ("Is there a scratch, stain or missing part?", "No, none of them is visible."),
    ]
    for question, answer in rng.sample(extra, min(follow_ups, len(extra))):
        turns += _turn(question, answer)
    return turns


def balance(images: Sequence[LabelledImage], rng: random.Random) -> list[LabelledImage]:
    """Subsample the larger of the normal/anomalous groups so both give the same number of records."""
    anomalous = [image for image in images if image.anomalous]
    normal = [image for image in images if not image.anomalous]
    if not anomalous or not normal:
        raise DataError(f"cannot balance Yes/No answers: {len(anomalous)} anomalous and {len(normal)} normal images")
    count = min(len(anomalous), len(normal))
    kept = {id(image) for image in rng.sample(anomalous, count) + rng.sample(normal, count)}
    return [image for image in images if id(image) in kept]  # keep the folder order


def conversation_record(image: LabelledImage, root: Path, rng: random.Random, follow_ups: int = 2) -> dict:
    """One LLaVA-format record; image and mask paths are relative to root."""
    category = _category_words(image.category)
    region = defect_region(np.asarray(Image.open(image.mask).convert("L"))) if image.mask else None
    turns = _turn(f"{IMAGE_TOKEN}\n{DETECTION_QUESTION}", "Yes" if image.anomalous else "No")
    if image.anomalous:
        turns += anomalous_turns(image.defect or "defect", category, region, rng, follow_ups)
    else:
        turns += normal_turns(category, rng, follow_ups)
    relative = image.image.relative_to(root)
    record = {
        "id": str(relative.with_suffix("")),
        "image": str(relative),
        "conversations": turns,
        "label": int(image.anomalous),
    }
    if image.mask:
        record["mask"] = str(image.mask.relative_to(root))
    return record


def conversation_records(
    images: Sequence[LabelledImage],
    root: str | Path,
    seed: int = 0,
    balanced: bool = True,
    follow_ups: int = 2,
    multiple_choice: int = 0,
    shots: int | Sequence[int] = 0,
) -> list[dict]:
    """Records for a labelled folder (image paths relative to root), Yes/No balanced unless told not to.

    `multiple_choice` N > 0 follows each image's record with N MMAD-format multiple-choice records about it
    (distinct question types, at most all three, taking turns within the normal and the anomalous images so
    that each type, and Yes and No, come equally often), asked exactly as `eval mmad` asks and answered with
    the bare letter; `shots` is their number of normal templates (taken from the normal images
    among `images`), or several numbers to choose from per record. Their randomness is drawn apart from the
    other records', so those stay the same with and without them.
    """
    rng = random.Random(seed)
    chosen = balance(images, rng) if balanced else list(images)
    records = []
    choice_rng = random.Random(f"{seed}|multiple-choice")
    defect_types = sorted({image.defect for image in images if image.anomalous and image.defect})
    start = choice_rng.randrange(3)  # where the turns start, the same for both classes: equal classes, equal types
    seen = {False: start, True: start}
    for image in chosen:
        records.append(conversation_record(image, Path(root), rng, follow_ups))
        if multiple_choice > 0:
            types = rotated_types(seen[image.anomalous], multiple_choice)
            seen[image.anomalous] += 1
            records += multiple_choice_records(
                image, root, choice_rng, multiple_choice, defect_types, images, shots, types
            )
    return records
