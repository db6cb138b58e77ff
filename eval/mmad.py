"""`anomaly-assistant eval mmad`: ask every MMAD question, log the answers, score them as the official summary does.

anomaly-assistant eval mmad --data dataset/MMAD/mmad.json --shots 1 --output runs/mmad-ours
anomaly-assistant eval mmad --data dataset/MMAD/mmad.json --endpoint http://127.0.0.1:8000/v1 --served-model ours
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import cache
from pathlib import Path

from PIL import Image

from assistant.cli import check_backend
from assistant.engine import REFERENCE_INTRO, Conversation, Engine
from assistant.image_io import load_image
from data.files import check_files_exist

from .backends import batch_size, model_label, model_slug, open_engine
from .mmad_data import MMADItem, load_mmad, mmad_view, prompt, question_items
from .mmad_scoring import (
    SUBTASKS,
    Graded,
    Summary,
    constrained_letter,
    grade,
    official_letter,
    strict_letter,
    summarize,
)
from .published import MMAD_1SHOT, MMAD_COLUMNS
from .records import AnswerLog, Record, check_settings
from .report import CHART_FILE, bar_chart, domain_line, fmt, markdown_table, write_report
from .runner import run_pending

ANSWERS_FILE = "answers.jsonl"


class MMADAnswer(Record):
    """One answered question: what was shown (options in shown order, their permutation) and what came back."""

    image: str
    index: int
    type: str
    question: str
    options: dict[str, str]
    permutation: list[str]  # original mmad.json letter shown at A, B, ...
    answer: str  # the correct letter as shown
    templates: list[str]
    response: str
    letter_probs: dict[str, float] | None = None
    in_domain: bool | None = None  # the query image against the model's domain (in-process model only)


def _answer_batch(
    args: argparse.Namespace, engine: Callable[[], Engine], root: Path
) -> Callable[[list[MMADItem]], list[MMADAnswer]]:
    def view(path: str, loaded: dict[str, Image.Image]) -> Image.Image:
        if path not in loaded:  # a template shared by the batch's questions is read once
            loaded[path] = mmad_view(load_image(root / path, path), args.max_side)
        return loaded[path]

    def process(batch: list[MMADItem]) -> list[MMADAnswer]:
        images: dict[str, Image.Image] = {}
        conversations = [
            Conversation.start(
                view(item.image, images),
                prompt(item.question.Question, item.options),
                [view(t, images) for t in item.templates],
            )
            for item in batch
        ]
        responses = engine().complete(conversations, args.max_new_tokens)
        check = getattr(engine(), "in_domain", None)  # an endpoint cannot check the domain
        domains = [check(c.image, c.references) if check else None for c in conversations]
        probabilities: list[dict[str, float] | None] = [None] * len(batch)
        if args.letter_probs:
            for letters in {tuple(item.options) for item in batch}:  # one call per option count
                chosen = [i for i, item in enumerate(batch) if tuple(item.options) == letters]
                rows = engine().choice_probabilities([conversations[i] for i in chosen], list(letters))
                for i, row in zip(chosen, rows, strict=True):
                    probabilities[i] = row
        return [
            MMADAnswer(
                id=item.id,
                image=item.image,
                index=item.index,
                type=item.question.type,
                question=item.question.Question,
                options=item.options,
                permutation=list(item.permutation),
                answer=item.answer,
                templates=list(item.templates),
                response=response,
                letter_probs=row,
                in_domain=domain,
            )
            for item, response, row, domain in zip(batch, responses, probabilities, domains, strict=True)
        ]

    return process


def run(args: argparse.Namespace) -> Path:
    """Answer what is not answered yet, then (re)write the report; returns the report's path."""
    check_backend(args)
    entries = load_mmad(args.data, args.limit)
    items = question_items(entries, args.shots, args.similar_templates, args.seed, not args.no_shuffle)
    root = Path(args.images) if args.images else Path(args.data).parent
    label = model_label(args)
    output = Path(args.output or f"eval-results/mmad-{model_slug(args)}-{args.shots}shot")
    settings = {
        "benchmark": "mmad",
        "data": str(Path(args.data).resolve()),
        "model": label,
        "shots": args.shots,
        "templates": "similar" if args.similar_templates else "random",
        "seed": args.seed,
        "shuffle": not args.no_shuffle,
        "max_side": args.max_side,
        "max_new_tokens": args.max_new_tokens,
    }
    check_settings(output, settings)
    log = AnswerLog(output / ANSWERS_FILE, MMADAnswer)
    finished = {key for key, record in log.load().items() if record.letter_probs is not None or not args.letter_probs}
    pending = [item for item in items if item.id not in finished]
    hint = " (is --images the folder mmad.json's paths start from?)"
    check_files_exist(root, [path for item in pending for path in (item.image, *item.templates)], "MMAD images", hint)
    engine = cache(lambda: open_engine(args))  # loaded only if something is left to answer
    run_pending(items, finished, _answer_batch(args, engine, root), log, batch_size(args), "MMAD")
    records = log.load()
    answered = [records[item.id] for item in items if item.id in records]  # data-file order
    return write_mmad_report(output, label, answered, settings)


def _graded(records: list[MMADAnswer], letter: Callable[[MMADAnswer], str | None]) -> list[Graded]:
    return [grade(r.image, r.type, r.answer, letter(r)) for r in records]


def summaries(records: list[MMADAnswer]) -> dict[str, Summary]:
    """official-compatible, strict and (when logged) letter-likelihood tables."""
    tables = {
        "official-compatible": summarize(
            _graded(records, lambda r: official_letter(r.response, r.options)), official=True
        ),
        "strict": summarize(_graded(records, lambda r: strict_letter(r.response, r.options)), official=False),
    }
    if records and all(r.letter_probs for r in records):
        tables["letter likelihood"] = summarize(
            _graded(records, lambda r: constrained_letter(r.letter_probs)), official=False
        )
    return tables


def _paper_row(summary: Summary) -> list[float | None]:
    average = summary.rows["Average"]
    return [average.get(name) for name, _ in SUBTASKS] + [average["Average"]]


def write_mmad_report(output: Path, label: str, records: list[MMADAnswer], settings: dict) -> Path:
    tables = summaries(records)
    official = tables["official-compatible"]
    unparseable = sum(strict_letter(r.response, r.options) is None for r in records)
    main_rows = [[f"{label} ({name})", *map(fmt, _paper_row(summary))] for name, summary in tables.items()]
    comparable = settings["shots"] == 1
    if comparable:
        main_rows += [[f"{p.model} (published)", *(fmt(p.values[c]) for c in MMAD_COLUMNS)] for p in MMAD_1SHOT]
    sections = [
        "# MMAD",
        f"Model: `{label}`. {len({r.image for r in records})} images, {len(records)} questions answered; "
        f"{settings['shots']}-shot ({settings['templates']} templates), options shuffled: {settings['shuffle']} "
        f"(seed {settings['seed']}), images fitted into {settings['max_side'] or 'original'} px, greedy decoding.",
        "## Accuracy per subtask (%), averaged over datasets",
        markdown_table(["Model", *MMAD_COLUMNS], main_rows),
        "Disc = Anomaly Discrimination (balanced accuracy), Cls/Loc/Desc/Anal = defect classification, localization, "
        "description, analysis; ObjCls/ObjAnal = object classification, analysis (Object Structure + Object Details).",
        f"official-compatible: parsed and scored exactly like jam-cc/MMAD's scripts ({official.dropped} answers "
        f"dropped as unparseable, {official.skipped} more skipped by the official list-removal quirk). strict: every "
        f"answer counts, {unparseable} unparseable answers scored wrong."
        + ("" if comparable else " Published numbers are 1-shot and are shown only for --shots 1.")
        + (" Published: " + "; ".join(sorted({p.source for p in MMAD_1SHOT})) + "." if comparable else ""),
        domain_line(list({r.image: r.in_domain for r in records}.values())),
    ]
    for name, summary in tables.items():
        short = dict(SUBTASKS)
        header = ["Dataset", *(short.get(c, c) for c in summary.columns)]
        sections += [
            f"## Per dataset ({name})",
            markdown_table(header, [[d, *(fmt(row[c]) for c in summary.columns)] for d, row in summary.rows.items()]),
        ]
    if records:
        example = records[0]
        intro = (
            f'With templates, the first turn starts with "{REFERENCE_INTRO.format(n=settings["shots"])}". '
            if settings["shots"]
            else ""
        )
        sections += [
            "## Prompt",
            f"{intro}The text after the images, for the first question:",
            "```\n" + prompt(example.question, example.options) + "```",
        ]
    series = {f"ours ({name})": _paper_row(summary) for name, summary in tables.items()}
    if comparable:
        series |= {p.model: [p.values[c] for c in MMAD_COLUMNS] for p in MMAD_1SHOT}
    bar_chart(output / CHART_FILE, MMAD_COLUMNS, series, "MMAD accuracy per subtask", "accuracy (%)")
    return write_report(output, sections)
