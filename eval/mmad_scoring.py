"""MMAD answers -> the official per-dataset x subtask table, in an official-compatible and a strict variant.

Official (jam-cc/MMAD `helper/summary.py: caculate_accuracy_mmad`, reproduced exactly):
  * parse: the first standalone capital A-E in the response, else the option text closest to the whole response
    (difflib, cutoff 0: some letter always comes out);
  * answers outside A-E are removed while iterating the list, which also skips the following answer;
  * "Object Structure" and "Object Details" merge into "Object Analysis"; dataset = first path component;
  * "Anomaly Detection" = balanced accuracy (mean of the accuracies on images with/without 'good' in the path);
  * an empty (dataset, subtask) cell counts as 0; row Average = mean over subtasks, then mean over datasets;
    Overkill = 1 - normal accuracy, Miss = 1 - anomaly accuracy.
Strict: every answer counts; a letter must be one of the options shown (or exactly one option's text must appear
as words in the response), otherwise the answer is wrong; empty cells are left out of the averages.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

DETECTION = "Anomaly Detection"
SUBTASKS = (  # the papers' column order and short names
    (DETECTION, "Disc"),
    ("Defect Classification", "Cls"),
    ("Defect Localization", "Loc"),
    ("Defect Description", "Desc"),
    ("Defect Analysis", "Anal"),
    ("Object Classification", "ObjCls"),
    ("Object Analysis", "ObjAnal"),
)
MERGED = {"Object Structure": "Object Analysis", "Object Details": "Object Analysis"}
NORMAL_FLAG = "good"
LETTER = re.compile(r"\b([A-E])\b")
VALID = frozenset("ABCDE")


def official_letter(response: str, options: dict[str, str]) -> str:
    """The official LLaVA script's parse: first standalone A-E, else the closest option text."""
    letters = LETTER.findall(response)
    if letters:
        return letters[0]
    closest = difflib.get_close_matches(response, list(options.values()), n=1, cutoff=0.0)
    return next((letter for letter, text in options.items() if closest and text == closest[0]), "")


def strict_letter(response: str, options: dict[str, str]) -> str | None:
    """First standalone letter that is a shown option, else the one option whose text appears; None = unparseable."""
    for letter in LETTER.findall(response):
        if letter in options:
            return letter
    named = [
        letter
        for letter, text in options.items()
        if (words := text.strip().rstrip(".").strip())
        and re.search(rf"\b{re.escape(words)}\b", response, re.IGNORECASE)
    ]
    return named[0] if len(named) == 1 else None


def constrained_letter(probabilities: dict[str, float]) -> str:
    """Scoring by letter likelihood (no text parsed): the most probable shown letter."""
    return max(probabilities, key=probabilities.__getitem__)


@dataclass(frozen=True)
class Graded:
    dataset: str
    subtask: str
    normal: bool  # the image path contains 'good' (the official flag)
    answer: str
    predicted: str | None

    @property
    def correct(self) -> bool:
        return self.predicted == self.answer


def grade(image: str, question_type: str, answer: str, predicted: str | None) -> Graded:
    return Graded(
        image.split("/")[0], MERGED.get(question_type, question_type), NORMAL_FLAG in image, answer, predicted
    )


@dataclass
class Summary:
    """Percentages by dataset (plus an "Average" row) and column (subtasks, Average, Overkill, Miss)."""

    columns: list[str]
    rows: dict[str, dict[str, float | None]]
    counted: int
    dropped: int = 0  # official: answers outside A-E, not counted
    skipped: int = 0  # official: valid answers never seen because of the list-removal quirk


def official_filter(graded: Sequence[Graded]) -> tuple[list[Graded], int, int]:
    """Reproduce `list.remove` during iteration: each invalid answer is dropped and the next one is never seen."""
    kept, dropped, skipped, skip_next = [], 0, 0, False
    for row in graded:
        valid = row.predicted in VALID and row.answer in VALID
        if skip_next:
            skip_next = False
            skipped += valid
            dropped += not valid
        elif not valid:
            dropped += 1
            skip_next = True
        else:
            kept.append(row)
    return kept, dropped, skipped


def _accuracy(rows: Sequence[Graded], official: bool) -> float | None:
    if not rows:
        return 0.0 if official else None
    return sum(row.correct for row in rows) / len(rows)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def subtask_order(graded: Sequence[Graded]) -> list[str]:
    """The papers' order for known subtasks, then any other type in order of appearance."""
    present = dict.fromkeys(row.subtask for row in graded)
    known = [name for name, _ in SUBTASKS if name in present]
    return known + [name for name in present if name not in known]


def summarize(graded: Sequence[Graded], official: bool) -> Summary:
    """The per-dataset table; `graded` must be in data-file order (the official quirk depends on it)."""
    subtasks = subtask_order(graded)  # columns come from every answer, dropped ones included (as officially)
    datasets = list(dict.fromkeys(row.dataset for row in graded))
    kept, dropped, skipped = official_filter(graded) if official else (list(graded), 0, 0)
    rows: dict[str, dict[str, float | None]] = {}
    for dataset in datasets:
        mine = [row for row in kept if row.dataset == dataset]
        row = {name: _accuracy([r for r in mine if r.subtask == name], official) for name in subtasks}
        detection = [r for r in mine if r.subtask == DETECTION]
        normal_acc = _accuracy([r for r in detection if r.normal], official)
        anomaly_acc = _accuracy([r for r in detection if not r.normal], official)
        if DETECTION in row:
            row[DETECTION] = (normal_acc + anomaly_acc) / 2 if official else _mean([normal_acc, anomaly_acc])
        row = {name: _percent(value) for name, value in row.items()}
        row["Average"] = _mean([row[name] for name in subtasks])
        row["Overkill"] = _percent(None if normal_acc is None else 1 - normal_acc)
        row["Miss"] = _percent(None if anomaly_acc is None else 1 - anomaly_acc)
        rows[dataset] = row
    columns = [*subtasks, "Average", "Overkill", "Miss"]
    rows["Average"] = {column: _mean([rows[d][column] for d in datasets]) for column in columns}
    return Summary(columns, rows, counted=len(kept), dropped=dropped, skipped=skipped)
