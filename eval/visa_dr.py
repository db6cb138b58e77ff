"""`anomaly-assistant eval visa-dr`: VisA-D&R detection (Yes/No) and multi-turn reasoning, logged and scored.

    anomaly-assistant eval visa-dr --detection data/VisA/test_data.json --reasoning data/VisA/visa_dr.json
    anomaly-assistant eval visa-dr --reasoning data/VisA/visa_dr.json --judge-endpoint URL --judge-model NAME

Detection asks the official fixed Yes/No question; with `--yes-probability` the P(Yes) of the first answer token
is logged too, which gives an image AUROC (a text Yes/No cannot rank images). Reasoning asks every question of an
item in order, the earlier questions and answers kept as history, as the official script does.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image

from assistant.cli import check_backend
from assistant.engine import Conversation, Engine, agreeing_answers
from assistant.image_io import load_image
from assistant.prompts import DETECTION_QUESTION, NO, YES
from data.errors import DataError
from data.files import check_files_exist

from .backends import batch_size, model_label, model_slug, open_engine
from .published import BENCHMARK_CATEGORIES, VISA_DR, VISA_DR_COLUMNS
from .records import AnswerLog, R, check_settings
from .report import CHART_FILE, bar_chart, domain_line, fmt, markdown_table, write_report
from .runner import run_pending
from .text_metrics import JUDGE_PROMPT, judge_prompt, judge_score
from .visa_dr_data import SKIPPED_IN_REASONING, DetectionItem, Item, ReasoningItem, category, load_items, visa_dr_view
from .visa_dr_scoring import (
    DETECTION_METRICS,
    DetectionAnswer,
    JudgeAnswer,
    ReasoningAnswer,
    detection_metrics,
    reasoning_metrics,
    reasoning_pairs,
)


def _images(root: Path) -> Callable[[str], Image.Image]:
    return lambda path: visa_dr_view(load_image(root / path, path))


def _detect(
    args: argparse.Namespace, engine: Callable[[], Engine], root: Path
) -> Callable[[list[DetectionItem]], list[DetectionAnswer]]:
    view = _images(root)

    def process(batch: list[DetectionItem]) -> list[DetectionAnswer]:
        conversations = [Conversation.start(view(item.image), DETECTION_QUESTION) for item in batch]
        if args.answer == "verdict":  # one decision: the answer opens with the Verdict's Yes/No
            verdicts = [engine().analyze(c.image) for c in conversations]
            decisions = [v.anomalous for v in verdicts]
            responses = agreeing_answers(engine(), conversations, decisions, args.max_new_tokens)
            extra = [{"p_yes": v.llm_yes_probability, "score": v.score, "in_domain": v.in_domain} for v in verdicts]
        else:
            responses = engine().complete(conversations, args.max_new_tokens)
            p_yes = (
                [row[YES] for row in engine().choice_probabilities(conversations, [YES, NO])]
                if args.yes_probability
                else [None] * len(batch)
            )
            extra = [{"p_yes": p} for p in p_yes]
        return [
            DetectionAnswer(
                id=item.id, image=item.image, category=category(item.image), anomaly=item.anomaly, response=r, **x
            )
            for item, r, x in zip(batch, responses, extra, strict=True)
        ]

    return process


def _reason(
    args: argparse.Namespace, engine: Callable[[], Engine], root: Path
) -> Callable[[list[ReasoningItem]], list[ReasoningAnswer]]:
    """All questions of each item in order, with the history; turn t of the whole batch is one engine call."""
    view = _images(root)

    def process(batch: list[ReasoningItem]) -> list[ReasoningAnswer]:
        conversations = [Conversation.start(view(item.image), item.questions[0]) for item in batch]
        decided = [engine().analyze(c.image).anomalous for c in conversations] if args.answer == "verdict" else None
        for turn in range(max(len(item.questions) for item in batch)):
            active = [i for i, item in enumerate(batch) if turn < len(item.questions)]
            if turn:
                for i in active:
                    conversations[i].ask(batch[i].questions[turn])
            asked = [conversations[i] for i in active]
            if decided is None:
                responses = engine().complete(asked, args.max_new_tokens)
            else:  # no answer contradicts the image's one decision
                responses = agreeing_answers(engine(), asked, [decided[i] for i in active], args.max_new_tokens)
            for i, response in zip(active, responses, strict=True):
                conversations[i].answer(response)
        return [
            ReasoningAnswer(
                id=item.id,
                image=item.image,
                category=category(item.image),
                questions=item.questions,
                references=item.answers,
                responses=[m["content"] for m in conversation.messages if m["role"] == "assistant"],
            )
            for item, conversation in zip(batch, conversations, strict=True)
        ]

    return process


# -- metrics --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JudgeItem:
    id: str
    prompt: str


def _judge(args: argparse.Namespace, records: Sequence[ReasoningAnswer], log: AnswerLog[JudgeAnswer]) -> None:
    from assistant.client import EndpointEngine

    judge = EndpointEngine(
        args.judge_endpoint,
        args.judge_model,
        api_key=args.judge_api_key,
        concurrency=args.concurrency,
        timeout=args.timeout,
    )

    def process(batch: list[JudgeItem]) -> list[JudgeAnswer]:
        replies = judge.complete([Conversation.start(None, item.prompt) for item in batch], max_new_tokens=64)
        return [
            JudgeAnswer(id=item.id, prompt=item.prompt, reply=reply, score=judge_score(reply))
            for item, reply in zip(batch, replies, strict=True)
        ]

    items = [
        JudgeItem(key, judge_prompt(question, reference, response))
        for key, _, question, reference, response in reasoning_pairs(records)
    ]
    run_pending(items, log.load(), process, log, args.concurrency, "judge")


def _root(args: argparse.Namespace, data_file: str) -> Path:
    """--images, else the official layout's data root: DATA/VisA/test_data.json with images DATA/VisA/<class>/..."""
    return Path(args.images) if args.images else Path(data_file).resolve().parent.parent


def run(args: argparse.Namespace) -> Path:
    check_backend(args)
    args.answer = args.answer or ("chat" if args.endpoint else "verdict")
    if not (args.detection or args.reasoning):
        raise DataError("give --detection test_data.json and/or --reasoning visa_dr.json")
    if bool(args.judge_endpoint) != bool(args.judge_model):
        raise DataError("the LLM judge needs both --judge-endpoint URL and --judge-model NAME")
    detection_items = load_items(args.detection, DetectionItem, args.limit) if args.detection else []
    reasoning_items = load_items(args.reasoning, ReasoningItem, args.limit) if args.reasoning else []
    kept = [item for item in reasoning_items if not any(name in item.image for name in SKIPPED_IN_REASONING)]
    label = model_label(args)
    output = Path(args.output or f"eval-results/visa-dr-{model_slug(args)}")
    settings = {"benchmark": "visa-dr", "model": label, "max_new_tokens": args.max_new_tokens}
    if args.answer == "verdict":
        settings["answer"] = "verdict"  # an older run's records were plain chat: not mixed in
    settings |= {
        name: str(Path(path).resolve())
        for name, path in (("detection", args.detection), ("reasoning", args.reasoning))
        if path
    }
    if args.judge_model:
        settings["judge"] = f"{args.judge_model} @ {args.judge_endpoint}"
    check_settings(output, settings)
    engine = cache(lambda: open_engine(args))  # loaded only if something is left to answer
    detections: list[DetectionAnswer] = []
    reasonings: list[ReasoningAnswer] = []
    if detection_items:
        root = _root(args, args.detection)
        log = AnswerLog(output / "answers-detection.jsonl", DetectionAnswer)
        with_probability = lambda record: record.ranking is not None or not args.yes_probability  # noqa: E731
        detections = _run_part(
            args, detection_items, log, root, _detect(args, engine, root), "detection", with_probability
        )
    if kept:
        root = _root(args, args.reasoning)
        log = AnswerLog(output / "answers-reasoning.jsonl", ReasoningAnswer)
        reasonings = _run_part(args, kept, log, root, _reason(args, engine, root), "reasoning")
    judge_log = AnswerLog(output / "judge.jsonl", JudgeAnswer)
    if args.judge_endpoint:
        _judge(args, reasonings, judge_log)
    return write_visa_dr_report(
        output, label, detections, reasonings, judge_log.load(), len(reasoning_items) - len(kept)
    )


def _run_part(
    args: argparse.Namespace,
    items: list[Item],
    log: AnswerLog[R],
    root: Path,
    process: Callable[[list[Item]], list[R]],
    desc: str,
    complete: Callable[[R], bool] = lambda record: True,
) -> list[R]:
    """Answer the items of one file that have no complete record; returns the records in file order."""
    finished = {key for key, record in log.load().items() if complete(record)}
    pending = [item.image for item in items if item.id not in finished]
    check_files_exist(root, pending, "VisA-D&R images", " (is --images the folder the JSON's image paths start from?)")
    run_pending(items, finished, process, log, batch_size(args), desc)
    records = log.load()
    return [records[item.id] for item in items if item.id in records]


def write_visa_dr_report(
    output: Path,
    label: str,
    detections: Sequence[DetectionAnswer],
    reasonings: Sequence[ReasoningAnswer],
    judged: dict[str, JudgeAnswer],
    skipped: int,
) -> Path:
    sections = ["# VisA-D&R", f"Model: `{label}`, greedy decoding."]
    detection = detection_metrics(detections)
    reasoning = reasoning_metrics(reasonings, judged)
    classes = {answer.category for answer in (*detections, *reasonings)}
    comparable = VISA_DR if classes <= BENCHMARK_CATEGORIES["visa"] else []  # the same VisA classes, else no rows
    series: dict[str, list[float | None]] = {}
    if detection:
        macro = detection["Macro"]
        published = [
            [f"{p.model} (published)", *(fmt(p.values[m]) for m in DETECTION_METRICS), "-"] for p in comparable
        ]
        ours = [label, *(fmt(macro[m]) for m in DETECTION_METRICS), fmt(macro["AUROC"])]
        sections += [
            "## Detection (macro over classes)",
            markdown_table(["Model", *DETECTION_METRICS, "AUROC"], [ours, *published]),
            "Prediction = 'Yes'/'yes' anywhere in the answer (official rule); AUROC from the Verdict's score with "
            "--answer verdict, else from P(Yes) of the first token (only with --yes-probability); '-' if a class "
            "has one label only.",
            domain_line([r.in_domain for r in detections]),
            "## Detection per class",
            markdown_table(
                ["Class", "N", *DETECTION_METRICS, "AUROC"],
                [
                    [name, str(row["N"]), *(fmt(row[m]) for m in (*DETECTION_METRICS, "AUROC"))]
                    for name, row in detection.items()
                ],
            ),
        ]
        series["ours"] = [macro[m] for m in DETECTION_METRICS]
        series |= {p.model: [p.values[m] for m in DETECTION_METRICS] for p in comparable}
    if reasonings:
        answers = sum(len(r.responses) for r in reasonings)
        sections += [
            f"## Reasoning ({len(reasonings)} images, {answers} answers; pcb2/pcb4 skipped as officially: {skipped})"
        ]
    if reasoning:
        sections += [
            markdown_table(
                ["Questions", "N", "ROUGE-L", "SBERT", "Judge (0-10)"],
                [
                    [name, str(row["N"]), fmt(row["ROUGE-L"]), fmt(row["SBERT"]), fmt(row["Judge"])]
                    for name, row in reasoning.items()
                ],
            ),
            "ROUGE-L: F-measure (rouge-score, stemming); SBERT: cosine of all-MiniLM-L6-v2 embeddings (offline).",
        ]
        if comparable:
            sections += [
                "Published (Anomaly-OV paper, Table 4; low-level (LL) and complex (CX) questions, GPT-4 as judge; "
                "ours are over all questions with our judge prompt, so compare with care):",
                markdown_table(
                    ["Model", *VISA_DR_COLUMNS[4:]],
                    [[p.model, *(fmt(p.values[c]) for c in VISA_DR_COLUMNS[4:])] for p in comparable],
                ),
            ]
        if judged:
            sections += ["Judge prompt:", "```\n" + JUDGE_PROMPT + "\n```"]
    elif reasonings:
        sections += ["The reasoning file has no reference `answers`: responses are logged, not scored."]
    if series:
        bar_chart(output / CHART_FILE, DETECTION_METRICS, series, "VisA-D&R detection (macro over classes)", "score")
    return write_report(output, sections)
