"""MMAD: official schema fixtures, seeded shuffling, official/strict parsing and scoring by hand, CLI with resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assistant.cli import main
from assistant.engine import LocalEngine
from eval.mmad import ANSWERS_FILE, MMADAnswer
from eval.mmad_data import load_mmad, mmad_view, prompt, question_items
from eval.mmad_scoring import Graded, official_filter, official_letter, strict_letter, summarize
from eval.records import AnswerLog
from tests.helpers import defect_image

TEMPLATE = "MVTec-AD/bottle/train/good/000.png"
IMAGES = [  # (path in mmad.json, anomalous)
    ("DS-MVTec/bottle/image/broken_large/000.png", True),
    ("DS-MVTec/bottle/image/good/001.png", False),
    ("VisA/candle/test/bad/000.JPG", True),
    ("VisA/candle/test/good/0001.JPG", False),
]


def questions(anomalous: bool) -> list[dict]:
    """A conversation in mmad.json's schema: Question, Answer, Options, type, annotation."""
    conversation = [
        {
            "Question": "Is there any defect in the object?",
            "Answer": "A" if anomalous else "B",
            "Options": {"A": "Yes.", "B": "No."},
            "type": "Anomaly Detection",
            "annotation": True,
        },
        {
            "Question": "What kind of object is this?",
            "Answer": "C",
            "Options": {"A": "A cable.", "B": "A screw.", "C": "A bottle.", "D": "A pill."},
            "type": "Object Classification",
            "annotation": True,
        },
        {
            "Question": "What shape is the object?",
            "Answer": "A",
            "Options": {"A": "Round.", "B": "Square."},
            "type": "Object Structure",
            "annotation": True,
        },
    ]
    if anomalous:
        conversation.append(
            {
                "Question": "Where is the defect?",
                "Answer": "B",
                "Options": {"A": "Top.", "B": "Middle.", "C": "Bottom."},
                "type": "Defect Localization",
                "annotation": True,
            }
        )
    return conversation


def write_mmad(root: Path) -> Path:
    """mmad.json + images (drawn in code) in the official layout: paths relative to the JSON's folder."""
    data = {}
    for seed, (relative, anomalous) in enumerate(IMAGES):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        defect_image(40, 56, seed=seed, defect=anomalous).save(root / relative)
        data[relative] = {
            "image_path": relative,
            "mask_path": "",
            "conversation": questions(anomalous),
            "similar_templates": [TEMPLATE],
            "random_templates": [TEMPLATE],
        }
    (root / TEMPLATE).parent.mkdir(parents=True, exist_ok=True)
    defect_image(40, 56, seed=9, defect=False).save(root / TEMPLATE)
    (root / "mmad.json").write_text(json.dumps(data, indent=1))
    return root / "mmad.json"


def test_option_shuffling_is_seeded_per_question_and_keeps_the_answer(tmp_path):
    entries = load_mmad(write_mmad(tmp_path))
    first = question_items(entries, shots=1, similar=False, seed=3, shuffle=True)
    assert [i.permutation for i in first] == [i.permutation for i in question_items(entries, 1, False, 3, True)]
    assert [i.permutation for i in first] != [i.permutation for i in question_items(entries, 1, False, 4, True)]
    for item in first:
        assert item.options[item.answer] == item.question.Options[item.question.Answer]  # same text, new letter
        assert list(item.options) == list("ABCD"[: len(item.options)]) and item.templates == (TEMPLATE,)
    assert [i.id for i in first][:2] == [
        "DS-MVTec/bottle/image/broken_large/000.png#0",
        "DS-MVTec/bottle/image/broken_large/000.png#1",
    ]
    unshuffled = question_items(entries, shots=0, similar=False, seed=3, shuffle=False)[1]
    assert unshuffled.permutation == ("A", "B", "C", "D") and unshuffled.templates == ()


def test_prompt_has_the_official_instruction_and_letter_lines():
    text = prompt("Is there any defect?", {"A": "No.", "B": "Yes."})
    assert text.startswith("\nYou are an industrial inspector")
    assert text.endswith("Following is new question list: \nIs there any defect? \nA. No.\nB. Yes.\n")


def test_mmad_view_fits_512_and_may_upscale():
    assert mmad_view(defect_image(100, 200), 512).size == (512, 256)
    assert mmad_view(defect_image(1000, 500), 512).size == (256, 512)
    assert mmad_view(defect_image(40, 50), 0).size == (50, 40)


@pytest.mark.parametrize(
    ("response", "official", "strict"),
    [
        ("B", "B", "B"),
        (
            "I think C. is right",
            "C",
            None,
        ),  # C is not an option here: official keeps it (then wrong), strict cannot parse
        ("Yes, there is a defect.", "B", "B"),  # no letter: official closest option text, strict the option named
        ("Hmm, hard to say.", "A", None),  # official always guesses something (difflib cutoff 0)
        ("Yes or no? No.", "B", None),  # two options named: strict refuses to guess
    ],
)
def test_official_and_strict_parsing(response, official, strict):
    options = {"A": "No.", "B": "Yes."}
    assert official_letter(response, options) == official
    assert strict_letter(response, options) == strict


def g(dataset: str, subtask: str, normal: bool, correct: bool | None) -> Graded:
    """A graded answer: correct, wrong, or (None) unparseable."""
    return Graded(dataset, subtask, normal, "A", None if correct is None else "A" if correct else "B")


HAND_TABLE = [
    # DS-MVTec: detection normal 1/2, anomalous 3/3 -> balanced (50 + 100) / 2 = 75 (plain accuracy would be 80)
    g("DS-MVTec", "Anomaly Detection", True, True),
    g("DS-MVTec", "Anomaly Detection", True, False),
    *[g("DS-MVTec", "Anomaly Detection", False, True)] * 3,
    g("DS-MVTec", "Defect Classification", False, True),
    g("DS-MVTec", "Defect Classification", False, False),
    g("DS-MVTec", "Object Analysis", False, True),
    g("DS-MVTec", "Object Analysis", True, False),
    # VisA: detection normal 1/1, anomalous 0/1 -> 50; classification 1/1; no Object Analysis question
    g("VisA", "Anomaly Detection", True, True),
    g("VisA", "Anomaly Detection", False, False),
    g("VisA", "Defect Classification", False, True),
]


def test_official_summary_by_hand():
    summary = summarize(HAND_TABLE, official=True)
    assert summary.columns == [
        "Anomaly Detection",
        "Defect Classification",
        "Object Analysis",
        "Average",
        "Overkill",
        "Miss",
    ]
    ds, visa, average = summary.rows["DS-MVTec"], summary.rows["VisA"], summary.rows["Average"]
    assert (ds["Anomaly Detection"], ds["Defect Classification"], ds["Object Analysis"]) == (75, 50, 50)
    assert ds["Average"] == pytest.approx(175 / 3) and (ds["Overkill"], ds["Miss"]) == (50, 0)
    assert visa["Object Analysis"] == 0  # officially an empty cell scores 0 ...
    assert visa["Average"] == pytest.approx(50) and (visa["Overkill"], visa["Miss"]) == (0, 100)
    # ... and the final row averages datasets: Disc (75 + 50) / 2, Avg (58.33 + 50) / 2
    assert average["Anomaly Detection"] == pytest.approx(62.5) and average["Object Analysis"] == pytest.approx(25)
    assert average["Average"] == pytest.approx((175 / 3 + 50) / 2)


def test_strict_summary_leaves_empty_cells_out_and_counts_unparseable_as_wrong():
    summary = summarize(HAND_TABLE, official=False)
    assert summary.rows["VisA"]["Object Analysis"] is None and summary.rows["VisA"]["Average"] == pytest.approx(75)
    assert summary.rows["Average"]["Object Analysis"] == pytest.approx(50)
    assert summary.rows["Average"]["Average"] == pytest.approx((175 / 3 + 75) / 2)
    with_unparseable = summarize([*HAND_TABLE[:-1], g("VisA", "Defect Classification", False, None)], official=False)
    assert with_unparseable.rows["VisA"]["Defect Classification"] == 0 and with_unparseable.counted == len(HAND_TABLE)


def test_official_filter_drops_unparseable_and_skips_the_next_answer():
    rows = [g("D", "Defect Classification", False, c) for c in (True, None, True, False, True)]
    kept, dropped, skipped = official_filter(rows)
    assert kept == [rows[0], rows[3], rows[4]] and (dropped, skipped) == (1, 1)
    assert summarize(rows, official=True).rows["D"]["Defect Classification"] == pytest.approx(200 / 3)
    assert summarize(rows, official=False).rows["D"]["Defect Classification"] == pytest.approx(60)


def mmad_args(data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "mmad",
        "--data",
        str(data),
        "--output",
        str(output),
        "--max-side",
        "0",
        "--max-new-tokens",
        "4",
        *extra,
    ]


def test_local_run_resumes_after_a_crash_without_repeating_or_losing_items(tiny_path, tmp_path, monkeypatch, capsys):
    data, output = write_mmad(tmp_path / "mmad"), tmp_path / "run"
    args = mmad_args(data, output, "--model", str(tiny_path), "--batch-size", "4")
    asked: list[str] = []
    original = LocalEngine.complete

    def crash_on_second_batch(self, conversations, max_new_tokens=256):
        if asked:
            raise KeyboardInterrupt  # the user stops the run (Ctrl-C)
        asked.extend(c.messages[0]["content"] for c in conversations)
        return original(self, conversations, max_new_tokens)

    monkeypatch.setattr(LocalEngine, "complete", crash_on_second_batch)
    assert main(args) == 130  # Ctrl-C: "interrupted", no traceback
    log = output / ANSWERS_FILE
    first_batch = log.read_text()
    assert first_batch.count("\n") == 4
    with log.open("a") as file:
        file.write('{"id": "DS-MVTec/bottle/ima')  # a line cut off by the crash
    counted = []
    monkeypatch.setattr(LocalEngine, "complete", lambda self, c, n=256: counted.extend(c) or original(self, c, n))
    assert main(args) == 0
    records = AnswerLog(log, MMADAnswer).load()
    items = question_items(load_mmad(data), 1, False, 0, True)
    assert list(records) == [i.id for i in items]  # every item once, in order, the partial line gone
    assert log.read_text().startswith(first_batch) and len(counted) == len(items) - 4  # nothing asked twice
    assert all(
        r.permutation == list(i.permutation) and r.templates == [TEMPLATE]
        for r, i in zip(records.values(), items, strict=True)
    )
    report = (output / "report.md").read_text()
    assert "| Model | Disc | Cls | Loc | Desc | Anal | ObjCls | ObjAnal | Avg |" in report
    assert "(official-compatible)" in report and "(strict)" in report and "GPT-4o (published)" in report
    assert (output / "chart.png").read_bytes()[:4] == b"\x89PNG"
    # Finished: a re-run only rewrites the report and never loads the model.
    monkeypatch.setattr(LocalEngine, "from_pretrained", lambda *a, **k: pytest.fail("model loaded for a finished run"))
    capsys.readouterr()
    assert main(args) == 0 and "| Model | Disc |" in capsys.readouterr().out


def test_endpoint_run_scores_every_parse_and_sends_the_images(endpoint, tmp_path):
    url, stub = endpoint
    data, output = write_mmad(tmp_path / "mmad"), tmp_path / "run"
    assert (
        main(
            mmad_args(data, output, "--endpoint", url, "--served-model", "stub", "--letter-probs", "--concurrency", "3")
        )
        == 0
    )
    records = list(AnswerLog(output / ANSWERS_FILE, MMADAnswer).load().values())
    assert len(records) == 14 and all(
        r.response == "B" and max(r.letter_probs, key=r.letter_probs.get) == "B" for r in records
    )
    chats = [r for r in stub.requests if not r.get("logprobs")]
    assert all(
        sum(p["type"] == "image_url" for p in r["messages"][0]["content"]) == 2 for r in chats
    )  # template + query
    # The stub always answers B (an offered letter), so all three scorings agree; Disc by hand from the records:
    report = (output / "report.md").read_text()
    rows = [line.split("|")[2:-1] for line in report.splitlines() if line.startswith("| stub @")]
    assert len(rows) == 3 and rows[0] == rows[1] == rows[2]
    detection = {r.image: 100.0 * (r.answer == "B") for r in records if r.type == "Anomaly Detection"}
    balanced = [(detection[bad] + detection[good]) / 2 for (bad, _), (good, _) in (IMAGES[:2], IMAGES[2:])]
    assert float(rows[0][0]) == pytest.approx(sum(balanced) / 2, abs=0.01)


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_path, capsys):
    data = write_mmad(tmp_path / "mmad")
    run = ["--model", str(tiny_path)]
    broken = tmp_path / "broken.json"
    broken.write_text('{"a.png": {"conversation": [}')
    assert main(mmad_args(broken, tmp_path / "o1", *run)) == 2
    assert f"{broken}: not valid JSON (line 1" in capsys.readouterr().err
    entries = json.loads(data.read_text())
    del entries[IMAGES[1][0]]["conversation"][0]["Answer"]
    bad = tmp_path / "mmad" / "bad.json"
    bad.write_text(json.dumps(entries))
    assert main(mmad_args(bad, tmp_path / "o2", *run)) == 2
    assert f"image '{IMAGES[1][0]}': conversation.0.Answer: Field required" in capsys.readouterr().err
    (tmp_path / "mmad" / TEMPLATE).unlink()
    assert main(mmad_args(data, tmp_path / "o3", *run)) == 2
    error = capsys.readouterr().err
    assert "1 MMAD images not found" in error and TEMPLATE in error
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / "run.json").write_text(json.dumps({"seed": 1}))
    assert main(mmad_args(data, tmp_path / "o4", *run)) == 2
    assert "other settings (seed: 1 -> 0)" in capsys.readouterr().err
