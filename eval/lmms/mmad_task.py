"""MMAD in lmms-eval: the questions, prompt, seeded option order, image views and scoring of `eval mmad`.

Rows come from `$ANOMALY_ASSISTANT_MMAD` (mmad.json; images relative to its folder, or under
`$ANOMALY_ASSISTANT_MMAD_IMAGES`) through `eval.mmad_data.question_items`; answers are scored by `eval.mmad.summaries`
in data-file order, so the metrics are the "Average" column of `eval mmad`'s official-compatible and strict tables
(and of its letter-likelihood table for the `mmad_likelihood` tasks).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image

from assistant.image_io import load_image

from ..cli import OFFICIAL_MMAD_SIDE
from ..mmad import MMADAnswer, summaries
from ..mmad_data import LETTERS, load_mmad, mmad_view, prompt, question_items
from .task_data import LocalFileTask

IMAGES_ENV = "ANOMALY_ASSISTANT_MMAD_IMAGES"


class MMADTask(LocalFileTask):
    """dataset_kwargs: shots, similar_templates, seed, shuffle, max_side (as `eval mmad`'s options)."""

    DATA_ENV, DATA_WHAT = "ANOMALY_ASSISTANT_MMAD", "the path of MMAD's mmad.json"

    def rows(self, path: Path, options: dict) -> list[dict]:
        root = Path(os.environ.get(IMAGES_ENV) or path.parent).resolve()
        items = question_items(
            load_mmad(path),
            int(options.get("shots", 1)),
            bool(options.get("similar_templates", False)),
            int(options.get("seed", 0)),
            bool(options.get("shuffle", True)),
        )
        return [
            {
                "order": order,
                "id": item.id,
                "image": item.image,
                "index": item.index,
                "type": item.question.type,
                "question": item.question.Question,
                "options": json.dumps(item.options),  # letter -> text, in shown order (a JSON object keeps it)
                "permutation": list(item.permutation),
                "answer": item.answer,
                "templates": list(item.templates),
                "root": str(root),
                "max_side": int(options.get("max_side", OFFICIAL_MMAD_SIDE)),
            }
            for order, item in enumerate(items)
        ]


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The templates, then the query: the views `eval mmad` shows (fitted, JPEG re-encoded)."""
    return [
        mmad_view(load_image(Path(doc["root"]) / path, path), doc["max_side"])
        for path in [*doc["templates"], doc["image"]]
    ]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return prompt(doc["question"], json.loads(doc["options"]))


def doc_to_choice(doc: dict) -> list[str]:
    return list(json.loads(doc["options"]))


def doc_to_target(doc: dict) -> int:
    return LETTERS.index(doc["answer"])


def _record(doc: dict, response: str, letter_probs: dict[str, float] | None = None) -> dict:
    fields = ("id", "image", "index", "type", "question", "permutation", "answer", "templates")
    answer = MMADAnswer(
        **{name: doc[name] for name in fields},
        options=json.loads(doc["options"]),
        response=response,
        letter_probs=letter_probs,
    )
    return {"order": doc["order"], "answer": answer.model_dump()}


def process_results(doc: dict, results: list[str]) -> dict:
    record = _record(doc, results[0])
    return {"official": record, "strict": record}


def _loglikelihood(result: object) -> float:
    """The log P of a loglikelihood request's (log P, is_greedy), which lmms-eval 0.7.3 hands over as its str()
    (its `unwrap_generation_output` stringifies every non-text response): "(-1.5, False)", "(-inf, False)"."""
    return float(str(result).strip("()").split(",")[0])


def process_likelihood_results(doc: dict, results: list) -> dict:
    """A multiple-choice request per option letter: the letters' likelihoods, renormalised (as `--letter-probs`)."""
    letters = doc_to_choice(doc)
    logs = [_loglikelihood(result) for result in results]
    likelihoods = [math.exp(value - max(logs)) for value in logs]  # relative to the best: no underflow to 0 / 0
    probabilities = {letter: value / sum(likelihoods) for letter, value in zip(letters, likelihoods, strict=True)}
    return {"letter_likelihood": _record(doc, max(probabilities, key=probabilities.__getitem__), probabilities)}


def _average(rows: list[dict], table: str) -> float:
    records = [MMADAnswer.model_validate(row["answer"]) for row in sorted(rows, key=lambda row: row["order"])]
    return summaries(records)[table].rows["Average"]["Average"]


def official_average(rows: list[dict]) -> float:
    return _average(rows, "official-compatible")


def strict_average(rows: list[dict]) -> float:
    return _average(rows, "strict")


def likelihood_average(rows: list[dict]) -> float:
    return _average(rows, "letter likelihood")
