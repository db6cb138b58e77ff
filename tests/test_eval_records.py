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


@pytest.mark.parametrize("damage", ["", '{"model": "tin', "[1, 2]", "\xff\xfe"])
def test_a_damaged_settings_file_is_one_line_naming_it_and_the_recovery(tmp_path, damage):
    log = AnswerLog(tmp_path / "answers.jsonl", Answer)
    log.append([Answer(id="a", text="one")])
    (tmp_path / "run.json").write_bytes(damage.encode("latin-1"))
    with pytest.raises(
        DataError, match=r"run.json is damaged .*delete it and re-run .*answers in that folder are kept"
    ):
        check_settings(tmp_path, {"model": "tiny"})
    (tmp_path / "run.json").unlink()  # the recovery the message gives
    check_settings(tmp_path, {"model": "tiny"})
    assert list(log.load()) == ["a"]


def test_the_settings_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A kill while run.json is written leaves the previous file (here: the rename never happens)."""
    check_settings(tmp_path, {"model": "tiny"})
    before = (tmp_path / "run.json").read_text()

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("assistant.files.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        check_settings(tmp_path, {"model": "tiny", "scorer": "new"})
    assert (tmp_path / "run.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left behind
