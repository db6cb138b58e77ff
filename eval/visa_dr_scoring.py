"""VisA-D&R answers on disk and their scores: detection as the official script, reasoning by text metrics.

Detection (honda-research-institute/Anomaly-OneVision `scripts/eval/calc_accuracy.py`): "Yes" or "yes" anywhere
in the answer means anomalous; accuracy, precision, recall and F1 per class (sklearn), then the unweighted mean
over classes. Reasoning: ROUGE-L, SBERT cosine and the optional judge score per answered question with a reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from .records import Record
from .text_metrics import rouge_l, sbert_cosine

DETECTION_METRICS = ("Acc", "Prec", "Rec", "F1")


class DetectionAnswer(Record):
    image: str
    category: str
    anomaly: bool
    response: str
    p_yes: float | None = None
    # With `--answer verdict` (our model): the Verdict's decision score and domain check.
    score: float | None = None
    in_domain: bool | None = None

    @property
    def predicted(self) -> bool:
        return "Yes" in self.response or "yes" in self.response  # the official rule

    @property
    def ranking(self) -> float | None:
        """What AUROC ranks by: the Verdict's score when there is one, else P(Yes)."""
        return self.p_yes if self.score is None else self.score


class ReasoningAnswer(Record):
    image: str
    category: str
    questions: list[str]
    references: list[str] | None
    responses: list[str]


class JudgeAnswer(Record):
    prompt: str
    reply: str
    score: float | None


def detection_metrics(records: Sequence[DetectionAnswer]) -> dict[str, dict[str, float | None]]:
    """Per class (and 'Macro' = unweighted mean over classes): Acc, Prec, Rec, F1 (0 where undefined, as
    sklearn's default), AUROC from the Verdict's score or P(Yes) (None for a single-class class or without
    scores)."""
    table: dict[str, dict[str, float | None]] = {}
    for name in sorted({r.category for r in records}):
        mine = [r for r in records if r.category == name]
        truth, predicted = [r.anomaly for r in mine], [r.predicted for r in mine]
        scores = [r.ranking for r in mine]
        two_classes = len(set(truth)) == 2 and None not in scores
        table[name] = {
            "N": len(mine),
            "Acc": accuracy_score(truth, predicted),
            "Prec": precision_score(truth, predicted, zero_division=0),
            "Rec": recall_score(truth, predicted, zero_division=0),
            "F1": f1_score(truth, predicted, zero_division=0),
            "AUROC": roc_auc_score(truth, scores) if two_classes else None,
        }
    classes = list(table.values())
    if classes:
        aurocs = [row["AUROC"] for row in classes if row["AUROC"] is not None]
        table["Macro"] = {m: float(np.mean([row[m] for row in classes])) for m in DETECTION_METRICS}
        table["Macro"] |= {"N": sum(row["N"] for row in classes), "AUROC": float(np.mean(aurocs)) if aurocs else None}
    return table


def reasoning_pairs(records: Sequence[ReasoningAnswer]) -> list[tuple[str, int, str, str, str]]:
    """(judge id, turn, question, reference, response) for every answered question that has a reference."""
    return [
        (f"{r.id}#{turn}", turn, question, reference, response)
        for r in records
        if r.references
        for turn, (question, reference, response) in enumerate(zip(r.questions, r.references, r.responses, strict=True))
    ]


def reasoning_metrics(
    records: Sequence[ReasoningAnswer], judged: dict[str, JudgeAnswer]
) -> dict[str, dict[str, float | None]]:
    """Mean ROUGE-L, SBERT cosine and judge score over all pairs ('All') and per question number (Q1, Q2, ...)."""
    pairs = reasoning_pairs(records)
    if not pairs:
        return {}
    rouge = rouge_l([p[4] for p in pairs], [p[3] for p in pairs])
    sbert = sbert_cosine([p[4] for p in pairs], [p[3] for p in pairs])
    judge = [judged[p[0]].score if p[0] in judged else None for p in pairs]

    def means(indices: list[int]) -> dict[str, float | None]:
        scores = [judge[i] for i in indices if judge[i] is not None]
        return {
            "N": len(indices),
            "ROUGE-L": float(np.mean([rouge[i] for i in indices])),
            "SBERT": float(np.mean([sbert[i] for i in indices])),
            "Judge": float(np.mean(scores)) if scores else None,
        }

    table = {"All": means(list(range(len(pairs))))}
    for turn in sorted({p[1] for p in pairs}):
        table[f"Q{turn + 1}"] = means([i for i, p in enumerate(pairs) if p[1] == turn])
    return table
