"""Calibration of the decision: the logistic fit, the calibration errors, and writing the config."""

import json

import numpy as np
import pytest

from assistant.cli import main
from assistant.errors import UsageError
from eval.calibrate import expected_calibration_error, fit_logistic


def test_expected_calibration_error_by_hand():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([0.05, 0.05, 0.95, 0.55])
    # bins: 0.0-0.1 holds two negatives at 0.05 -> |0 - 0.05|; 0.5-0.6 one positive at 0.55 -> |1 - 0.55|;
    # 0.9-1.0 one positive at 0.95 -> |1 - 0.95|; weighted by 2/4, 1/4, 1/4.
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.5 * 0.05 + 0.25 * 0.45 + 0.25 * 0.05)


def test_logistic_fit_recovers_a_known_fusion():
    rng = np.random.default_rng(0)
    expert, llm = rng.normal(0, 3, 40000), rng.normal(0, 2, 40000)
    labels = (rng.random(40000) < 1 / (1 + np.exp(-(0.5 * expert + 1.5 * llm - 1.0)))).astype(int)
    (expert_weight, llm_weight), bias = fit_logistic(np.stack([expert, llm], axis=1), labels)
    assert expert_weight == pytest.approx(0.5, abs=0.08) and llm_weight == pytest.approx(1.5, abs=0.15)
    assert bias == pytest.approx(-1.0, abs=0.15)
    with pytest.raises(UsageError, match="both normal and anomalous"):
        fit_logistic(expert[:, None], np.zeros_like(labels))


def test_calibrate_command_writes_the_scaling(tiny_path, tmp_path, capsys):
    import shutil

    from tests.helpers import defect_image

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    for index in range(3):
        path = tmp_path / "data" / "part" / "train" / "good" / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        defect_image(seed=index, defect=False).save(path)
        broken = tmp_path / "data" / "part" / "train" / "scratch" / f"{index}.png"
        broken.parent.mkdir(parents=True, exist_ok=True)
        defect_image(seed=10 + index).save(broken)
    args = ["eval", "calibrate", "--data", str(tmp_path / "data"), "--split", "train", "--model", str(model)]
    assert main([*args, "--expert-only"]) == 0
    assert json.loads((model / "config.json").read_text())["decision"]["fitted_on"] is None  # not written
    assert main([*args, "--expert-only", "--write"]) == 0
    output = capsys.readouterr().out
    assert "6 images (3 anomalous)" in output and "fitted:" in output
    decision = json.loads((model / "config.json").read_text())["decision"]
    assert decision["llm_weight"] == 0.0 and (decision["expert_weight"] != 1.0 or decision["bias"] != 0.0)
    assert decision["fitted_on"] == "data [train], 6 images (3 anomalous)"


def test_calibrate_with_shots_fits_and_writes_the_few_shot_evidence(tiny_path, tmp_path, capsys):
    import shutil

    from PIL import ImageDraw

    from tests.helpers import texture

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    root = tmp_path / "data" / "part"
    for index in range(8):  # normal train images (the references) and a labelled val split
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        texture(index).save(root / "train" / "good" / f"{index}.png")
        for kind in ("good", "spot"):
            image = texture(100 + index).convert("RGB")
            if kind == "spot":
                ImageDraw.Draw(image).rectangle((30, 30, 50, 50), fill=(255, 0, 0))
            (root / "val" / kind).mkdir(parents=True, exist_ok=True)
            image.save(root / "val" / kind / f"{index}.png")
    args = ["eval", "calibrate", "--data", str(tmp_path / "data"), "--shots", "2", "--model", str(model)]
    before = json.loads((model / "config.json").read_text())
    assert main([*args, "--write", "--set", "reference.neighbourhood=1"]) == 0
    assert "16 images (8 anomalous), 2 shot(s)" in capsys.readouterr().out
    after = json.loads((model / "config.json").read_text())
    assert after["decision"] == before["decision"]  # the decision's calibration is kept as it is
    reference = after["reference"]
    assert reference["fitted_on"] == "data [val], 16 images (8 anomalous), 2 train normal(s) each"
    assert reference["weight"] > 0 and reference["neighbourhood"] == 1
    assert main([*args, "--shots", "9"]) == 2  # more references than the category's normal train images
    assert "has only 8 normal training images" in capsys.readouterr().err
