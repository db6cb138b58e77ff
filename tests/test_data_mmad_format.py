"""Labelled images -> MMAD-format multiple choice: training records ask what `eval mmad` asks, answers are right."""

import argparse
import json
import random
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import jinja2
import pytest

import data.mmad_format as mmad_format
from assistant.processing import IMAGE_PARTS_AS_TEXT
from data.conversations import conversation_records
from data.folder import LabelledImage, load_folder
from data.instruct import check_images, load_instruct_json
from data.mmad_format import (
    CLASSIFICATION,
    DETECTION,
    NO_DEFECT,
    OBJECT,
    first_turn,
    item_record,
    mmad_benchmark,
    mmad_questions,
    multiple_choice_records,
    rotated_types,
    write_mmad_benchmark,
)
from eval.mmad import _answer_batch
from eval.mmad_data import LETTERS, load_mmad, prompt, question_items
from eval.mmad_scoring import grade, official_letter, strict_letter, summarize
from tests.helpers import defect_image

CLASSES = {"good": 4, "local_defect": 2, "global_defect": 2}
# What each label must answer, in option words (the texts the demo's labels are phrased as).
EXPECTED = {
    DETECTION: {None: "No.", "local defect": "Yes.", "global defect": "Yes."},
    CLASSIFICATION: {
        None: "No defect.",
        "local defect": "A small local speck.",
        "global defect": "A change of the texture over the whole surface.",
    },
    OBJECT: {None: "Textile fabric.", "local defect": "Textile fabric.", "global defect": "Textile fabric."},
}
# The chat template's first step (processing.IMAGE_PARTS_AS_TEXT), then the flattened contents one after another.
FLATTEN = jinja2.Environment().from_string(
    IMAGE_PARTS_AS_TEXT + "{% for m in messages %}{{ m['content'] }}{% endfor %}"
)
OPTION_LINE = re.compile(r"^([A-E])\. (.+)$")


def textile(root, split="test", classes=CLASSES) -> list[LabelledImage]:
    """A tiny MVTec-layout textile folder under root/data, read back with the project's loader."""
    seed = 0
    for folder, count in classes.items():
        for index in range(count):
            path = root / "data" / "textile" / split / folder / f"textile_{index:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            defect_image(24, 32, seed=(seed := seed + 1), defect=folder != "good").save(path)
    return load_folder(root / "data", "mvtec", split, ["textile"])


def by_path(images, root) -> dict[str, LabelledImage]:
    return {image.image.relative_to(root).as_posix(): image for image in images}


def parsed(text: str) -> tuple[str, dict[str, str]]:
    """(question, {letter: option}) read back from a prompt's last lines."""
    lines = text.rstrip("\n").split("\n")
    start = lines.index("Following is new question list: ") + 1
    options = dict(OPTION_LINE.match(line).groups() for line in lines[start + 1 :])
    return lines[start].removesuffix(" "), options


def check_mc_record(record: dict, image: LabelledImage) -> str:
    """A multiple-choice training record: eval's prompt after the images, the right bare letter; its type."""
    human, gpt = (turn["value"] for turn in record["conversations"])
    images = record["image"] if isinstance(record["image"], list) else [record["image"]]
    question, options = parsed(human)
    assert human == first_turn(prompt(question, options), len(images) - 1)
    assert list(options) == list(LETTERS[: len(options)]) and 2 <= len(options) <= 4
    assert re.fullmatch(r"[A-E]", gpt) and gpt in options
    assert official_letter(gpt, options) == strict_letter(gpt, options) == gpt
    assert options[gpt] == EXPECTED[record["type"]][image.defect], record
    return record["type"]


def test_questions_follow_the_labels_and_stay_valid_options():
    rng = random.Random(0)
    speck = LabelledImage(Path("x/local_defect/1.png"), True, "textile", "local defect", "test")
    normal = LabelledImage(Path("x/good/1.png"), False, "textile", None, "test")
    questions = mmad_questions(speck, rng, ["global defect", "local defect"])
    assert [q.type for q in questions] == [DETECTION, CLASSIFICATION, OBJECT]
    assert [q.Options[q.Answer] for q in questions] == ["Yes.", "A small local speck.", "Textile fabric."]
    assert set(questions[1].Options.values()) == {
        "A small local speck.",
        "A change of the texture over the whole surface.",
        NO_DEFECT,
    }
    assert [q.type for q in mmad_questions(normal, rng)] == [DETECTION, OBJECT]  # no defect question, as in MMAD
    classified = mmad_questions(normal, rng, ["local defect"], classify_normal=True)[1]
    assert classified.type == CLASSIFICATION and classified.Options[classified.Answer] == NO_DEFECT
    assert len(classified.Options) == 2
    assert len(mmad_questions(normal, rng, classify_normal=True)) == 2  # no defect types known: nothing to ask
    with pytest.raises(ValueError, match="unknown MMAD question type"):
        mmad_questions(normal, rng, types=["Defect Localization"])


def test_training_records_are_eval_prompts_with_the_right_letter(tmp_path):
    images = textile(tmp_path, "train")
    root = tmp_path / "data"
    records = conversation_records(images, root, seed=0, follow_ups=1, multiple_choice=3, shots=(0, 1))
    paths = by_path(images, root)
    choice = [r for r in records if "type" in r]
    types = [check_mc_record(r, paths[r["image"][-1] if isinstance(r["image"], list) else r["image"]]) for r in choice]
    assert types.count(DETECTION) == types.count(CLASSIFICATION) == types.count(OBJECT) == 8
    detection = [r["label"] for r in choice if r["type"] == DETECTION]
    assert sorted(detection) == [0] * 4 + [1] * 4  # balanced images, balanced Yes/No
    with_templates = [r for r in choice if isinstance(r["image"], list)]
    assert with_templates and len(with_templates) < len(choice)  # shots (0, 1): both kinds
    for record in with_templates:
        template, query = record["image"]
        assert "/good/" in template and template != query
    assert len({r["id"] for r in records}) == len(records)
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps(records))
    samples = load_instruct_json(path, root)
    check_images(samples)  # valid training data, image placeholders matching the images
    first = next(s for s, r in zip(samples, records, strict=True) if r in with_templates)
    assert first.messages[0]["content"].startswith("The first 1 image(s) show normal samples")


def test_training_records_are_seeded(tmp_path):
    images = textile(tmp_path, "train")
    root = tmp_path / "data"

    def records(seed):
        return [r for r in conversation_records(images, root, seed, multiple_choice=2, shots=(0, 1)) if "type" in r]

    assert records(0) == records(0)
    assert records(0) != records(1)
    rng = random.Random(5)
    assert multiple_choice_records(images[-1], root, rng, 0) == []
    assert len(multiple_choice_records(images[-1], root, rng, 9, ["local defect", "global defect"])) == 3


def eval_conversations(items, root):
    """What `eval mmad` sends for these items (its own batch code, engine replaced by a recorder that answers
    with our training answer), flattened to text as the chat template does; and its answer records."""
    sent = []

    class Recorder:
        def complete(self, conversations, max_new_tokens):
            sent.extend(conversations)
            return [item_record(item, 0)["conversations"][1]["value"] for item in items]

    args = argparse.Namespace(max_side=0, max_new_tokens=8, letter_probs=False)
    answers = _answer_batch(args, Recorder, root)(items)
    return [FLATTEN.render(messages=conversation.chat()) for conversation in sent], answers


@pytest.mark.parametrize("shots", [0, 1, 2])
def test_benchmark_file_loads_and_eval_asks_what_we_train(tmp_path, shots):
    images = textile(tmp_path)
    output = write_mmad_benchmark(images, tmp_path / "mmad_test.json", seed=3)
    entries = load_mmad(output)
    paths = by_path(images, tmp_path)
    assert list(entries) == list(paths)
    for key, entry in entries.items():
        assert entry.model_extra["mask_path"] == ""
        for templates in (entry.similar_templates, entry.random_templates):
            assert len(templates) == 3 and key not in templates and all("/good/" in t for t in templates)
    items = question_items(entries, shots, False, 0, True)
    assert len(items) == 4 * 2 + 4 * 3
    texts, answers = eval_conversations(items, tmp_path)
    for item, text, answer in zip(items, texts, answers, strict=True):
        record = item_record(item, 0)
        assert text == record["conversations"][0]["value"]  # exactly the text `eval mmad` sends
        assert len(item.templates) == shots
        assert item.options[answer.response] == EXPECTED[item.question.type][paths[item.image].defect]
    graded = [grade(a.image, a.type, a.answer, official_letter(a.response, a.options)) for a in answers]
    assert summarize(graded, official=True).rows["Average"]["Average"] == 100.0
    assert summarize(graded, official=True).dropped == 0


def test_benchmark_is_seeded_and_keeps_masks_and_roots(tmp_path, monkeypatch):
    images = textile(tmp_path)
    assert mmad_benchmark(images, tmp_path, seed=1) == mmad_benchmark(images, tmp_path, seed=1)
    assert mmad_benchmark(images, tmp_path, seed=1) != mmad_benchmark(images, tmp_path, seed=2)
    masked = [replace(image, mask=image.image) if image.anomalous else image for image in images]
    entry = mmad_benchmark(masked, tmp_path)["data/textile/test/local_defect/textile_0000.png"]
    assert entry["mask_path"] == "data/textile/test/local_defect/textile_0000.png"
    by_root = mmad_benchmark(images, tmp_path / "data", templates=[i for i in images if not i.anomalous][:1])
    assert all(key.startswith("textile/test/") for key in by_root)
    assert all(len(e["random_templates"]) <= 1 for e in by_root.values())
    monkeypatch.chdir(tmp_path)
    assert mmad_benchmark(images, Path(".")) == mmad_benchmark(images, tmp_path)  # relative and absolute roots
    with pytest.raises(ValueError, match="is not inside the image root"):
        mmad_benchmark(images, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="listed twice"):
        mmad_benchmark(images + images[:1], tmp_path)


def test_a_wrong_answer_letter_is_caught(tmp_path, monkeypatch):
    """Break-the-code: a generator that stores the next letter as the answer fails the checks above."""
    original = mmad_format._question

    def shifted(kind, right, wrong, rng):
        question = original(kind, right, wrong, rng)
        letters = list(question.Options)
        return question.model_copy(update={"Answer": letters[(letters.index(question.Answer) + 1) % len(letters)]})

    monkeypatch.setattr(mmad_format, "_question", shifted)
    images = textile(tmp_path, "train")
    root = tmp_path / "data"
    record = multiple_choice_records(images[0], root, random.Random(0), 1)[0]
    with pytest.raises(AssertionError):
        check_mc_record(record, images[0])
    entries = load_mmad(write_mmad_benchmark(images, tmp_path / "bad.json", root=tmp_path))
    _, answers = eval_conversations(question_items(entries, 1, False, 0, True), tmp_path)
    paths = by_path(images, tmp_path)
    wrong = [a for a in answers if a.options[a.response] != EXPECTED[a.type][paths[a.image].defect]]
    assert len(wrong) == len(answers)


def test_one_question_per_image_takes_turns_over_the_types(tmp_path):
    images = textile(tmp_path, "train", {"good": 12, "local_defect": 6, "global_defect": 6})
    root = tmp_path / "data"
    records = [r for r in conversation_records(images, root, seed=0, multiple_choice=1) if "type" in r]
    assert len(records) == len(images)
    paths = by_path(images, root)
    asked = Counter((check_mc_record(r, paths[r["image"]]), r["label"]) for r in records)
    assert asked == {(kind, label): 4 for kind in (DETECTION, CLASSIFICATION, OBJECT) for label in (0, 1)}
    assert rotated_types(2, 2) == [OBJECT, DETECTION] and rotated_types(0, 9) == [DETECTION, CLASSIFICATION, OBJECT]
