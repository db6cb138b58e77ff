"""WinCLIP's compositional prompt ensemble: state words x templates x object name, per class.

One phrasing is a noisy probe of CLIP's text space; averaging the embeddings of many (7 normal and 4
anomalous states, each in 22 photo templates) gives stable "normal" and "anomalous" directions.
"""

from __future__ import annotations

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def class_prompts(object_name: str) -> tuple[list[str], list[str]]:
    """(normal prompts, anomalous prompts) for one object, e.g. "a photo of the flawless bottle."."""
    name = object_name.strip().replace("_", " ")
    if not name:
        raise ValueError("object name must not be empty")

    def compose(states: tuple[str, ...]) -> list[str]:
        return [template.format(state.format(name)) for state in states for template in TEMPLATES]

    return compose(NORMAL_STATES), compose(ANOMALOUS_STATES)
