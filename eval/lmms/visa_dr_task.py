"""VisA-D&R detection in lmms-eval: the items, image views, question and scoring of `eval visa-dr --detection`.

Rows come from `$ANOMALY_ASSISTANT_VISA_DR` (test_data.json; images under its folder's parent as in the official
layout, or under `$ANOMALY_ASSISTANT_VISA_DR_IMAGES`); the metrics are the "Macro" row of
`eval.visa_dr_scoring.detection_metrics`. AUROC needs P(Yes) or the Verdict's score, which a generated answer does
not carry: `eval visa-dr` reports it.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from assistant.image_io import load_image
from assistant.prompts import DETECTION_QUESTION

from ..visa_dr_data import DetectionItem, category, load_items, visa_dr_view
from ..visa_dr_scoring import DetectionAnswer, detection_metrics
from .task_data import LocalFileTask

IMAGES_ENV = "ANOMALY_ASSISTANT_VISA_DR_IMAGES"


class DetectionTask(LocalFileTask):
    """The Yes/No items of test_data.json, in file order; images as the official layout (or $IMAGES_ENV) has them."""

    DATA_ENV, DATA_WHAT = "ANOMALY_ASSISTANT_VISA_DR", "the path of VisA-D&R's test_data.json"

    def rows(self, path: Path, options: dict) -> list[dict]:
        root = Path(os.environ.get(IMAGES_ENV) or path.parent.parent).resolve()
        items = load_items(path, DetectionItem)
        return [{"image": item.image, "anomaly": item.anomaly, "root": str(root)} for item in items]


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [visa_dr_view(load_image(Path(doc["root"]) / doc["image"], doc["image"]))]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return DETECTION_QUESTION


def process_results(doc: dict, results: list[str]) -> dict:
    answer = DetectionAnswer(
        id=doc["image"],
        image=doc["image"],
        category=category(doc["image"]),
        anomaly=doc["anomaly"],
        response=results[0],
    ).model_dump()
    # Wrapped: lmms-eval reads a per-sample dict's "score" key as a number for its standard errors.
    return {name: {"answer": answer} for name in ("accuracy", "precision", "recall", "f1")}


def _macro(rows: list[dict], metric: str) -> float:
    return detection_metrics([DetectionAnswer.model_validate(row["answer"]) for row in rows])["Macro"][metric]


def accuracy(rows: list[dict]) -> float:
    return _macro(rows, "Acc")


def precision(rows: list[dict]) -> float:
    return _macro(rows, "Prec")


def recall(rows: list[dict]) -> float:
    return _macro(rows, "Rec")


def f1(rows: list[dict]) -> float:
    return _macro(rows, "F1")
