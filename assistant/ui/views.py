"""What the verdict panel and the chat show, computed from the expert's `Analysis` (plain values, no Gradio).

Large photos are scaled down once per analysis for display: the browser never needs more than about a
screen's worth of pixels, and re-blending the heatmap at every opacity change stays instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from ..engine import Analysis, Conversation
from ..overlay import blend_heatmap, quantize
from ..verdict import Box

MAX_DISPLAY_SIDE = 1024
PENDING = "…"
EMPTY_ANSWER = "*(the model returned no text)*"

Annotations = tuple[Image.Image, list[tuple[tuple[int, int, int, int], str]]]
Label = dict[str, float] | str  # the gr.Label value: both classes with their probabilities, or a plain verdict


@dataclass(frozen=True)
class Preview:
    """The query image with its heatmap and boxes at display size (what a session keeps of its analysis)."""

    image: Image.Image
    heatmap: np.ndarray  # [h, w] uint8 levels (`overlay.quantize`): all the colour map can show, 1 byte a pixel
    boxes: list[Box]


def _scale_box(box: Box, scale: float, width: int, height: int) -> Box:
    x0, y0 = min(width - 1, math.floor(box.x0 * scale)), min(height - 1, math.floor(box.y0 * scale))
    x1 = min(width, max(x0 + 1, math.ceil(box.x1 * scale)))
    y1 = min(height, max(y0 + 1, math.ceil(box.y1 * scale)))
    return Box(x0=x0, y0=y0, x1=x1, y1=y1, score=box.score)


def make_preview(image: Image.Image, analysis: Analysis, max_side: int = MAX_DISPLAY_SIDE) -> Preview:
    scale = max_side / max(image.size)
    if scale >= 1.0:
        return Preview(image, quantize(analysis.heatmap), list(analysis.boxes))
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    heatmap = cv2.resize(analysis.heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    boxes = [_scale_box(box, scale, width, height) for box in analysis.boxes]
    return Preview(image.resize((width, height), Image.Resampling.LANCZOS), quantize(heatmap), boxes)


def verdict_label(analysis: Analysis) -> Label:
    """Both classes with the calibrated score for gr.Label, whose heading is the most probable class.

    A model configured with a decision threshold other than 0.5 can call a 0.4 score anomalous; the
    heading must still say what the model decided, so that case falls back to a plain text verdict.
    """
    verdict = "Anomalous" if analysis.anomalous else "Normal"
    probabilities = {"Anomalous": analysis.score, "Normal": 1.0 - analysis.score}
    if max(probabilities, key=probabilities.__getitem__) == verdict:
        return probabilities
    return f"{verdict} (anomaly score {analysis.score:.2f})"


def overlay(preview: Preview, opacity: float) -> Image.Image:
    return blend_heatmap(preview.image, preview.heatmap, opacity, preview.boxes)


def regions(preview: Preview) -> Annotations:
    """gr.AnnotatedImage value: the image and one labelled box per suspicious region."""
    return preview.image, [
        ((box.x0, box.y0, box.x1, box.y1), f"region {index} · peak {box.score:.2f}")
        for index, box in enumerate(preview.boxes, start=1)
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
