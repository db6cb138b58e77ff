"""The last steps of the demo recipe: domain statistics, held-out measurements, examples and the model card.

Everything here reads the packaged model the way a user's command would (`LocalEngine.from_pretrained`) and
measures on the held-out test split, which no training or fitting step read (the decision and the domain
threshold are fitted on the validation split). The numbers go into the model card with the commands that
reproduce each of them, so `anomaly-assistant info` and the app say what the model is and how well it did.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from assistant.card import Example, Metric, ModelCard
from assistant.domain import fit_domain
from assistant.engine import LocalEngine
from assistant.image_io import load_image
from data.folder import LabelledImage, load_folder
from data.textile import CATEGORY

from .expert import domain_sample

EXAMPLES_DIR = "examples"


def other_photos() -> list[Image.Image]:
    """Colour photos of things that are not textiles (scikit-image's sample images), each whole and as its four
    quadrants: 45 images no demo training step has seen the like of."""
    from skimage import data

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
             "colorwheel", "logo")
    photos = []
    for name in names:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        width, height = image.size
        photos.append(image)
        photos += [
            image.crop((x, y, x + width // 2, y + height // 2)) for x in (0, width // 2) for y in (0, height // 2)
        ]
    return photos


def fit_demo_domain(model: Path, data_root: Path, seed: int) -> None:
    """Domain statistics from the train split's images, the threshold from the validation split."""
    engine = LocalEngine.from_pretrained(model, device="cpu")
    train = [item.image for item in load_folder(data_root, "mvtec", "train", [CATEGORY])]
    fit = domain_sample(train, seed)
    validation = [item.image for item in load_folder(data_root, "mvtec", "val", [CATEGORY])]
    domain = fit_domain(engine, fit, validation, source=f"textile train split ({len(fit)} images), threshold on val")
    domain.save(model)


@dataclass
class HeldOut:
    """The shipped model's verdicts on the test split, in the split's order."""

    items: list[LabelledImage]
    scores: np.ndarray  # the decision's calibrated score
    expert_scores: np.ndarray
    anomalous: np.ndarray  # the decision
    in_domain: np.ndarray

    def describe(self) -> str:
        count = {d: sum(item.defect == d for item in self.items) for d in (None, "local defect", "global defect")}
        return (
            f"textile test split ({len(self.items)} held-out images: {count[None]} normal, {count['local defect']} "
            f"local, {count['global defect']} global defects)"
        )

    @property
    def labels(self) -> np.ndarray:
        return np.array([item.anomalous for item in self.items])

    def auroc(self, scores: np.ndarray, defect: str | None = None) -> float:
        from sklearn.metrics import roc_auc_score

        keep = np.array([not item.anomalous or defect is None or item.defect == defect for item in self.items])
        return float(roc_auc_score(self.labels[keep], scores[keep]))


def held_out_verdicts(engine: LocalEngine, data_root: Path) -> HeldOut:
    from tqdm.auto import tqdm

    items = load_folder(data_root, "mvtec", "test", [CATEGORY])
    verdicts = [engine.analyze(load_image(item.image)) for item in tqdm(items, desc="held-out verdicts")]
    return HeldOut(
        items,
        np.array([v.score for v in verdicts]),
        np.array([v.expert_score for v in verdicts]),
        np.array([v.anomalous for v in verdicts]),
        np.array([bool(v.in_domain) for v in verdicts]),
    )


def mmad_letters(model: Path, benchmark: Path, output: Path) -> tuple[float, float, int]:
    """(share of answers holding a valid option letter, accuracy, questions) of `eval mmad` (1-shot, the official
    setting) on the benchmark file."""
    from assistant.cli import main
    from eval.mmad import ANSWERS_FILE, MMADAnswer
    from eval.mmad_scoring import strict_letter

    if main(["eval", "mmad", "--data", str(benchmark), "--shots", "1", "--model", str(model), "--output",
             str(output), "--device", "cpu"]) != 0:
        raise RuntimeError(f"eval mmad on {benchmark} failed")
    lines = (output / ANSWERS_FILE).read_text(encoding="utf-8").splitlines()
    records = [MMADAnswer.model_validate_json(line) for line in lines if line.strip()]
    letters = [strict_letter(r.response, r.options) for r in records]
    valid = float(np.mean([letter is not None for letter in letters]))
    return valid, float(np.mean([letter == r.answer for letter, r in zip(letters, records)])), len(records)


def choose_examples(held_out: HeldOut) -> dict[str, Path]:
    """The first held-out image of each class that the shipped model gets right, and a normal reference."""
    chosen: dict[str, Path] = {}
    for item, decided in zip(held_out.items, held_out.anomalous):
        label = item.defect or "normal"
        if label not in chosen and decided == item.anomalous:
            chosen[label] = Path(item.image)
        elif label == "normal" and "reference" not in chosen and "normal" in chosen and not decided:
            chosen["reference"] = Path(item.image)
    return chosen


def write_card(
    model: Path, data_root: Path, output: Path, mmad_benchmark: Path, commands: dict[str, str], seed: int
) -> ModelCard:
    """Measure the packaged model on the held-out split, copy its examples in and write its model card."""
    from eval.calibrate import expected_calibration_error

    engine = LocalEngine.from_pretrained(model, device="cpu")
    held_out = held_out_verdicts(engine, data_root)
    held = held_out.describe()
    labels = held_out.labels
    true_positive = float(np.sum(held_out.anomalous & labels))
    f1 = 2 * true_positive / (np.sum(held_out.anomalous) + np.sum(labels))
    photos = other_photos()
    outside = np.mean([engine.in_domain(photo) is False for photo in photos])
    letter_rate, mmad_accuracy, questions = mmad_letters(model, mmad_benchmark, output / "eval-mmad")
    mmad_split = f"{questions} MMAD-format questions on held-out textiles (1-shot)"
    verdicts, mmad = commands["verdicts"], commands["mmad"]
    metrics = [
        Metric(name="image AUROC of the score, all defects", value=held_out.auroc(held_out.scores), split=held,
               command=verdicts),
        Metric(name="image AUROC of the score, local defects", value=held_out.auroc(held_out.scores, "local defect"),
               split=held, command=verdicts),
        Metric(name="image AUROC of the score, global defects",
               value=held_out.auroc(held_out.scores, "global defect"), split=held, command=verdicts),
        Metric(name="image AUROC of the expert alone", value=held_out.auroc(held_out.expert_scores), split=held,
               command=commands["expert"]),
        Metric(name="decision accuracy", value=float(np.mean(held_out.anomalous == labels)), split=held,
               command=verdicts),
        Metric(name="decision F1", value=float(f1), split=held, command=verdicts),
        Metric(name="score ECE (10 bins)", value=expected_calibration_error(labels, held_out.scores), split=held,
               command=commands["calibration"]),
        Metric(name="in-domain rate", value=float(np.mean(held_out.in_domain)), split=held, command=verdicts),
        Metric(name="out-of-domain rate", value=float(outside),
               split=f"{len(photos)} colour photos of other things (scikit-image samples and their quadrants)",
               command=commands["domain"]),
        Metric(name="MMAD-format answers with a valid letter", value=letter_rate,
               split=mmad_split, command=mmad),
        Metric(name="MMAD-format accuracy", value=mmad_accuracy, split=mmad_split, command=mmad),
    ]
    counts = {split: len(load_folder(data_root, "mvtec", split, [CATEGORY])) for split in ("train", "val", "test")}
    examples_dir = model / EXAMPLES_DIR
    shutil.rmtree(examples_dir, ignore_errors=True)
    examples_dir.mkdir()
    chosen = choose_examples(held_out)
    for label, path in chosen.items():
        shutil.copyfile(path, examples_dir / f"{label.replace(' ', '_')}{path.suffix}")
    shipped = {label: f"{EXAMPLES_DIR}/{label.replace(' ', '_')}{path.suffix}" for label, path in chosen.items()}
    card = ModelCard(
        name="demo textile inspector",
        summary=(
            "The bundled offline demo: a small SigLIP tower and Anomaly-OV expert trained from scratch, with a LoRA "
            "on SmolLM2-135M-Instruct, for simulated grayscale fabric images only."
        ),
        trained_on=(
            "the simulated textile images of the conformal-clip-data package, split per class with seed "
            f"{seed}: train {counts['train']} (stage 1, stage 2, domain statistics), val {counts['val']} (decision "
            f"calibration, domain threshold), test {counts['test']} held out (the metrics below)"
        ),
        image_kinds="grayscale 250 x 250 px simulated woven fabric (textile), nothing else",
        classes=["normal", "local defect (a small speck)", "global defect (the whole fabric)"],
        limits=(
            "knows nothing but this simulated fabric: photos of other objects are flagged out of domain and its "
            "verdict on them is meaningless; it names the defect type, not its place (the heatmap and boxes say "
            "where); small local specks are missed more often than global defects"
        ),
        metrics=metrics,
        examples=[
            Example(
                image=shipped[label], label=label, reference=None if label == "normal" else shipped.get("reference")
            )
            for label in ("normal", "local defect", "global defect")
            if label in shipped
        ],
    )
    card.save(model)
    (output / "card-metrics.json").write_text(json.dumps([m.model_dump() for m in metrics], indent=1) + "\n")
    return card


def print_metrics(metrics: Sequence[Metric]) -> None:
    for metric in metrics:
        print(f"{metric.name:45s} {metric.value:.3f}   [{metric.split}]")
