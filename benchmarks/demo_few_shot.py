"""Zero-shot against few-shot on the demo's held-out textiles: detection and localisation, one table.

For each setting (0, 1 and 4 normal references per image, and a profile enrolled from the normal train
images) every held-out image gets its Verdict from the same model; the table reports the image AUROC of the
Verdict's score over all held-out images and for local and global defects alone (each against all normal
ones), and for the local defects how well the heatmap points at the speck. The textile images carry image
labels only, so the speck's position is found independently of the model (`data.textile.speck_position`):
the share of heatmap peaks within 16 px of it (by chance about 1% of a 250 x 250 image) and of flagged local
defects with the speck inside a box (boxes are drawn only for flagged images). References are drawn once,
seeded, from the normal train images (as `eval zeroshot --shots` draws them); they are never test images.

    python benchmarks/demo_few_shot.py                          # the bundled demo model, every held-out image
    python benchmarks/demo_few_shot.py --limit 40 --shots 0,1   # 40 per class, two settings
    python benchmarks/demo_few_shot.py --set reference.map_weight=0.8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.config import Settings  # noqa: E402
from assistant.defaults import default_model_path  # noqa: E402
from assistant.engine import LocalEngine  # noqa: E402
from assistant.image_io import load_image  # noqa: E402
from assistant.profiles import enroll  # noqa: E402
from data.textile import CATEGORY, speck_position, split_paths  # noqa: E402
from eval.ad_metrics import auroc  # noqa: E402
from eval.datasets import draw_references  # noqa: E402

RADIUS = 16
CLASSES = ("good", "local_defect", "global_defect")


def measure(engine: LocalEngine, images: dict[str, list[Path]], references, profile: str | None, label: str) -> dict:
    normals = [load_image(path) for path in references]
    scores: dict[str, list[float]] = {name: [] for name in CLASSES}
    near, in_box, flagged, false_alarms = [], [], [], []
    for name in CLASSES:
        for path in tqdm(images[name], desc=f"{label}: {name}", leave=False):
            image = load_image(path)
            verdict = engine.analyze(image, normals, profile)
            scores[name].append(verdict.score)
            if name == "good":
                false_alarms.append(verdict.anomalous)
            if name == "local_defect":
                y, x = speck_position(image)
                peak_y, peak_x = np.unravel_index(int(verdict.heatmap.argmax()), verdict.heatmap.shape)
                near.append(np.hypot(peak_y - y, peak_x - x) <= RADIUS)
                in_box.append(any(b.x0 <= x < b.x1 and b.y0 <= y < b.y1 for b in verdict.boxes))
                flagged.append(verdict.anomalous)

    def detection(defects: list[str]) -> float:
        positive = [s for d in defects for s in scores[d]]
        labels = np.r_[np.zeros(len(scores["good"])), np.ones(len(positive))]
        return 100 * auroc(labels, np.r_[scores["good"], positive])

    flagged = np.array(flagged)
    return {
        "setting": label,
        "all": detection(["local_defect", "global_defect"]),
        "local": detection(["local_defect"]),
        "global": detection(["global_defect"]),
        "near": 100 * float(np.mean(near)),
        "box": 100 * float(np.mean(np.array(in_box)[flagged])) if flagged.any() else float("nan"),
        "flagged": 100 * float(np.mean(flagged)),
        "false_alarms": 100 * float(np.mean(false_alarms)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled demo model)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out images of each class")
    parser.add_argument("--shots", default="0,1,4", help="comma-separated reference counts ('' for none)")
    parser.add_argument("--profile-images", type=int, default=None, help="enrol only N normal train images")
    parser.add_argument("--no-profile", action="store_true", help="leave out the enrolled-profile row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="a setting for this run, e.g. reference.weight=5")
    args = parser.parse_args()
    engine = LocalEngine.from_pretrained(
        args.model or default_model_path(), device="cpu", settings=Settings.parse(args.set)
    )
    test = split_paths("test")
    images = {name: test[name][: args.limit] for name in CLASSES}
    normal_train = split_paths("train")["good"]
    rows = []
    for shots in (int(k) for k in args.shots.split(",") if k.strip()):
        references = draw_references(CATEGORY, normal_train, shots, args.seed)
        rows.append(measure(engine, images, references, None, f"{shots} reference(s)"))
    if not args.no_profile:
        enrolled = normal_train[: args.profile_images]
        start = time.perf_counter()
        profile = enroll(engine, "textile", enrolled, source="textile normal train")
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:  # saved and read back: the row measures the file's profile
            profile.save(folder)
            engine.profiles = Path(folder)
            rows.append(measure(engine, images, (), "textile", f"profile ({len(enrolled)} train normals)"))
        print(f"\nenrolled {len(enrolled)} images in {seconds:.0f} s: {profile.describe()}")
    counts = ", ".join(f"{len(v)} {k}" for k, v in images.items())
    print(f"\nheld-out textiles ({counts}); reference settings: {engine.model.config.reference.model_dump()}\n")
    print(
        "| setting | AUROC all | AUROC local | AUROC global | peak within 16 px of the speck | "
        "speck in a box (flagged local) | local flagged | normal flagged |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['all']:.1f} | {r['local']:.1f} | {r['global']:.1f} | {r['near']:.0f}% | "
            f"{r['box']:.0f}% | {r['flagged']:.0f}% | {r['false_alarms']:.0f}% |"
        )


if __name__ == "__main__":
    main()
