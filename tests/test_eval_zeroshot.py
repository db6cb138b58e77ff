"""Zero-shot harness: MVTec / VisA-csv readers, one report row per scorer, undefined metrics, resume."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from assistant.cli import main
from assistant.engine import LocalEngine
from data.errors import DataError
from eval.datasets import load_categories, sample_id
from tests.helpers import defect_image

HEIGHT, WIDTH = 40, 56
SCRATCH = (slice(13, 15), slice(19, 37))  # where defect_image(40, 56) draws its scratch


def scratch_mask() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[SCRATCH] = 255
    return mask


def save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_mvtec(root: Path) -> Path:
    """bottle: 2 good + 2 scratch test images with masks; tile: good test images only (one class)."""
    for i in range(2):
        save(root / "bottle" / "test" / "good" / f"{i:03d}.png", defect_image(HEIGHT, WIDTH, seed=i, defect=False))
        save(root / "bottle" / "test" / "scratch" / f"{i:03d}.png", defect_image(HEIGHT, WIDTH, seed=10 + i))
        save(root / "bottle" / "ground_truth" / "scratch" / f"{i:03d}_mask.png", Image.fromarray(scratch_mask()))
        save(
            root / "bottle" / "train" / "good" / f"{i:03d}.png", defect_image(HEIGHT, WIDTH, seed=20 + i, defect=False)
        )
        save(root / "tile" / "test" / "good" / f"{i:03d}.png", defect_image(HEIGHT, WIDTH, seed=30 + i, defect=False))
    return root


def write_visa(root: Path) -> Path:
    rows = [("candle", "train", "normal", "candle/Data/Images/Normal/0001.JPG", "")]
    rows += [("candle", "test", "normal", "candle/Data/Images/Normal/0000.JPG", "")]
    rows += [("candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png")]
    for _, _, label, image, mask in rows:
        save(root / image, defect_image(HEIGHT, WIDTH, defect=label == "anomaly").convert("RGB"))
        if mask:
            save(root / mask, Image.fromarray((scratch_mask() > 0).astype(np.uint8)))  # VisA masks: 0/1
    (root / "split_csv").mkdir()
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as file:
        csv.writer(file).writerows([("object", "split", "label", "image", "mask"), *rows])
    return root


class BrightnessExpert:
    """A stand-in for assistant.clip.expert.ClipAnomalyExpert: the scratch is the only pixel brighter than 200."""

    specs: list[tuple[str, str | None]] = []

    @classmethod
    def from_spec(cls, spec: str, device: str | None = None) -> BrightnessExpert:
        cls.specs.append((spec, device))
        return cls()

    def score(self, image, references=()):
        anomaly_map = (np.asarray(image.convert("L")) > 200).astype(np.float32)
        return float(anomaly_map.max()), anomaly_map


@pytest.fixture
def fake_clip(monkeypatch):
    module = types.ModuleType("assistant.clip.expert")
    module.ClipAnomalyExpert = BrightnessExpert
    monkeypatch.setitem(sys.modules, "assistant.clip.expert", module)
    BrightnessExpert.specs.clear()
    return BrightnessExpert


def test_mvtec_layout_reader(tmp_path):
    layout, categories = load_categories(write_mvtec(tmp_path))
    assert layout == "mvtec" and [c.name for c in categories] == ["bottle", "tile"]
    bottle = categories[0]
    assert [(sample_id(s), s.anomalous) for s in bottle.test] == [
        ("bottle/good/000.png", False),
        ("bottle/good/001.png", False),
        ("bottle/scratch/000.png", True),
        ("bottle/scratch/001.png", True),
    ]
    assert (
        bottle.test[2].mask == tmp_path / "bottle" / "ground_truth" / "scratch" / "000_mask.png"
        and bottle.test[0].mask is None
    )
    assert len(bottle.normal_train) == 2
    (tmp_path / "bottle" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="1 anomalous test images have no mask file, e.g. .*scratch/001.png"):
        load_categories(tmp_path)


def test_visa_split_csv_reader(tmp_path):
    layout, [candle] = load_categories(write_visa(tmp_path), ["candle"])
    assert layout == "visa" and [s.anomalous for s in candle.test] == [False, True] and len(candle.normal_train) == 1
    assert candle.test[1].mask == tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "000.png"
    with pytest.raises(DataError, match=r"no categories \['pcb9'\]; found \['candle'\]"):
        load_categories(tmp_path, ["pcb9"])


def report_rows(report: str) -> dict[str, list[str]]:
    """Main table rows: scorer -> its five metric cells."""
    table = report.split("| Scorer |", 1)[1].split("\n\n", 1)[0]
    return {
        cells[1].strip(): [c.strip() for c in cells[2:-1]]
        for cells in (line.split("|") for line in table.splitlines()[2:])
    }


def zeroshot_args(data: Path, output: Path, *options: str) -> list[str]:
    return ["eval", "zeroshot", "--data", str(data), "--output", str(output), *options]


def test_expert_and_clip_rows_from_one_harness_then_resume(tiny_path, tmp_path, fake_clip, monkeypatch):
    data, output = write_mvtec(tmp_path / "mvtec"), tmp_path / "run"
    model_options = ["--model", str(tiny_path), "--device", "cpu"]
    args = zeroshot_args(data, output, "--scorers", "expert,clip", "--clip-model", "ViT-T-1", *model_options)
    assert main(args) == 0
    assert fake_clip.specs == [("ViT-T-1", "cpu")]
    report = (output / "report.md").read_text()
    rows = report_rows(report)
    assert list(rows) == ["expert", "clip"]
    assert rows["clip"] == ["100.0"] * 5  # the brightness scorer finds exactly the scratch
    assert all(0 <= float(v) <= 100 for v in rows["expert"])
    assert "## clip per category" in report and "| tile | - | - | - | - | - |" in report
    undefined = "Undefined (one class only), left out of the means: tile: I-AUROC, I-F1max, P-AUROC, P-F1max, AUPRO"
    assert f"{undefined} (expert, clip)." in report
    assert (output / "chart.png").exists()
    monkeypatch.setattr(BrightnessExpert, "score", lambda *a: pytest.fail("scored twice"))
    monkeypatch.setattr(LocalEngine, "from_pretrained", lambda *a, **k: pytest.fail("model loaded for a finished run"))
    assert main(args) == 0 and (output / "report.md").read_text() == report


def test_pixel_metrics_on_a_shrunk_grid_and_a_visa_root_through_an_endpoint(endpoint, tmp_path):
    url, stub = endpoint
    output = tmp_path / "run"
    endpoint_options = ["--endpoint", url, "--served-model", "stub"]
    args = zeroshot_args(write_visa(tmp_path / "visa"), output, *endpoint_options, "--pixel-size", "28", "--shots", "1")
    assert main(args) == 0
    pixels = np.load(output / "pixels" / "expert" / "candle" / "Anomaly" / "000.JPG.npz")
    assert pixels["map"].shape == pixels["mask"].shape == (20, 28) and pixels["mask"].dtype == bool
    assert all(len(r["reference_urls"]) == 1 for r in stub.requests)
    rows = report_rows((output / "report.md").read_text())
    assert rows["expert"][0] == "100.0" and float(rows["expert"][4]) > 90  # the stub's heatmap is the brightness


def test_unknown_scorer_and_clip_without_a_model(tmp_path, capsys):
    data = write_mvtec(tmp_path / "mvtec")
    assert main(zeroshot_args(data, tmp_path / "o", "--scorers", "magic")) == 2
    assert "unknown scorer(s) ['magic']" in capsys.readouterr().err
    assert main(zeroshot_args(data, tmp_path / "o", "--scorers", "clip")) == 2  # random weights would be measured
    assert "--scorers clip needs --clip-model SPEC" in capsys.readouterr().err


def test_the_real_clip_expert_row_gets_each_category_name(tmp_path, monkeypatch):
    from assistant.clip.expert import ClipAnomalyExpert

    config = tmp_path / "tiny-eval-clip.json"  # a random 1-layer open_clip ViT: wiring, not accuracy
    config.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
            }
        )
    )
    seen = []
    original = ClipAnomalyExpert.score
    monkeypatch.setattr(
        ClipAnomalyExpert,
        "score",
        lambda self, image, refs=(): seen.append(self.object_name) or original(self, image, refs),
    )
    output = tmp_path / "run"
    clip_options = ["--scorers", "clip", "--clip-model", str(config), "--device", "cpu"]
    args = zeroshot_args(write_mvtec(tmp_path / "mvtec"), output, *clip_options, "--limit", "2")
    assert main(args) == 0
    assert seen == ["bottle", "bottle", "tile", "tile"]
    assert all(
        cell == "-" or 0 <= float(cell) <= 100 for cell in report_rows((output / "report.md").read_text())["clip"]
    )


def test_a_bad_clip_spec_is_a_one_line_error(tmp_path, capsys):
    args = zeroshot_args(write_mvtec(tmp_path / "mvtec"), tmp_path / "o", "--scorers", "clip")
    assert main([*args, "--clip-model", "No-Such-Arch"]) == 2
    assert "--clip-model: unknown open_clip architecture 'No-Such-Arch'" in capsys.readouterr().err


def test_image_only_runs_without_masks_and_reports_image_metrics(tmp_path, fake_clip):
    data, output = write_mvtec(tmp_path / "mvtec"), tmp_path / "run"
    for mask in (data / "bottle" / "ground_truth").rglob("*.png"):
        mask.unlink()
    args = zeroshot_args(data, output, "--scorers", "clip", "--clip-model", "ViT-T-1", "--categories", "bottle")
    assert main(args) == 2  # masks are required for pixel metrics
    assert main([*args, "--image-only"]) == 0
    report = (output / "report.md").read_text()
    assert "| Scorer | I-AUROC | I-F1max |" in report and "P-AUROC" not in report
    assert report_rows(report)["clip"] == ["100.0", "100.0"]
    assert not (output / "pixels").exists()


def test_profile_from_train_enrols_once_and_scores_against_it(tiny_path, tmp_path, monkeypatch):
    import assistant.profiles

    data, output = write_mvtec(tmp_path / "mvtec"), tmp_path / "run"
    args = zeroshot_args(data, output, "--categories", "bottle", "--scorers", "expert,decision", "--model",
                         str(tiny_path), "--profile-from", "train")
    assert main(args) == 0
    assert (output / "profiles" / "bottle" / "profile.json").is_file()
    report = (output / "report.md").read_text()
    assert "each category's normal training images enrolled as a profile" in report
    assert "Published zero-shot" not in report  # not a zero-shot run
    records = [json.loads(line) for line in (output / "answers.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(0 <= r["score"] <= 1 for r in records)
    monkeypatch.setattr(assistant.profiles, "enroll", lambda *a, **k: pytest.fail("enrolled twice"))
    (output / "answers.jsonl").write_text("")  # everything to score again, against the saved profile
    assert main(args) == 0 and len((output / "answers.jsonl").read_text().splitlines()) == 8
    assert main([*args[:-2], "--shots", "1", "--profile-from", "train"]) == 2  # one or the other
