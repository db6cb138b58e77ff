"""Anomaly-Instruct / LLaVA JSON records and datasets.yaml mixtures: parsing, placeholders, clear errors."""

import json

import pytest
from PIL import Image

from data.errors import DataError
from data.instruct import check_images, load_instruct_json
from data.mixture import load_mixture


def record(index, image="a.png", turns=(("<image>\nDefect?", "Yes"),), **extra):
    conversations = [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    return {"id": f"r{index}", "image": image, "conversations": conversations, **extra}


def write(path, records):
    path.write_text(json.dumps(records))
    return path


def test_single_multiview_multiturn_and_text_only_records(tmp_path):
    records = [
        record(0, mask="a_mask.png"),  # extra fields (Triad's mask) are allowed
        record(1, image=["v1.png", "v2.png"], turns=(("<image>\n<image>\nCompare the views.", "Same."),)),
        record(2, turns=(("<image>\nDefect?", "Yes"), ("Where?", "top left"), ("Type?", "scratch"))),
        {"id": 3, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    samples = load_instruct_json(write(tmp_path / "train.json", records), image_root=tmp_path / "images")
    assert [s.images for s in samples] == [
        (tmp_path / "images" / "a.png",),
        (tmp_path / "images" / "v1.png", tmp_path / "images" / "v2.png"),
        (tmp_path / "images" / "a.png",),
        (),
    ]
    assert [m["role"] for m in samples[2].messages] == ["user", "assistant"] * 3
    assert samples[2].messages[3]["content"] == "top left"
    assert samples[3].key == "train.json[3] id=3"


def test_records_without_placeholders_get_one_per_image(tmp_path):
    records = [record(0, image=["v1.png", "v2.png"], turns=(("Any defect?", "No"),))]
    (sample,) = load_instruct_json(write(tmp_path / "d.json", records))
    assert sample.messages[0]["content"] == "<image>\n<image>\nAny defect?"


def test_jsonl_is_read_line_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(record(i)) for i in range(3)) + "\n")
    assert len(load_instruct_json(path)) == 3


def test_malformed_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "a", "conversations": [}\n]')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON \(line 1"):
        load_instruct_json(path)
    lines = tmp_path / "broken.jsonl"
    lines.write_text(json.dumps(record(0)) + "\n\n" + '{"id": "b", "conversations": [}\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: not valid JSON \(line 3, column 31"):
        load_instruct_json(lines)
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"id": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.json: not UTF-8 text"):
        load_instruct_json(latin)


def test_malformed_records_are_named_by_index_and_id(tmp_path):
    records = [
        record(0),
        {
            "id": "no-answer",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "human", "value": "q"}],
        },
        {"id": "bad-speaker", "conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]},
        record(3, image=["a.png", "b.png"], turns=(("<image>\nq", "a"),)),
    ]
    with pytest.raises(DataError) as error:
        load_instruct_json(write(tmp_path / "d.json", records))
    message = str(error.value)
    assert "3 malformed record(s)" in message
    assert "d.json[1] id=no-answer" in message and "alternate" in message
    assert "d.json[2] id=bad-speaker" in message
    assert "d.json[3] id=r3" in message and "1 <image> placeholders for 2 image(s)" in message
    assert "d.json[0]" not in message


def test_missing_images_are_listed_by_record_before_training(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = [record(0), record(1, image="gone.png"), record(2, image=["a.png", "also_gone.png"], turns=(("q", "a"),))]
    samples = load_instruct_json(write(tmp_path / "d.json", records))
    with pytest.raises(DataError) as error:
        check_images(samples)
    message = str(error.value)
    assert message.startswith("2 missing image file(s)")
    assert "d.json[1] id=r1" in message and "gone.png" in message
    assert "d.json[2] id=r2" in message and "also_gone.png" in message


def test_mixture_strategies_are_seeded_and_paths_relative_to_the_yaml(tmp_path):
    (tmp_path / "sets").mkdir()
    write(tmp_path / "sets" / "a.json", [record(i) for i in range(10)])
    write(tmp_path / "sets" / "b.json", [record(i) for i in range(20)])
    mixture = tmp_path / "datasets.yaml"
    mixture.write_text(
        "datasets:\n"
        "  - json_path: sets/a.json\n    sampling_strategy: first:3\n    image_folder: imgs\n"
        "  - json_path: sets/a.json\n    sampling_strategy: end:2\n"
        "  - json_path: sets/b.json\n    sampling_strategy: random:25%\n"
        "  - json_path: sets/b.json\n    sampling_strategy: all\n"
    )
    samples = load_mixture(mixture, image_root=tmp_path / "root", seed=1)
    keys = [s.key for s in samples]
    assert keys[:3] == ["a.json[0] id=r0", "a.json[1] id=r1", "a.json[2] id=r2"]
    assert keys[3:5] == ["a.json[8] id=r8", "a.json[9] id=r9"]
    assert len(samples) == 3 + 2 + 5 + 20
    assert samples[0].images == (tmp_path / "imgs" / "a.png",)
    assert samples[3].images == (tmp_path / "root" / "a.png",)
    random_part = keys[5:10]
    assert random_part == [s.key for s in load_mixture(mixture, tmp_path, seed=1)][5:10]
    assert random_part != [s.key for s in load_mixture(mixture, tmp_path, seed=2)][5:10]


def test_bad_mixture_strategy_is_rejected(tmp_path):
    write(tmp_path / "a.json", [record(0)])
    mixture = tmp_path / "datasets.yaml"
    mixture.write_text("datasets:\n  - json_path: a.json\n    sampling_strategy: some:3\n")
    with pytest.raises(DataError, match="unknown sampling_strategy 'some:3'"):
        load_mixture(mixture)
