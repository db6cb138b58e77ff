"""`anomaly-assistant eval calibrate`: fit the Platt scaling that turns the expert's logit into the verdict's score.

The expert is trained with class-balanced BCE, so its sigmoid is not a probability under the class mix a user
meets. Logistic regression of the labels on the raw logits of a labelled folder (ideally a validation split the
expert did not train on) gives `score = sigmoid(scale * logit + shift)`; the fit, the expected calibration
error (ECE, 10 bins) and the Brier score before and after are reported, and `--write` stores scale and shift
in the model's `config.json` (`expert.score_scale`, `expert.score_shift`).

    anomaly-assistant eval calibrate --data runs/demo/data --split train --model assistant/weights/demo --write
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

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


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(scale, shift) of the logistic regression of labels on logits (practically unregularised)."""
    from sklearn.linear_model import LogisticRegression

    if len(set(labels.tolist())) < 2:
        raise UsageError("calibration needs both normal and anomalous images")
    regression = LogisticRegression(C=1e6).fit(logits[:, None], labels)
    return float(regression.coef_[0, 0]), float(regression.intercept_[0])


def expert_logits(model: Path, device: str | None, images: list, settings=None) -> np.ndarray:
    """Raw expert logits of labelled images, in order, with a progress bar."""
    from tqdm.auto import tqdm

    from assistant.engine import LocalEngine
    from assistant.image_io import load_image

    engine = LocalEngine.from_pretrained(model, device=device, settings=settings)
    logits = []
    for item in tqdm(images, desc="expert logits"):
        analysis = engine.encode([load_image(item.image)]).analysis
        logits.append(float(analysis.logits[0]))
    return np.array(logits)


def _summary(labels: np.ndarray, probabilities: np.ndarray) -> str:
    brier = float(np.mean((probabilities - labels) ** 2))
    return f"ECE {expected_calibration_error(labels, probabilities):.4f}  Brier {brier:.4f}"


def run(args: argparse.Namespace) -> Path:
    from scipy.special import expit

    from assistant.defaults import resolve_model
    from assistant.files import write_text_atomic
    from assistant.options import run_settings
    from data.folder import load_folder

    model = resolve_model(args.model)
    images = load_folder(args.data, args.layout, args.split, args.categories.split(",") if args.categories else ())
    labels = np.array([int(item.anomalous) for item in images])
    logits = expert_logits(model, args.device, images, run_settings(args))
    scale, shift = fit_platt(logits, labels)
    raw, calibrated = expit(logits), expit(scale * logits + shift)
    print(f"{len(images)} images ({labels.sum()} anomalous) from {args.data} [{args.split}]")
    print(f"raw sigmoid:  {_summary(labels, raw)}")
    print(f"calibrated:   {_summary(labels, calibrated)}   (scale {scale:.4f}, shift {shift:.4f})")
    config_path = model / "config.json"
    if args.write:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["expert"].update(score_scale=scale, score_shift=shift)
        write_text_atomic(config_path, json.dumps(config, indent=2) + "\n")
        print(f"wrote expert.score_scale/score_shift to {config_path}")
    return config_path
