"""`anomaly-assistant eval calibrate`: fit the decision that turns the expert's logit and the LLM's P(Yes) into
the verdict's calibrated score (`config.DecisionConfig`).

The expert is trained with class-balanced BCE and the LLM to answer Yes/No, so neither raw signal is a
probability under the class mix a user meets, and they can disagree. A logistic regression of the labels on
[expert logit, logit P(Yes)] over a labelled validation split (one no training step read; the demo recipe
carves it out of train, never the held-out test split) gives
`score = sigmoid(expert_weight * expert_logit + llm_weight * logit(P(Yes)) + bias)`; `--expert-only` fits the
expert's logit alone (Platt scaling). The expected calibration error (ECE, 10 equal-width bins) and the Brier
score of the raw expert sigmoid, the checkpoint's current score and the fit are printed; `--write` stores the fit
in the model's `config.json` (`decision`). Run it on the test split without `--write` to measure held-out ECE.

`--shots K` fits the few-shot evidence instead (`config.ReferenceConfig`): every image gets K normal references
drawn (seeded, once per category) from its category's normal *train* images, and the `weight` and `shift` of
`expert logit + weight * max(0, distance - shift)` are fitted by maximum likelihood (mildly L2-regularised on the
weight) with the decision's own logit as the fixed rest of the model: the decision's calibration stays as it is
and holds with references too. `--write` stores them in `config.json` (`reference`).

    anomaly-assistant eval calibrate --data runs/demo/data --split val --model assistant/weights/demo --write
    anomaly-assistant eval calibrate --data runs/demo/data --split val --shots 1 --model assistant/weights/demo --write
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from assistant.config import MOVED_TO_DECISION, PROBABILITY_EPS, DecisionConfig, ReferenceConfig
from assistant.errors import UsageError

BINS = 10


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = BINS) -> float:
    """Mean |accuracy - confidence| over equal-width probability bins, weighted by bin size."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(labels[members].mean() - probabilities[members].mean())
    return float(error)


def fit_logistic(features: np.ndarray, labels: np.ndarray) -> tuple[list[float], float]:
    """(weights, bias) of the logistic regression of labels on the feature columns.

    Mildly L2-regularised (scikit-learn's C=1): on a validation split the two signals separate cleanly, the
    unregularised fit's weights would grow without bound, and the score would jump from 0 to 1.
    """
    from sklearn.linear_model import LogisticRegression

    if len(set(labels.tolist())) < 2:
        raise UsageError("calibration needs both normal and anomalous images")
    regression = LogisticRegression(C=1.0, max_iter=1000).fit(features, labels)
    return [float(w) for w in regression.coef_[0]], float(regression.intercept_[0])


@dataclass
class Signals:
    """The two raw signals of each labelled image, and the score the checkpoint gives it now."""

    expert_logits: np.ndarray
    yes_probabilities: np.ndarray
    current_scores: np.ndarray

    @property
    def llm_logits(self) -> np.ndarray:
        p = np.clip(self.yes_probabilities, PROBABILITY_EPS, 1 - PROBABILITY_EPS)  # as `DecisionConfig.score` clips
        return np.log(p / (1 - p))


def collect_signals(engine, images: list) -> Signals:
    """Expert logit, P(Yes) and current score of each labelled image, in order, with a progress bar."""
    from tqdm.auto import tqdm

    from assistant.engine import yes_probability
    from assistant.image_io import load_image

    decision = engine.model.config.decision
    logits, yes, current = [], [], []
    for item in tqdm(images, desc="expert + P(Yes)"):
        image = load_image(item.image)
        logit = float(engine.encode([image]).analysis.logits[0])
        p_yes = yes_probability(engine, image)
        logits.append(logit)
        yes.append(p_yes)
        current.append(decision.score(logit, p_yes))
    return Signals(np.array(logits), np.array(yes), np.array(current))


def _summary(labels: np.ndarray, probabilities: np.ndarray) -> str:
    brier = float(np.mean((probabilities - labels) ** 2))
    accuracy = float(np.mean((probabilities >= 0.5) == labels))
    return f"ECE {expected_calibration_error(labels, probabilities):.4f}  Brier {brier:.4f}  accuracy {accuracy:.3f}"


def fit_decision(engine, images: list, fitted_on: str, expert_only: bool = False) -> DecisionConfig:
    """The engine's decision refitted on labelled images (a report of before and after is printed)."""
    from scipy.special import expit

    labels = np.array([int(item.anomalous) for item in images])
    signals = collect_signals(engine, images)
    columns = [signals.expert_logits] if expert_only else [signals.expert_logits, signals.llm_logits]
    weights, bias = fit_logistic(np.stack(columns, axis=1), labels)
    expert_weight, llm_weight = weights[0], (0.0 if expert_only else weights[1])
    fitted = expit(expert_weight * signals.expert_logits + llm_weight * signals.llm_logits + bias)
    print(f"{len(images)} images ({labels.sum()} anomalous): {fitted_on}")
    print(f"raw expert sigmoid:  {_summary(labels, expit(signals.expert_logits))}")
    print(f"current score:       {_summary(labels, signals.current_scores)}")
    print(
        f"fitted:              {_summary(labels, fitted)}   "
        f"(expert_weight {expert_weight:.4f}, llm_weight {llm_weight:.4f}, bias {bias:.4f})"
    )
    return engine.model.config.decision.model_copy(
        update={"expert_weight": expert_weight, "llm_weight": llm_weight, "bias": bias, "fitted_on": fitted_on}
    )


def fit_hinge_logistic(feature: np.ndarray, offset: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(slope, knee) of P(label) = sigmoid(offset + slope * max(0, feature - knee)), by maximum likelihood with a
    mild L2 penalty on the slope (like `fit_logistic`); slope >= 0, knee within the feature's range."""
    from scipy.optimize import minimize
    from scipy.special import log_expit

    if len(set(labels.tolist())) < 2:
        raise UsageError("calibration needs both normal and anomalous images")

    def loss(parameters: np.ndarray) -> float:
        slope, knee = parameters
        z = offset + slope * np.maximum(0.0, feature - knee)
        return float(-np.sum(labels * log_expit(z) + (1 - labels) * log_expit(-z)) + 0.5 * slope**2)

    low, high = float(feature.min()), float(feature.max())
    starts = [(1.0, knee) for knee in np.quantile(feature, [0.25, 0.5, 0.75, 0.9])]
    results = [
        minimize(loss, np.array(start), method="L-BFGS-B", bounds=[(0.0, None), (low, high)]) for start in starts
    ]
    best = min(results, key=lambda result: result.fun)
    return float(best.x[0]), float(best.x[1])


def fit_reference(engine, images: list, references: dict[str, list], fitted_on: str) -> ReferenceConfig:
    """The engine's few-shot evidence (`weight`, `shift`) refitted on labelled images, each with the normal
    references of its category; the decision's logit is the fixed offset (a report is printed)."""
    from scipy.special import expit
    from tqdm.auto import tqdm

    from assistant.config import logit
    from assistant.engine import yes_probability
    from assistant.image_io import load_image

    config = engine.model.config
    decision, reference = config.decision, config.reference
    if decision.expert_weight <= 0:
        raise UsageError("the decision gives the expert no weight (decision.expert_weight <= 0): references enter "
                         "through the expert's logit; calibrate the decision first")
    labels = np.array([int(item.anomalous) for item in images])
    offsets, distances, current = [], [], []
    for item in tqdm(images, desc="expert + references + P(Yes)"):
        image, normals = load_image(item.image), [load_image(p) for p in references[item.category]]
        analysis = engine.encode([*normals, image]).analysis
        p_yes = yes_probability(engine, image, normals)
        llm = 0.0 if p_yes is None else decision.llm_weight * logit(p_yes)
        offsets.append(decision.expert_weight * float(analysis.expert.logits[0]) + llm + decision.bias)
        distances.append(float(analysis.reference.image_distances[0]))
        current.append(decision.score(float(analysis.logits[0]), p_yes))
    offsets, distances = np.array(offsets), np.array(distances)
    slope, shift = fit_hinge_logistic(distances, offsets, labels)
    weight = slope / decision.expert_weight
    fitted = expit(offsets + slope * np.maximum(0.0, distances - shift))
    print(f"{len(images)} images ({labels.sum()} anomalous), {len(next(iter(references.values())))} shot(s): "
          f"{fitted_on}")
    print(f"zero-shot decision:  {_summary(labels, expit(offsets))}")
    print(f"current references:  {_summary(labels, np.array(current))}")
    print(f"fitted:              {_summary(labels, fitted)}   (weight {weight:.4f}, shift {shift:.4f})")
    return reference.model_copy(update={"weight": weight, "shift": shift, "fitted_on": fitted_on})


def write_section(model: Path, name: str, section: DecisionConfig | ReferenceConfig) -> Path:
    """Store one sub-config (`decision`, `reference`) in the checkpoint's `config.json` (atomically)."""
    from assistant.files import write_text_atomic

    config_path = model / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for old in MOVED_TO_DECISION:  # an older checkpoint's keys
        config.get("expert", {}).pop(old, None)
    config[name] = section.model_dump()
    write_text_atomic(config_path, json.dumps(config, indent=2) + "\n")
    return config_path


def write_decision(model: Path, decision: DecisionConfig) -> Path:
    return write_section(model, "decision", decision)


def run(args: argparse.Namespace) -> Path:
    from assistant.defaults import resolve_model
    from assistant.engine import LocalEngine
    from assistant.options import run_settings
    from data.folder import load_folder

    model = resolve_model(args.model)
    categories = args.categories.split(",") if args.categories else ()
    images = load_folder(args.data, args.layout, args.split, categories)
    engine = LocalEngine.from_pretrained(model, device=args.device, settings=run_settings(args))
    anomalous = sum(item.anomalous for item in images)
    fitted_on = f"{Path(args.data).name} [{args.split}], {len(images)} images ({anomalous} anomalous)"
    if args.shots:
        references = normal_references(args.data, args.layout, images, args.shots, args.seed)
        fitted = fit_reference(engine, images, references, f"{fitted_on}, {args.shots} train normal(s) each")
        if args.write:
            print(f"wrote the few-shot evidence (weight, shift) to {write_section(model, 'reference', fitted)}")
        return model / "config.json"
    decision = fit_decision(engine, images, fitted_on, args.expert_only)
    if args.write:
        print(f"wrote the decision (expert_weight, llm_weight, bias) to {write_decision(model, decision)}")
    return model / "config.json"


def normal_references(data: str, layout: str, images: list, shots: int, seed: int) -> dict[str, tuple[Path, ...]]:
    """`shots` normal train images per category of `images`, drawn as `eval zeroshot --shots` draws them."""
    from data.folder import load_folder

    from .datasets import draw_references

    categories = sorted({i.category for i in images})
    normals: dict[str, list[Path]] = {c: [] for c in categories}
    for item in load_folder(data, layout, "train", categories):
        if not item.anomalous:
            normals[item.category].append(item.image)
    return {c: draw_references(c, normals[c], shots, seed) for c in categories}
