"""Labelled images -> MMAD-format multiple-choice questions: training conversations and a held-out benchmark file.

The question types that image labels alone support (no masks): "Anomaly Detection" (Yes/No), "Defect
Classification" (which defect type, or "No defect."; in the benchmark only anomalous images are asked, as in MMAD)
and "Object Classification" (the product against a few distractor objects). A question's options are stored
shuffled (seeded) under letters A, B, ...

Training records ask exactly what `anomaly-assistant eval mmad` asks: the same option shuffling and re-lettering
(`eval.mmad_data.question_items`), the same text (`eval.mmad_data.prompt`, the official LLaVA query) after the
images, the same opening words before them when there are normal templates (`Conversation.chat`'s
`REFERENCE_INTRO`), and the answer is the bare letter ("B"), as the official instruction asks ("Answer with the
option's letter from the given choices directly") and as both of our parsers read it.
`eval.mmad_data` is light (numpy, OpenCV, PIL, pydantic; no torch), so the prompt has one home and is imported.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from assistant.prompts import IMAGE_TOKEN, REFERENCE_INTRO
from eval.mmad_data import LETTERS, MMADEntry, MMADItem, MMADQuestion, prompt, question_items

from .errors import DataError
from .folder import LabelledImage

DETECTION = "Anomaly Detection"
CLASSIFICATION = "Defect Classification"
OBJECT = "Object Classification"
QUESTION_TYPES = (DETECTION, CLASSIFICATION, OBJECT)

QUESTIONS = {
    DETECTION: "Is there any defect in the object?",
    CLASSIFICATION: "What type of defect, if any, does the object have?",
    OBJECT: "What kind of product is in the image?",
}
YES_OPTION, NO_OPTION = "Yes.", "No."
NO_DEFECT = "No defect."
# Defect types in words (LabelledImage.defect) -> option text; others become "Cut wire." from "cut wire".
DEFECT_OPTIONS = {
    "local defect": "A small local speck.",
    "global defect": "A change of the texture over the whole surface.",
}
OBJECT_OPTIONS = {"textile": "Textile fabric."}  # category -> option text; others become "Metal nut." etc.
# MVTec AD / VisA objects that no textile, fabric or texture image could be taken for.
DISTRACTOR_OBJECTS = (
    "Bottle.",
    "Screw.",
    "Cable.",
    "Metal nut.",
    "Pill.",
    "Transistor.",
    "Capsule.",
    "Printed circuit board.",
    "Candle.",
    "Cashew.",
    "Toothbrush.",
    "Hazelnut.",
)
MAX_OPTIONS = 4  # MMAD's most; the official scorer reads letters A-E only


def _sentence(words: str) -> str:
    words = words.replace("_", " ").strip()
    return f"{words[:1].upper()}{words[1:]}."


def defect_option(defect: str) -> str:
    return DEFECT_OPTIONS.get(defect, _sentence(defect))


def object_option(category: str) -> str:
    return OBJECT_OPTIONS.get(category, _sentence(category))


def _question(kind: str, right: str, wrong: Sequence[str], rng: random.Random) -> MMADQuestion:
    """The right option among the wrong ones, stored in a seeded order under A, B, ..."""
    texts = [right, *wrong]
    rng.shuffle(texts)
    options = {LETTERS[i]: text for i, text in enumerate(texts)}
    return MMADQuestion(Question=QUESTIONS[kind], Answer=LETTERS[texts.index(right)], Options=options, type=kind)


def mmad_questions(
    image: LabelledImage,
    rng: random.Random,
    defect_types: Sequence[str] = (),
    types: Sequence[str] = QUESTION_TYPES,
    classify_normal: bool = False,
) -> list[MMADQuestion]:
    """The questions of `types` that the image's label answers, in `types` order. `defect_types` are the defect
    words the classification options are drawn from (besides the image's own type and "No defect."); normal
    images get no classification question (as in MMAD) unless `classify_normal` (then "No defect." is right)."""
    unknown = sorted(set(types) - set(QUESTION_TYPES))
    if unknown:
        raise DataError(f"unknown MMAD question type(s) {unknown}: use some of {list(QUESTION_TYPES)}")
    questions = []
    for kind in types:
        if kind == DETECTION:
            right, wrong = (YES_OPTION, NO_OPTION) if image.anomalous else (NO_OPTION, YES_OPTION)
            questions.append(_question(kind, right, [wrong], rng))
        elif kind == CLASSIFICATION and (image.anomalous or classify_normal):
            right = defect_option(image.defect or "defect") if image.anomalous else NO_DEFECT
            others = sorted({defect_option(d) for d in defect_types} - {right, NO_DEFECT})
            wrong = rng.sample(others, min(len(others), MAX_OPTIONS - 2)) + ([NO_DEFECT] if image.anomalous else [])
            if wrong:
                questions.append(_question(kind, right, wrong, rng))
        elif kind == OBJECT:
            right = object_option(image.category)
            others = [text for text in DISTRACTOR_OBJECTS if text.lower() != right.lower()]
            questions.append(_question(kind, right, rng.sample(others, MAX_OPTIONS - 1), rng))
    return questions


def _relative(path: Path, root: Path) -> str:
    """`path` relative to `root`, either of them relative to the working folder (links are not followed)."""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError as error:
        raise DataError(f"{path} is not inside the image root {root}") from error


def _templates(image: LabelledImage, pool: Sequence[LabelledImage], count: int, rng: random.Random) -> list:
    """Up to `count` normal images of the same category, never the query itself."""
    candidates = [t for t in pool if not t.anomalous and t.category == image.category and t.image != image.image]
    return rng.sample(candidates, min(count, len(candidates)))


def first_turn(text: str, templates: int = 0) -> str:
    """The first user turn as `Conversation.chat` renders it: with templates, the reference intro, then one
    image placeholder per image (templates, then the query), then the text."""
    intro = REFERENCE_INTRO.format(n=templates) + "\n" if templates else ""
    return intro + f"{IMAGE_TOKEN}\n" * (templates + 1) + text


def item_record(item: MMADItem, label: int) -> dict:
    """One LLaVA record asking `item` as `eval mmad` does, answered with the bare shown letter."""
    images = [*item.templates, item.image]
    return {
        "id": f"{Path(item.image).with_suffix('').as_posix()}#mmad-{item.question.type.lower().replace(' ', '-')}",
        "image": images[0] if len(images) == 1 else images,
        "conversations": [
            {"from": "human", "value": first_turn(prompt(item.question.Question, item.options), len(item.templates))},
            {"from": "gpt", "value": item.answer},
        ],
        "label": label,
        "type": item.question.type,
    }


def multiple_choice_records(
    image: LabelledImage,
    root: str | Path,
    rng: random.Random,
    count: int,
    defect_types: Sequence[str] = (),
    templates: Sequence[LabelledImage] = (),
    shots: int | Sequence[int] = 0,
    types: Sequence[str] | None = None,
) -> list[dict]:
    """Up to `count` single-question records about one image, of distinct types: `types` (in that order) when
    given, else drawn at random. Normal images are asked the defect type too ("No defect."), so every image has
    the same types. Each record takes its number of normal templates from `shots` (one number, or a seeded
    choice among several) out of `templates`."""
    if count <= 0:
        return []
    root = Path(root)
    relative = _relative(image.image, root)
    if types is None:
        questions = mmad_questions(image, rng, defect_types, classify_normal=True)
        questions = rng.sample(questions, min(count, len(questions)))
    else:
        questions = mmad_questions(image, rng, defect_types, types, classify_normal=True)[:count]
    records = []
    for question in questions:
        wanted = shots if isinstance(shots, int) else rng.choice(list(shots))
        shown = [_relative(t.image, root) for t in _templates(image, templates, wanted, rng)]
        entry = MMADEntry(conversation=[question], random_templates=shown)
        (item,) = question_items({relative: entry}, len(shown), False, rng.randrange(2**32), True)
        records.append(item_record(item, int(image.anomalous)))
    return records


def rotated_types(position: int, count: int) -> list[str]:
    """`count` distinct question types for the `position`-th image of its class: consecutive images take turns,
    so every type (and, over normal and anomalous images alike, the detection question) is asked equally often."""
    return [QUESTION_TYPES[(position + j) % len(QUESTION_TYPES)] for j in range(min(count, len(QUESTION_TYPES)))]


def mmad_benchmark(
    images: Sequence[LabelledImage],
    root: str | Path,
    seed: int = 0,
    templates: Sequence[LabelledImage] | None = None,
    template_count: int = 3,
    types: Sequence[str] = QUESTION_TYPES,
) -> dict[str, dict]:
    """{image path relative to root: mmad.json entry} for every image; templates are normal images of the same
    category from `templates` (default: the normal ones among `images`), never the query itself."""
    root, rng = Path(root), random.Random(seed)
    pool = list(images) if templates is None else list(templates)
    defect_types = sorted({image.defect for image in images if image.anomalous and image.defect})
    benchmark = {}
    for image in images:
        relative = _relative(image.image, root)
        if relative in benchmark:
            raise DataError(f"{relative} is listed twice")
        questions = mmad_questions(image, rng, defect_types, types)
        benchmark[relative] = {
            "image_path": relative,
            "mask_path": _relative(image.mask, root) if image.mask else "",
            "conversation": [question.model_dump() for question in questions],
            "similar_templates": [_relative(t.image, root) for t in _templates(image, pool, template_count, rng)],
            "random_templates": [_relative(t.image, root) for t in _templates(image, pool, template_count, rng)],
        }
    return benchmark


def write_mmad_benchmark(
    images: Sequence[LabelledImage],
    output: str | Path,
    root: str | Path | None = None,
    seed: int = 0,
    templates: Sequence[LabelledImage] | None = None,
    template_count: int = 3,
) -> Path:
    """Write `mmad_benchmark` as an mmad.json (atomically); image paths are relative to `root` (default: the
    file's folder, where `anomaly-assistant eval mmad --data FILE` looks for them)."""
    output = Path(output)
    benchmark = mmad_benchmark(images, output.parent if root is None else root, seed, templates, template_count)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_text(json.dumps(benchmark, indent=1), encoding="utf-8")
    os.replace(partial, output)
    return output
