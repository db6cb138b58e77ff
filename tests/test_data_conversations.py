"""Labelled folders -> Anomaly-Instruct-style conversations; the `data` CLI."""

import json
import random

import numpy as np
import pytest

from assistant.cli import main
from assistant.prompts import DETECTION_QUESTION
from data.conversations import balance, conversation_records, defect_region
from data.folder import LabelledImage
from data.instruct import check_images, load_instruct_json


def mask_with_box(y0, y1, x0, x1, size=(90, 120)):
    mask = np.zeros(size, np.uint8)
    mask[y0:y1, x0:x1] = 255
    return mask


@pytest.mark.parametrize(
    "box, location",
    [
        ((0, 10, 0, 10), "top left"),
        ((0, 10, 55, 65), "top"),
        ((0, 10, 110, 120), "top right"),
        ((40, 50, 0, 10), "left"),
        ((40, 50, 55, 65), "center"),
        ((40, 50, 110, 120), "right"),
        ((80, 90, 0, 10), "bottom left"),
        ((80, 90, 55, 65), "bottom"),
        ((80, 90, 110, 120), "bottom right"),
    ],
)
def test_location_words_follow_the_box_centre(box, location):
    assert defect_region(mask_with_box(*box)).location == location


def test_size_words_and_empty_masks():
    assert defect_region(mask_with_box(0, 5, 0, 5)).size == "tiny"  # 25 / 10800 px
    assert defect_region(mask_with_box(0, 20, 0, 20)).size == "small"
    assert defect_region(mask_with_box(0, 30, 0, 40)).size == "medium-sized"
    assert defect_region(mask_with_box(0, 60, 0, 60)).size == "large"
    assert defect_region(np.zeros((4, 4), np.uint8)) is None


def labelled(tmp_path, count_normal, count_defect):
    from PIL import Image

    images = []
    for index in range(count_normal + count_defect):
        anomalous = index >= count_normal
        path = tmp_path / "cable" / "test" / ("cut" if anomalous else "good") / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (120, 90)).save(path)
        mask = None
        if anomalous:
            mask = tmp_path / "cable" / "ground_truth" / "cut" / f"{index:03d}_mask.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask_with_box(70, 90, 0, 30)).save(mask)
        images.append(LabelledImage(path, anomalous, "cable", "cut wire" if anomalous else None, "test", mask))
    return images


def test_balanced_detection_answers_and_descriptions(tmp_path):
    images = labelled(tmp_path, count_normal=7, count_defect=3)
    records = conversation_records(images, tmp_path, seed=0, follow_ups=2)
    answers = [r["conversations"][1]["value"] for r in records]
    assert sorted(answers) == ["No"] * 3 + ["Yes"] * 3
    for r in records:
        turns = r["conversations"]
        assert turns[0]["value"] == f"<image>\n{DETECTION_QUESTION}"
        assert len(turns) == 2 * (1 + 1 + 2)  # detection, description, two follow-ups
        assert (tmp_path / r["image"]).is_file()
    defect = next(r for r in records if r["label"] == 1)
    assert "cut wire" in defect["conversations"][3]["value"] and "bottom left" in defect["conversations"][3]["value"]
    assert defect["mask"].endswith("_mask.png")
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps(records))
    check_images(load_instruct_json(path))  # the generated file is valid training data


def test_balancing_is_seeded_and_needs_both_classes(tmp_path):
    images = labelled(tmp_path, count_normal=6, count_defect=2)
    assert balance(images, random.Random(0)) == balance(images, random.Random(0))
    assert balance(images, random.Random(0)) != balance(images, random.Random(3))
    assert len(conversation_records(images, tmp_path, balanced=False)) == 8
    with pytest.raises(ValueError, match="0 anomalous and 6 normal"):
        conversation_records(images[:6], tmp_path)


def run_data_cli(*argv: str) -> int:
    return main(["data", *argv])


def test_data_cli_writes_checks_and_reports_problems(tmp_path, capsys):
    root, conversations = tmp_path / "synth", tmp_path / "instruct.json"
    synth = ["--categories", "pill", "--train-good", "2", "--test-good", "2", "--size", "32"]
    assert run_data_cli("synth", str(root), *synth, "--instruct", str(conversations)) == 0
    assert run_data_cli("instruct", str(root), "--output", str(tmp_path / "again.json"), "--unbalanced") == 0
    assert run_data_cli("check", str(conversations), "--image-root", str(root)) == 0
    output = capsys.readouterr().out
    assert "14 images (10 with synthetic defects)" in output  # 2 + 2 good, 2 of each of 5 kinds
    assert "again.json: 12 conversations from 12 labelled images" in output
    assert "8 records, 64 turns, 8 images, all found" in output  # 4 Yes + 4 No
    (root / "pill" / "train" / "good" / "000.png").unlink()
    assert run_data_cli("check", str(conversations), "--image-root", str(root)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: 1 missing image file(s):\n  instruct.json[0] id=pill/train/good/000")


def test_multiple_choice_records_are_added_without_changing_the_others(tmp_path):
    images = labelled(tmp_path, count_normal=5, count_defect=3)
    plain = conversation_records(images, tmp_path, seed=4)
    assert conversation_records(images, tmp_path, seed=4, multiple_choice=0, shots=1) == plain
    mixed = conversation_records(images, tmp_path, seed=4, multiple_choice=2, shots=(0, 1))
    assert [r for r in mixed if "type" not in r] == plain
    choice = [r for r in mixed if "type" in r]
    assert len(choice) == 2 * len(plain)  # two per image, of distinct types
    assert all(first["type"] != second["type"] for first, second in zip(choice[::2], choice[1::2], strict=True))
    assert [r["id"].split("#")[0] for r in choice[::2]] == [r["id"] for r in plain]  # each follows its image's
    for record in choice:
        images_shown = record["image"] if isinstance(record["image"], list) else [record["image"]]
        assert record["conversations"][0]["value"].count("<image>") == len(images_shown)
        assert record["conversations"][1]["value"] in {"A", "B", "C", "D"}
