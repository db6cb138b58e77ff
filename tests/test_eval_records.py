"""The answer log and settings guard that make every evaluation resumable."""

import json

import pytest

from data.errors import DataError
from eval.records import AnswerLog, Record, check_settings


class Answer(Record):
    text: str


def test_log_appends_whole_lines_and_drops_a_partial_last_line(tmp_path):
    log = AnswerLog(tmp_path / "answers.jsonl", Answer)
    assert log.load() == {}
    log.append([Answer(id="a", text="one"), Answer(id="b", text="two")])
    with log.path.open("a") as file:
        file.write('{"id": "c", "te')  # the process died mid-line
    assert list(log.load()) == ["a", "b"]
    log.append([Answer(id="c", text="three"), Answer(id="a", text="again")])
    records = log.load()
    assert list(records) == ["a", "b", "c"] and records["a"].text == "again"  # a later line wins
    assert log.path.read_text().count("\n") == 4 and log.path.read_text().endswith("\n")


def test_a_corrupt_complete_line_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": "a", "text": "ok"}\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r"answers.jsonl, line 2: not a valid Answer record \(text: Field required\)"):
        AnswerLog(path, Answer).load()


def test_settings_merge_new_keys_and_refuse_changed_ones(tmp_path):
    check_settings(tmp_path, {"seed": 0, "shots": (1,)})
    check_settings(tmp_path, {"seed": 0, "scorer.clip": "ViT-B-16"})  # a scorer added later
    assert json.loads((tmp_path / "run.json").read_text()) == {"seed": 0, "shots": [1], "scorer.clip": "ViT-B-16"}
    with pytest.raises(DataError, match=r"other settings \(seed: 0 -> 1\)"):
        check_settings(tmp_path, {"seed": 1})
