"""The engine interface over the CLIP expert: its score, map and boxes, text from an optional LLM engine.

`anomaly-assistant inspect --expert clip` goes through `assistant.engine.inspect` exactly like the
assistant does, so the Verdict is assembled by the same code; without a language model the reasoning
is empty and no defect is named.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from ..config import RoiConfig
from ..engine import Conversation, Engine
from ..errors import UsageError
from ..image_io import ImageInput, load_image, load_references
from ..roi import detect_boxes
from ..verdict import Box, Verdict
from .expert import ClipAnomalyExpert


class ClipEngine:
    """Verdicts from the CLIP expert: anomalous when score >= threshold; boxes only then."""

    def __init__(
        self,
        expert: ClipAnomalyExpert,
        threshold: float = 0.5,
        text_engine: Engine | None = None,
        boxes: RoiConfig | None = None,
    ):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {threshold}")
        self.expert = expert
        self.threshold = threshold
        self.text_engine = text_engine
        self.box_config = boxes or RoiConfig()  # Triad's rule: 90% of the map's range, at most 4 boxes

    def analyze(
        self, image: ImageInput, references: Sequence[ImageInput] = (), profile: str | None = None
    ) -> Verdict:
        """The CLIP expert's verdict; normal `references` are its few-shot memory. Product profiles belong to the
        assistant's own expert, so a `profile` is refused."""
        if profile is not None:
            raise UsageError(
                f"the CLIP expert has no product profiles (asked for {profile!r}): give normal reference images, "
                "or inspect with the model's own expert (--expert model)"
            )
        image = load_image(image, "image")
        score, heatmap = self.expert.score(image, load_references(references))
        return Verdict.decided(score, self.threshold, heatmap, self.boxes(heatmap), image.size, expert_score=score)

    def boxes(self, heatmap: np.ndarray) -> list[Box]:
        """Triad boxes on the map, at least one CLIP patch wide (the map cannot localise finer)."""
        rows, cols = self.expert.grid_size
        min_side = math.ceil(max(heatmap.shape[0] / rows, heatmap.shape[1] / cols))
        return detect_boxes(heatmap, min_side, self.box_config)

    def complete(self, conversations: Sequence[Conversation], max_new_tokens: int = 256) -> list[str]:
        if self.text_engine is None:
            return [""] * len(conversations)
        return self.text_engine.complete(conversations, max_new_tokens)

    def stream(self, conversation: Conversation, max_new_tokens: int = 256) -> Iterator[str]:
        if self.text_engine is not None:
            yield from self.text_engine.stream(conversation, max_new_tokens)

    def choice_probabilities(
        self, conversations: Sequence[Conversation], choices: Sequence[str]
    ) -> list[dict[str, float]]:
        if self.text_engine is None:
            raise ValueError("choice probabilities need a language model: give the CLIP engine a text_engine")
        return self.text_engine.choice_probabilities(conversations, choices)
