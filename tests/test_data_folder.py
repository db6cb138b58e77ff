"""MVTec AD and VisA folder layouts: labels, masks, defect names, splits, clear errors."""

import csv

import numpy as np
import pytest
from PIL import Image

from data.errors import DataError
from data.folder import load_folder


def png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


def test_mvtec_layout(tmp_path):
    bottle = tmp_path / "bottle"
    png(bottle / "train" / "good" / "000.png")
    png(bottle / "test" / "good" / "000.png")
    png(bottle / "test" / "broken_large" / "000.png")
    png(bottle / "test" / "broken_large" / "001.png")  # no mask file: mask stays None
    png(bottle / "ground_truth" / "broken_large" / "000_mask.png", 255)
    png(tmp_path / "carpet" / "test" / "hole" / "000.png")
    (tmp_path / "license.txt").write_text("not a category")

    images = load_folder(tmp_path, "mvtec", "all")
    assert [(i.category, i.split, i.anomalous, i.defect) for i in images] == [
        ("bottle", "train", False, None),
        ("bottle", "test", True, "broken large"),
        ("bottle", "test", True, "broken large"),
        ("bottle", "test", False, None),
        ("carpet", "test", True, "hole"),
    ]
    assert images[1].mask == bottle / "ground_truth" / "broken_large" / "000_mask.png"
    assert images[2].mask is None and images[0].mask is None
    assert len(load_folder(tmp_path, "mvtec", "test", ["bottle"])) == 3


def test_visa_layout_with_defect_names(tmp_path):
    png(tmp_path / "candle" / "Data" / "Images" / "Normal" / "0000.JPG")
    png(tmp_path / "candle" / "Data" / "Images" / "Anomaly" / "0001.JPG")
    png(tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "0001.png", 255)
    (tmp_path / "split_csv").mkdir()
    rows = [
        ["object", "split", "label", "image", "mask"],
        ["candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""],
        ["candle", "test", "anomaly", "candle/Data/Images/Anomaly/0001.JPG", "candle/Data/Masks/Anomaly/0001.png"],
    ]
    with (tmp_path / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with (tmp_path / "candle" / "image_anno.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["image", "label", "mask"], ["candle/Data/Images/Anomaly/0001.JPG", "chunk_of_wax_missing", ""]]
        )

    images = load_folder(tmp_path, "visa", "all")
    assert [(i.split, i.anomalous, i.defect) for i in images] == [
        ("train", False, None),
        ("test", True, "chunk of wax missing"),
    ]
    assert images[1].mask == tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "0001.png"
    assert [i.split for i in load_folder(tmp_path, "visa", "test")] == ["test"]


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        load_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="not a VisA folder"):
        load_folder(tmp_path, "visa")
    with pytest.raises(DataError, match="no mvtec images found"):
        load_folder(tmp_path, "mvtec")
    with pytest.raises(DataError, match="unknown dataset layout 'coco'"):
        load_folder(tmp_path, "coco")
