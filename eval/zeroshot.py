"""`anomaly-assistant eval zeroshot`: image AUROC / F1-max, pixel AUROC / F1-max and AUPRO for each scorer.

    anomaly-assistant eval zeroshot --data mvtec_anomaly_detection --scorers expert,clip
    anomaly-assistant eval zeroshot --data VisA_20220922 --endpoint http://127.0.0.1:8000/v1 --served-model ours
    anomaly-assistant eval zeroshot --data runs/demo/data --scorers expert,decision --shots 4
    anomaly-assistant eval zeroshot --data runs/demo/data --scorers expert,decision --profile-from train

`--shots K` gives every test image K normal training images of its category as references; `--profile-from
train` enrols each category's normal training images as a profile (`assistant.profiles`, saved under the output
folder so a resumed run reuses it) and scores every test image against it.

Metrics are computed per category, then averaged over categories (the MVTec/VisA convention). For bounded
memory every map and mask is brought to the mask resolution shrunk to `--pixel-size` on the long side (map
bilinear, mask nearest) before the exact pixel metrics; each scored image is saved with its score (JSONL) and
its map + mask (.npz), so a stopped run resumes where it was.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from assistant.cli import check_backend
from assistant.errors import UsageError
from assistant.image_io import load_image
from data.folder import LabelledImage

from .ad_metrics import aupro, auroc, evaluation_size, f1_max, resample
from .backends import batch_size
from .datasets import Category, draw_references, load_categories, load_mask, sample_id
from .published import BENCHMARK_CATEGORIES, ZERO_SHOT_IMAGE_AUROC
from .records import AnswerLog, Record, check_settings
from .report import CHART_FILE, bar_chart, domain_line, fmt, markdown_table, write_report
from .runner import run_pending
from .scorers import MODEL_SCORERS, Scorer, build_scorer, check_scorer_arguments, score_image, scorer_names, scorer_spec

METRICS = ("I-AUROC", "I-F1max", "P-AUROC", "P-F1max", "AUPRO")
IMAGE_METRICS = METRICS[:2]


class ZeroShotAnswer(Record):
    scorer: str
    category: str
    image: str
    label: int
    score: float
    pixels: str  # .npz with the resampled map and mask, relative to the output folder ("" with --image-only)
    in_domain: bool | None = None  # `Verdict.in_domain` for our model's scorers; None: unknown or another scorer


@dataclass(frozen=True)
class ScoreItem:
    id: str
    sample: LabelledImage
    references: tuple[Path, ...]
    profile: str | None = None  # an enrolled profile's name (`--profile-from`)


def _spread(samples: list[LabelledImage], limit: int | None) -> list[LabelledImage]:
    """`limit` samples spread over the sorted list, so every defect type (and good) can appear."""
    if not limit or limit >= len(samples):
        return samples
    return samples[:: len(samples) // limit][:limit]



def _score_batch(
    name: str, scorer: Callable[[], Scorer], output: Path, pixel_size: int, image_only: bool
) -> Callable[[list[ScoreItem]], list[ZeroShotAnswer]]:
    def process(batch: list[ScoreItem]) -> list[ZeroShotAnswer]:
        records = []
        for item in batch:
            image = load_image(item.sample.image)
            references = [load_image(path) for path in item.references]
            if hasattr(scorer(), "object_name"):  # prompt-based scorers (WinCLIP) name the object in their prompts
                scorer().object_name = item.sample.category
            score, anomaly_map, in_domain = score_image(scorer(), image, references, item.profile)
            anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
            if anomaly_map.shape != (image.height, image.width) or not np.isfinite(anomaly_map).all():
                raise UsageError(
                    f"scorer {name} returned a {anomaly_map.shape} map for {item.sample.image} "
                    f"({image.height}x{image.width}); it must be finite and HxW at the image's resolution"
                )
            pixels = ""  # --image-only: no mask is read, no map kept
            if not image_only:
                mask = load_mask(item.sample, (image.height, image.width))
                pixels_map, pixels_mask = resample(anomaly_map, mask, evaluation_size(*mask.shape, pixel_size))
                relative = Path("pixels") / name / f"{sample_id(item.sample)}.npz"
                (output / relative).parent.mkdir(parents=True, exist_ok=True)
                np.savez(output / relative, map=pixels_map, mask=pixels_mask)
                pixels = str(relative)
            records.append(
                ZeroShotAnswer(
                    id=item.id,
                    scorer=name,
                    category=item.sample.category,
                    image=str(item.sample.image),
                    label=int(item.sample.anomalous),
                    score=float(score),
                    pixels=pixels,
                    in_domain=in_domain,
                )
            )
        return records

    return process


def category_metrics(records: list[ZeroShotAnswer], output: Path) -> dict[str, float | None]:
    """The five metrics of one scorer on one category (None where undefined)."""
    if not records:
        return dict.fromkeys(METRICS)
    labels = np.array([r.label for r in records])
    scores = np.array([r.score for r in records])
    image_level = {"I-AUROC": auroc(labels, scores), "I-F1max": f1_max(labels, scores)}
    if any(not r.pixels for r in records):  # --image-only: no masks were read
        return image_level | dict.fromkeys(METRICS[2:])
    pixels = [np.load(output / r.pixels) for r in records]
    maps, masks = [p["map"] for p in pixels], [p["mask"] for p in pixels]
    flat_maps, flat_masks = np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
    return image_level | {
        "P-AUROC": auroc(flat_masks, flat_maps),
        "P-F1max": f1_max(flat_masks, flat_maps),
        "AUPRO": aupro(masks, maps),
    }


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _macro(per_category: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Mean over the categories where each metric is defined."""
    means = {}
    for metric in METRICS:
        defined = [row[metric] for row in per_category.values() if row[metric] is not None]
        means[metric] = float(np.mean(defined)) if defined else None
    return means


def _undefined(results: dict[str, dict[str, dict[str, float | None]]], metrics: tuple[str, ...]) -> list[str]:
    """'category: metrics (scorers)' for every metric left out of a mean, grouped so the note stays short."""
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for scorer, per_category in results.items():
        for category, row in per_category.items():
            missing = tuple(m for m in metrics if row[m] is None)
            if missing:
                groups.setdefault((category, missing), []).append(scorer)
    return [
        f"{category}: {', '.join(missing)} ({', '.join(scorers)})" for (category, missing), scorers in groups.items()
    ]


def run(args: argparse.Namespace) -> Path:
    check_backend(args)
    names = scorer_names(args.scorers)
    check_scorer_arguments(names, args)
    categories_wanted = args.categories.split(",") if args.categories else None
    layout, categories = load_categories(args.data, categories_wanted, require_masks=not args.image_only)
    data = str(Path(args.data).resolve())
    output = Path(args.output or f"eval-results/zeroshot-{Path(data).name}")
    settings = {
        "benchmark": "zeroshot",
        "data": data,
        "pixel_size": args.pixel_size,
        "shots": args.shots,
        "seed": args.seed,
        "profile_from": args.profile_from,
        "image_only": args.image_only,
    }
    check_settings(output, settings | {f"scorer.{name}": scorer_spec(name, args) for name in names})
    log = AnswerLog(output / "answers.jsonl", ZeroShotAnswer)
    if args.profile_from and (args.shots or set(names) - set(MODEL_SCORERS) or args.endpoint):
        raise UsageError("--profile-from: our model's scorers in-process only (expert, decision), without --shots")
    references = {c.name: draw_references(c.name, c.normal_train, args.shots, args.seed) for c in categories}
    samples = [sample for category in categories for sample in _spread(category.test, args.limit)]
    results, in_domain = {}, {}
    for name in names:
        profile = (lambda s: s.category) if args.profile_from else (lambda s: None)
        items = [ScoreItem(f"{name}/{sample_id(s)}", s, references[s.category], profile(s)) for s in samples]
        scorer = cache(lambda name=name: _with_profiles(build_scorer(name, args), categories, output, args))
        run_pending(
            items,
            log.load(),
            _score_batch(name, scorer, output, args.pixel_size, args.image_only),
            log,
            batch_size(args),
            f"zero-shot {name}",
        )
        records = log.load()
        if name in MODEL_SCORERS:  # one model: its expert and decision rows share the domain check
            in_domain |= {records[i.id].image: records[i.id].in_domain for i in items}
        results[name] = {
            c.name: category_metrics([records[i.id] for i in items if i.sample.category == c.name], output)
            for c in categories
        }
    return write_zeroshot_report(output, layout, results, settings, list(in_domain.values()) or None)


def _with_profiles(scorer: Scorer, categories: list[Category], output: Path, args: argparse.Namespace) -> Scorer:
    """With `--profile-from train`, every category's profile (enrolled once, kept in `output/profiles/`) made
    available to the scorer's engine by the category's name."""
    if not args.profile_from:
        return scorer
    from assistant.profiles import PROFILE_FILE, PROFILES_DIR, Profile, ProfileError, enroll, image_side_fingerprint

    engine = scorer.engine
    fingerprint = image_side_fingerprint(engine.model)
    for category in categories:
        try:
            profile = Profile.load(output, category.name, fingerprint, engine.model.config.vision_config.hidden_size)
        except ProfileError:
            if (output / PROFILES_DIR / category.name / PROFILE_FILE).is_file():  # damaged or made otherwise
                raise
            profile = enroll(engine, category.name, category.normal_train, source=f"{category.name} normal train")
            profile.save(output)
        engine.use_profile(profile)
    return scorer


def results_categories(results: dict[str, dict[str, dict[str, float | None]]]) -> list[str]:
    return [category for per_category in results.values() for category in per_category]


def write_zeroshot_report(
    output: Path,
    layout: str,
    results: dict[str, dict[str, dict[str, float | None]]],
    settings: dict,
    in_domain: list[bool | None] | None = None,
) -> Path:
    """The report; `in_domain` (one flag per image scored by our model, None without such a scorer) adds the
    share of images outside the model's domain."""
    metrics = IMAGE_METRICS if settings.get("image_only") else METRICS
    macros = {name: _macro(per_category) for name, per_category in results.items()}
    rows = [[name, *(fmt(_percent(macro[m]), 1) for m in metrics)] for name, macro in macros.items()]
    sections = [
        "# Zero-shot anomaly detection",
        f"Data: `{settings['data']}` ({layout} layout), "
        + (
            "each category's normal training images enrolled as a profile. "
            if settings.get("profile_from")
            else f"{settings['shots']} reference image(s) per category. "
        )
        + "Metrics in %, per category then the mean over categories.",
        markdown_table(["Scorer", *metrics], rows),
        "Image-level metrics only (--image-only: the test set has no pixel masks)."
        if settings.get("image_only")
        else f"Pixel metrics at the mask resolution shrunk to {settings['pixel_size'] or 'full'} px on the long side "
        "(maps bilinear, masks nearest), exact (every score is a threshold). "
        "AUPRO integrates the per-region overlap up to "
        "FPR 0.3 and divides by 0.3. F1-max picks its threshold on the test data (optimistic).",
    ]
    if in_domain is not None:
        sections.append(domain_line(in_domain))
    undefined = _undefined(results, metrics)
    if undefined:
        sections.append("Undefined (one class only), left out of the means: " + "; ".join(undefined) + ".")
    published = [p for p in ZERO_SHOT_IMAGE_AUROC if layout in p.values]
    zero_shot = settings["shots"] == 0 and not settings.get("profile_from")
    if zero_shot and set(results_categories(results)) <= BENCHMARK_CATEGORIES[layout]:
        sections += [
            f"Published zero-shot image AUROC on the full {layout} test set ({ZERO_SHOT_IMAGE_AUROC[0].source}):",
            markdown_table(["Model", "I-AUROC"], [[p.model, fmt(p.values[layout], 1)] for p in published]),
        ]
    for name, per_category in results.items():
        sections += [
            f"## {name} per category",
            markdown_table(
                ["Category", *metrics],
                [[c, *(fmt(_percent(row[m]), 1) for m in metrics)] for c, row in per_category.items()],
            ),
        ]
    series = {name: [_percent(macro[m]) for m in metrics] for name, macro in macros.items()}
    bar_chart(output / CHART_FILE, metrics, series, f"Zero-shot metrics ({layout}, mean over categories)", "%")
    return write_report(output, sections)
