"""VisA-D&R: detection metrics by hand, multi-turn reasoning with history, LLM judge, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assistant.cli import main
from assistant.engine import LocalEngine
from eval.records import AnswerLog
from eval.visa_dr import write_visa_dr_report
from eval.visa_dr_scoring import DetectionAnswer, JudgeAnswer, ReasoningAnswer, detection_metrics
from tests.helpers import defect_image

DETECTION = [  # official test_data.json items: image (relative to the data root), anomaly
    {"image": "VisA/candle/Data/Images/Anomaly/000.JPG", "anomaly": True},
    {"image": "VisA/candle/Data/Images/Anomaly/001.JPG", "anomaly": True},
    {"image": "VisA/candle/Data/Images/Normal/0000.JPG", "anomaly": False},
    {"image": "VisA/pcb1/Data/Images/Anomaly/000.JPG", "anomaly": True},
    {"image": "VisA/pcb1/Data/Images/Normal/0000.JPG", "anomaly": False},
]
REASONING = [  # visa_dr.json items: image, questions, and our reference `answers`
    {
        "image": "VisA/candle/Data/Images/Anomaly/000.JPG",
        "questions": ["Is there a defect?", "Where is it?"],
        "answers": ["Yes, a bright scratch.", "Near the top of the candle."],
    },
    {
        "image": "VisA/pcb1/Data/Images/Anomaly/000.JPG",
        "questions": ["Describe the anomaly."],
        "answers": ["A bright scratch on the board."],
    },
    {"image": "VisA/pcb2/Data/Images/Anomaly/000.JPG", "questions": ["Skipped officially?"], "answers": ["Yes."]},
]


def write_visa_dr(root: Path) -> tuple[Path, Path]:
    """DATA/VisA/{test_data,visa_dr}.json with images under DATA/VisA/<class>/... (the official layout)."""
    for seed, item in enumerate(DETECTION + REASONING):
        path = root / item["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        defect_image(40, 56, seed=seed, defect="Anomaly" in item["image"]).save(path, format="PNG")
    (root / "VisA" / "test_data.json").write_text(json.dumps(DETECTION))
    (root / "VisA" / "visa_dr.json").write_text(json.dumps(REASONING))
    return root / "VisA" / "test_data.json", root / "VisA" / "visa_dr.json"


def answer(category: str, anomaly: bool, response: str, p_yes: float | None = None) -> DetectionAnswer:
    return DetectionAnswer(
        id=f"{category}{response}{p_yes}", image="", category=category, anomaly=anomaly, response=response, p_yes=p_yes
    )


def test_detection_metrics_per_class_then_macro_by_hand():
    records = [
        # candle: truth 1 1 0 0, predicted 1 1 0 1 ('yes' anywhere) -> acc .75, prec 2/3, rec 1, F1 .8
        answer("candle", True, "Yes", 0.9),
        answer("candle", True, "I'd say yes", 0.6),
        answer("candle", False, "No", 0.2),
        answer("candle", False, "Yes", 0.7),
        # pcb1: truth 1 0, predicted 0 0 -> acc .5, precision/recall/F1 0 (nothing predicted positive)
        answer("pcb1", True, "No", 0.4),
        answer("pcb1", False, "No", 0.3),
    ]
    table = detection_metrics(records)
    assert table["candle"] == pytest.approx({"N": 4, "Acc": 0.75, "Prec": 2 / 3, "Rec": 1.0, "F1": 0.8, "AUROC": 0.75})
    assert table["pcb1"] == pytest.approx({"N": 2, "Acc": 0.5, "Prec": 0.0, "Rec": 0.0, "F1": 0.0, "AUROC": 1.0})
    assert table["Macro"] == pytest.approx({"N": 6, "Acc": 0.625, "Prec": 1 / 3, "Rec": 0.5, "F1": 0.4, "AUROC": 0.875})
    single = detection_metrics([answer("pipe", True, "Yes", 0.9), answer("pipe", True, "No", 0.1)])
    assert single["pipe"]["AUROC"] is None and single["Macro"]["AUROC"] is None


def test_endpoint_run_with_judge_then_resume(endpoint, tmp_path, capsys):
    url, stub = endpoint
    detection, reasoning = write_visa_dr(tmp_path / "data")
    output = tmp_path / "run"
    args = [
        "eval",
        "visa-dr",
        "--detection",
        str(detection),
        "--reasoning",
        str(reasoning),
        "--output",
        str(output),
        "--endpoint",
        url,
        "--served-model",
        "stub",
        "--yes-probability",
        "--judge-endpoint",
        url,
        "--judge-model",
        "stub",
    ]
    assert main(args) == 0
    # The stub says "Yes" to everything: candle acc 2/3, prec 2/3, rec 1, F1 .8; pcb1 acc .5, prec .5, rec 1, F1 2/3.
    report = (output / "report.md").read_text()
    assert f"| stub @ {url} | 0.58 | 0.58 | 1.00 | 0.73 | 0.50 |" in report
    assert "Anomaly-OV-7B (published) | 0.79 | 0.83 | 0.86 | 0.83 |" in report
    # Reasoning: pcb2 skipped as officially; the second turn carries the first question and answer.
    reasonings = AnswerLog(output / "answers-reasoning.jsonl", ReasoningAnswer).load()
    assert list(reasonings) == [item["image"] for item in REASONING[:2]]
    follow_up = next(r for r in stub.requests if r.get("messages") and r["messages"][-1]["content"] == "Where is it?")
    assert [m["role"] for m in follow_up["messages"]] == ["user", "assistant", "user"]
    assert follow_up["messages"][1]["content"] == reasonings[REASONING[0]["image"]].responses[0]
    judged = AnswerLog(output / "judge.jsonl", JudgeAnswer).load()
    assert len(judged) == 3 and all(j.score == 7 and "[Reference answer]" in j.prompt for j in judged.values())
    assert "| All | 3 |" in report and "| 7.00 |" in report and "Judge prompt:" in report
    detections = AnswerLog(output / "answers-detection.jsonl", DetectionAnswer).load()
    assert all(d.p_yes == pytest.approx(2 / 3) for d in detections.values())
    # Resume: everything is logged, so no request reaches the server and the report is the same.
    stub.reset()
    assert main(args) == 0 and stub.requests == [] and (output / "report.md").read_text() == report
    capsys.readouterr()


def test_local_reasoning_batches_turns_and_keeps_history(tiny_path, tmp_path, monkeypatch):
    _, reasoning = write_visa_dr(tmp_path / "data")
    calls: list[list[int]] = []
    original = LocalEngine.complete
    monkeypatch.setattr(
        LocalEngine,
        "complete",
        lambda self, c, n=256: calls.append([len(x.messages) for x in c]) or original(self, c, n),
    )
    output = tmp_path / "run"
    args = [
        "eval",
        "visa-dr",
        "--reasoning",
        str(reasoning),
        "--output",
        str(output),
        "--model",
        str(tiny_path),
        "--max-new-tokens",
        "3",
    ]
    assert main(args) == 0
    assert calls == [[1, 1], [3]]  # turn 1 for both items in one batch, then turn 2 (with history) for the first
    records = AnswerLog(output / "answers-reasoning.jsonl", ReasoningAnswer).load()
    assert [len(r.responses) for r in records.values()] == [2, 1]
    assert "| All | 3 |" in (output / "report.md").read_text()


def test_visa_dr_input_errors(tmp_path, tiny_path, capsys):
    detection, _ = write_visa_dr(tmp_path / "data")
    bad = tmp_path / "data" / "VisA" / "bad.json"
    bad.write_text(json.dumps([{"image": "VisA/candle/x.JPG"}]))
    base = ["eval", "visa-dr", "--model", str(tiny_path), "--output", str(tmp_path / "o")]
    assert main([*base, "--detection", str(bad)]) == 2
    assert f"VisA-D&R file {bad}, item 1: anomaly: Field required" in capsys.readouterr().err
    assert main(base) == 2 and "--detection" in capsys.readouterr().err
    assert main([*base, "--detection", str(detection), "--images", str(tmp_path)]) == 2
    assert "5 VisA-D&R images not found" in capsys.readouterr().err


@pytest.mark.parametrize(("categories", "published"), [(("candle", "pcb1"), True), (("candle", "textile"), False)])
def test_published_rows_only_beside_the_same_visa_classes(categories, published, tmp_path):
    detections = [answer(category, anomaly, "Yes") for category in categories for anomaly in (True, False)]
    text = write_visa_dr_report(tmp_path, "ours", detections, [], {}, skipped=0).read_text()
    assert ("Anomaly-OV-7B (published)" in text) == published
    assert "| ours | 0.50 | 0.50 | 1.00 | 0.67 |" in text


def test_local_detection_answers_with_the_verdicts_decision(tiny_path, tmp_path):
    """--answer verdict (the in-process default): every answer opens with the Verdict's Yes/No, AUROC ranks by its
    score, and the report states the out-of-domain share (here: domain unknown)."""
    from assistant.config import Settings
    from assistant.image_io import load_image
    from assistant.prompts import stated_decision
    from eval.visa_dr_data import visa_dr_view

    detection, _ = write_visa_dr(tmp_path / "data")
    output = tmp_path / "run"
    fused = ["decision.llm_weight=3"]  # the LLM's P(Yes) counts: the decision is not the expert's alone
    base = ["eval", "visa-dr", "--detection", str(detection), "--model", str(tiny_path), "--max-new-tokens", "3"]
    assert main([*base, "--output", str(output), "--set", fused[0]]) == 0
    records = list(AnswerLog(output / "answers-detection.jsonl", DetectionAnswer).load().values())
    engine = LocalEngine.from_pretrained(tiny_path, device="cpu", settings=Settings.parse(fused))
    for record in records:
        verdict = engine.analyze(visa_dr_view(load_image(tmp_path / "data" / record.image)))
        assert record.score == pytest.approx(verdict.score, abs=1e-6)
        assert stated_decision(record.response) == verdict.anomalous, record.response
    assert len(records) == len(DETECTION)
    report = (output / "report.md").read_text()
    assert "Domain: unknown" in report
