"""The model card a training stage writes with its checkpoint: the starting model's card, plus what this stage
trained on (so a card always says what the weights have seen)."""

from __future__ import annotations

from assistant.card import ModelCard

from .config import ModelSource


def stage_card(source: ModelSource, stage: str, data: str, steps: str) -> ModelCard:
    """`source`'s card (a tiny random one has none) with this stage appended to `trained_on`."""
    folder = source.folder()
    base = ModelCard.load(folder) if folder else None
    trained = f"{stage} on {data} ({steps})"
    if base is None:
        return ModelCard(
            name=f"assistant after {stage}",
            summary=f"An assistant checkpoint after {stage}.",
            trained_on=trained,
        )
    untrained = base.trained_on == ModelCard.model_fields["trained_on"].default
    earlier = "" if untrained else base.trained_on + "; then "
    limits = "" if untrained else base.limits  # "untrained" no longer holds; the old metrics neither
    return base.model_copy(update={"trained_on": earlier + trained, "limits": limits, "metrics": []})
