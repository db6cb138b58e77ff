"""The model card every checkpoint carries (`model_card.json`): what the model is, what it has seen, how well
it did and how that was measured, so no surface presents a model's output without saying what it knows.

Written by everything that writes a checkpoint (`init-tiny`, `convert`, both training stages, the demo recipe,
`export`); read by `anomaly-assistant info`, the app's header and the server's `/v1/model-card`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import AssistantError
from .files import write_text_atomic

CARD_FILE = "model_card.json"


class CardError(AssistantError, ValueError):
    """A model card that cannot be read."""


class Metric(BaseModel):
    """One measured figure and the command that produced it."""

    model_config = ConfigDict(extra="forbid")

    name: str  # e.g. "image AUROC (all defects)"
    value: float
    split: str  # what it was measured on, e.g. "textile test (400 held-out images)"
    command: str = ""


class Example(BaseModel):
    """An image the model is meant for, shipped in the checkpoint folder (the app offers it as an example)."""

    model_config = ConfigDict(extra="forbid")

    image: str  # path relative to the checkpoint folder
    label: str  # e.g. "normal", "local defect"
    reference: str | None = None  # a normal image of the same object, relative to the folder


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    summary: str  # one sentence: what the model is and is for
    trained_on: str = "nothing: random weights"  # data, splits, image counts
    image_kinds: str = "unknown"  # what its images look like, e.g. "grayscale 250 px fabric"
    classes: list[str] = Field(default_factory=list)  # the labels it was trained with
    limits: str = ""  # what it is known not to do
    metrics: list[Metric] = Field(default_factory=list)
    examples: list[Example] = Field(default_factory=list)

    @classmethod
    def load(cls, folder: str | Path) -> ModelCard | None:
        """The card in a checkpoint folder; None if it has none (a checkpoint written before cards)."""
        path = Path(folder) / CARD_FILE
        if not path.is_file():
            return None
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except (ValidationError, UnicodeDecodeError, OSError) as error:
            raise CardError(f"{path}: not a valid model card ({str(error).splitlines()[0]})") from None

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CARD_FILE
        write_text_atomic(path, json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path

    def headline(self) -> str:
        """One line for the app's header and the CLI: name, summary, what it has seen."""
        return f"{self.name}: {self.summary} Trained on {self.trained_on}; images: {self.image_kinds}."

    def markdown(self) -> str:
        """The full card, for `anomaly-assistant info` and the app."""
        lines = [f"# {self.name}", "", self.summary, "", f"- trained on: {self.trained_on}"]
        lines += [f"- images: {self.image_kinds}"]
        if self.classes:
            lines.append(f"- classes: {', '.join(self.classes)}")
        if self.limits:
            lines.append(f"- limits: {self.limits}")
        if self.metrics:
            lines += ["", "| metric | value | measured on | command |", "|---|---|---|---|"]
            lines += [f"| {m.name} | {m.value:.3f} | {m.split} | `{m.command}` |" for m in self.metrics]
        return "\n".join(lines)


def untrained_card(name: str, summary: str) -> ModelCard:
    """The card of a model nobody trained (random or freshly assembled weights)."""
    return ModelCard(name=name, summary=summary, limits="untrained: its verdicts and answers are noise")


def unknown_card(name: str) -> ModelCard:
    """The card of a checkpoint written without one: it says that nothing is known."""
    return ModelCard(name=name, summary="An assistant checkpoint saved without a description.", trained_on="unknown")
