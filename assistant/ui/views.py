"""What the verdict panel and the chat show, computed from the expert's `Verdict` (plain values, no Gradio).

Large photos are scaled down once per analysis for display: the browser never needs more than about a
screen's worth of pixels, and re-blending the heatmap at every opacity change stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
from PIL import Image

from ..engine import Conversation
from ..image_io import fit_long_side
from ..overlay import blend_heatmap
from ..verdict import Verdict

MAX_DISPLAY_SIDE = 1024
PENDING = "…"
EMPTY_ANSWER = "*(the model returned no text)*"

Annotations = tuple[Image.Image, list[tuple[tuple[int, int, int, int], str]]]
Label = dict[str, float] | str  # the gr.Label value: both classes with their probabilities, or a plain verdict


@dataclass(frozen=True)
class Preview:
    """The query image and its verdict at display size (what a session keeps of its analysis)."""

    image: Image.Image
    verdict: Verdict  # heatmap and boxes in the display image's pixels


def make_preview(image: Image.Image, verdict: Verdict, max_side: int = MAX_DISPLAY_SIDE) -> Preview:
    height, width = fit_long_side((image.height, image.width), max_side)
    if (width, height) == image.size:
        return Preview(image, verdict)
    scale = max_side / max(image.size)
    heatmap = cv2.resize(verdict.heatmap, (width, height), interpolation=cv2.INTER_AREA).clip(0, 1)
    boxes = [box.scaled(scale, scale, width, height) for box in verdict.boxes]
    shown = verdict.model_copy(update={"heatmap": heatmap, "boxes": boxes})
    return Preview(image.resize((width, height), Image.Resampling.LANCZOS), shown)


def verdict_label(verdict: Verdict) -> Label:
    """Both classes with the calibrated score for gr.Label, whose heading is the most probable class.

    A model configured with a decision threshold other than 0.5 can call a 0.4 score anomalous; the
    heading must still say what the model decided, so that case falls back to a plain text verdict.
    """
    decision = "Anomalous" if verdict.anomalous else "Normal"
    probabilities = {"Anomalous": verdict.score, "Normal": 1.0 - verdict.score}
    if max(probabilities, key=probabilities.__getitem__) == decision:
        return probabilities
    return f"{decision} (anomaly score {verdict.score:.2f})"


def domain_notice(verdict: Verdict) -> str:
    """What the verdict is worth for this image: a visible warning when it is unlike the model's training images."""
    if verdict.in_domain is None:
        return "**Domain unknown:** this model carries no description of the images it was trained on."
    if not verdict.in_domain:
        return (
            f"⚠️ **Out of domain** (domain score {verdict.domain_score:.2f}): this image does not look like the images "
            "the model was trained on, so its verdict is unreliable. See the model card above."
        )
    return f"In domain (domain score {verdict.domain_score:.2f}): the image looks like the model's training images."


def profile_notice(profile: str, verdict: Verdict) -> str:
    """What the product profile did: the query was compared with its normal images."""
    distance = verdict.reference_distance
    distance = "" if distance is None else f" (farthest patch distance {distance:.3f})"
    return f"Compared with product profile **{profile}**{distance}, at the profile's own threshold."


def overlay(preview: Preview, opacity: float) -> Image.Image:
    return blend_heatmap(preview.image, preview.verdict.heatmap, opacity, preview.verdict.boxes)


def regions(preview: Preview) -> Annotations:
    """gr.AnnotatedImage value: the image and one labelled box per suspicious region."""
    return preview.image, [
        ((box.x0, box.y0, box.x1, box.y1), f"region {index} · peak {box.score:.2f}")
        for index, box in enumerate(preview.verdict.boxes, start=1)
    ]


def chat_history(conversation: Conversation, image_path: str, pending: str | None = None) -> list[dict]:
    """Chatbot messages; the query image opens the first user turn, as it does in the model's prompt."""
    messages = []
    for index, message in enumerate(conversation.messages):
        content: str | list = message["content"] or EMPTY_ANSWER
        if index == 0:
            content = [{"path": image_path}, content]
        messages.append({"role": message["role"], "content": content})
    if pending is not None:
        messages.append({"role": "assistant", "content": pending or PENDING})
    return messages
