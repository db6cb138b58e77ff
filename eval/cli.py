"""`anomaly-assistant eval mmad|visa-dr|zeroshot`: registers the evaluation commands with the main CLI.

Only argument definitions live here; each benchmark module is imported when its command runs, so `--help`
loads no benchmark code. Data and endpoint problems end the command with a one-line reason (exit code 2).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from assistant.cli import add_model_arguments

from .backends import add_backend_arguments, at_least

ANSWER_MODES = ("chat", "verdict")  # how `eval visa-dr` and lmms-eval's anomaly_assistant answer
OFFICIAL_MMAD_SIDE = 512  # the official MMAD scripts fit every image into 512x512
COUNT, POSITIVE = at_least(0), at_least(1)


def _output(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--output", help=f"folder for answers.jsonl, report.md and chart.png; re-run to resume (default: {default})"
    )


def add_mmad_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="the official mmad.json")
    parser.add_argument("--images", help="image root the mmad.json paths are relative to (default: the JSON's folder)")
    parser.add_argument(
        "--shots", type=COUNT, default=1, help="normal template images before the query (official default: 1)"
    )
    parser.add_argument(
        "--similar-templates", action="store_true", help="take similar_templates instead of random_templates"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the option shuffling")
    parser.add_argument("--no-shuffle", action="store_true", help="show the options in mmad.json order")
    parser.add_argument(
        "--max-side",
        type=COUNT,
        default=OFFICIAL_MMAD_SIDE,
        help="fit images into this square and JPEG them as the official scripts do; 0 = original pixels",
    )
    parser.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="official LLaVA script: 64")
    parser.add_argument(
        "--letter-probs", action="store_true", help="also score by option-letter likelihood (needs logits or logprobs)"
    )
    parser.add_argument("--limit", type=POSITIVE, help="only the first N images of mmad.json")
    _output(parser, "eval-results/mmad-<model>-<k>shot")
    add_backend_arguments(parser)


def add_visa_dr_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detection", help="test_data.json (items: image, anomaly)")
    parser.add_argument("--reasoning", help="visa_dr.json (items: image, questions, answers)")
    parser.add_argument(
        "--images", help="root the image paths are relative to (default: the parent of the JSON's folder)"
    )
    parser.add_argument("--max-new-tokens", type=POSITIVE, default=4096, help="official scripts: 4096")
    parser.add_argument(
        "--yes-probability", action="store_true", help="also log P(Yes) for image AUROC (needs logits or logprobs)"
    )
    parser.add_argument(
        "--answer",
        choices=ANSWER_MODES,
        default=None,
        help="verdict: our model's one decision (answers open with the Verdict's Yes/No; AUROC from its score; "
        "needs the in-process model or our server); chat: plain chat answers, as any endpoint gives "
        "(default: verdict in-process, chat with --endpoint)"
    )
    parser.add_argument("--limit", type=POSITIVE, help="only the first N items of each file")
    judge = parser.add_argument_group("LLM judge for the reasoning answers (any OpenAI-compatible endpoint)")
    judge.add_argument("--judge-endpoint", metavar="URL")
    judge.add_argument("--judge-model", metavar="NAME")
    judge.add_argument("--judge-api-key", default=None)
    _output(parser, "eval-results/visa-dr-<model>")
    add_backend_arguments(parser)


def add_zeroshot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="MVTec AD layout root, or a VisA root with split_csv/1cls.csv")
    parser.add_argument("--categories", help="comma-separated subset of categories")
    parser.add_argument(
        "--scorers",
        default="expert",
        help="comma-separated: expert (our expert's score), decision (the Verdict's fused score), "
        "clip (assistant.clip.expert)",
    )
    parser.add_argument("--clip-model", help="ClipAnomalyExpert.from_spec spec, required with the clip scorer")
    parser.add_argument(
        "--shots", type=COUNT, default=0, help="normal training images given to the scorer as references"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for picking the reference images")
    parser.add_argument(
        "--profile-from",
        choices=("train",),
        help="enrol each category's normal training images as a profile (in the output folder) and score against "
        "it (our model's scorers, in-process)",
    )
    parser.add_argument(
        "--pixel-size", type=COUNT, default=256, help="long side of masks/maps for pixel metrics; 0 = mask resolution"
    )
    parser.add_argument("--limit", type=POSITIVE, help="only N test images per category (spread over the sorted list)")
    parser.add_argument(
        "--image-only", action="store_true", help="image-level metrics only, for test sets without pixel masks"
    )
    _output(parser, "eval-results/zeroshot-<data folder>")
    add_backend_arguments(parser)


BENCHMARKS = {
    "mmad": (
        "eval.mmad",
        add_mmad_arguments,
        "MMAD multiple choice: 7 subtasks, official-compatible and strict scores",
    ),
    "visa-dr": (
        "eval.visa_dr",
        add_visa_dr_arguments,
        "VisA-D&R: Yes/No detection and multi-turn reasoning (ROUGE-L, SBERT, LLM judge)",
    ),
    "zeroshot": (
        "eval.zeroshot",
        add_zeroshot_arguments,
        "zero-shot expert metrics on MVTec/VisA folders: image/pixel AUROC, AUPRO, F1-max",
    ),
}


def _handler(module_name: str) -> Callable[[argparse.Namespace], None]:
    def handle(args: argparse.Namespace) -> None:
        report = importlib.import_module(module_name).run(args)
        print(report.read_text(encoding="utf-8"))
        print(f"report: {report}")

    return handle


def _calibrate(args: argparse.Namespace) -> None:
    importlib.import_module("eval.calibrate").run(args)


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="a labelled MVTec/VisA-layout folder (a validation split)")
    parser.add_argument("--layout", choices=("mvtec", "visa"), default="mvtec")
    parser.add_argument(
        "--split",
        choices=("train", "val", "test", "all"),
        default="val",
        help="which split to fit on (default val: a validation split no training step read; never the test split "
        "you report on)",
    )
    parser.add_argument("--categories", help="comma-separated subset of categories")
    parser.add_argument(
        "--expert-only", action="store_true", help="fit the expert's logit alone (llm_weight 0): Platt scaling"
    )
    parser.add_argument(
        "--shots",
        type=COUNT,
        default=0,
        help="fit the few-shot evidence (`reference.weight`, `reference.shift`) with this many normal train images "
        "per item as references, instead of the decision",
    )
    parser.add_argument("--seed", type=int, default=0, help="draws the references (with --shots)")
    parser.add_argument(
        "--write", action="store_true", help="store the fit in the model's config.json (`decision` or `reference`)"
    )
    add_model_arguments(parser)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="benchmarks: MMAD, VisA-D&R, zero-shot expert metrics; calibration")
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    for name, (module_name, add_arguments, help_text) in BENCHMARKS.items():
        sub = benchmarks.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(handler=_handler(module_name))
    text = "fit the decision (expert logit + LLM P(Yes) -> calibrated score) on labelled images; --write stores it"
    calibrate = benchmarks.add_parser("calibrate", help=text, description=text)
    add_calibrate_arguments(calibrate)
    calibrate.set_defaults(handler=_calibrate)
