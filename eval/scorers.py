"""Anything that scores an image for the zero-shot harness: `score(image, references) -> (score, HxW map)`.

Every row of the zero-shot report comes from one scorer measured by the same code. `expert` is our model's
expert through any engine (in-process, or our server's /inspect), `decision` the Verdict's score (the expert
fused with the language model's P(Yes), `config.DecisionConfig`) with the same heatmap; `clip` is
`assistant.clip.expert`, imported only when asked for.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from assistant.engine import Engine, Scorer
from assistant.errors import UsageError

from .backends import model_label, open_engine

SCORERS = ("expert", "decision", "clip")
MODEL_SCORERS = ("expert", "decision")  # rows of our model (through any engine)


class Scored(NamedTuple):
    """One scored image: the score, its HxW map, and whether the image is in the model's domain (None: unknown,
    or the scorer is not our model)."""

    score: float
    map: np.ndarray
    in_domain: bool | None = None


class VerdictScorer:
    """One score of the engine's Verdict (`expert_score` or the decision's `score`) and its heatmap."""

    def __init__(self, engine: Engine, field: str):
        self.engine = engine
        self.field = field

    def scored(
        self, image: Image.Image, references: Sequence[Image.Image] = (), profile: str | None = None
    ) -> Scored:
        verdict = self.engine.analyze(image, references, profile)
        return Scored(getattr(verdict, self.field), verdict.heatmap, verdict.in_domain)

    def score(self, image: Image.Image, references: Sequence[Image.Image] = ()) -> tuple[float, np.ndarray]:
        return self.scored(image, references)[:2]


def score_image(
    scorer: Scorer, image: Image.Image, references: Sequence[Image.Image] = (), profile: str | None = None
) -> Scored:
    """Any scorer's reading of one image, with the domain check (and an enrolled profile) where it is our model."""
    if isinstance(scorer, VerdictScorer):
        return scorer.scored(image, references, profile)
    if profile is not None:
        raise UsageError("only our model's scorers (expert, decision) take a profile")
    return Scored(*scorer.score(image, references))


def scorer_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SCORERS))
    if unknown or not names:
        raise UsageError(f"unknown scorer(s) {unknown or text!r}; choose from {', '.join(SCORERS)}")
    return list(dict.fromkeys(names))


def check_scorer_arguments(names: list[str], args: argparse.Namespace) -> None:
    """A CLIP row without a chosen model would quietly measure random weights."""
    if "clip" in names and not args.clip_model:
        raise UsageError("--scorers clip needs --clip-model SPEC (e.g. ViT-B-16-plus-240:laion400m_e32)")


def scorer_spec(name: str, args: argparse.Namespace) -> str:
    """What the scorer is (recorded, so a resumed run cannot mix two different models under one name)."""
    return args.clip_model if name == "clip" else model_label(args)


def build_scorer(name: str, args: argparse.Namespace) -> Scorer:
    if name in MODEL_SCORERS:
        return VerdictScorer(open_engine(args), "expert_score" if name == "expert" else "score")
    from assistant.clip.expert import ClipAnomalyExpert

    try:
        return ClipAnomalyExpert.from_spec(args.clip_model, device=args.device)
    except ValueError as error:  # an unknown architecture, tag or config
        raise UsageError(f"--clip-model: {error}") from error
