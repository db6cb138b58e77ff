"""What the ROI tokens' source and size do to the demo's answers, on its held-out textiles.

For each ROI setting (`roi.tokens_from` x `roi.pool`, the ROI token count per box) the bundled demo model answers
the detection question for held-out normal images and local defects (the small specks, where finer detail matters
most) and the table gives:

    chat accuracy   the generated Yes/No right, on the local defects and as many normal images
    P(Yes) AUROC    the language model's P(Yes) (no text parsing), normal vs local defects, and vs all defects
    box on speck    the share of local defects with the speck (model-free locator) inside a verdict box
    analyze ms      `engine.analyze` per image (image side + the P(Yes) prefill of the decision), median

    python benchmarks/bench_roi_quality.py                    # 50 images per class, 3 settings
    python benchmarks/bench_roi_quality.py --per-class 20 --settings crops:2 tiles:2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.config import Settings  # noqa: E402
from assistant.defaults import default_model_path  # noqa: E402
from assistant.engine import Conversation, LocalEngine, yes_probability  # noqa: E402
from assistant.image_io import load_image  # noqa: E402
from assistant.prompts import DETECTION_QUESTION  # noqa: E402
from data.textile import speck_position, split_paths  # noqa: E402

CLASSES = ("good", "local_defect", "global_defect")


def box_holds(boxes, point: tuple[int, int]) -> bool:
    y, x = point
    return any(box.x0 <= x < box.x1 and box.y0 <= y < box.y1 for box in boxes)


def evaluate(tokens_from: str, pool: int, images: dict[str, list], model: Path | None = None) -> dict:
    settings = Settings(roi={"tokens_from": tokens_from, "pool": pool})
    engine = LocalEngine.from_pretrained(model or default_model_path(), device="cpu", settings=settings)
    yes, said_yes, on_speck, encode_ms = {}, {}, [], []
    for folder, folder_images in images.items():
        yes[folder], said_yes[folder] = [], []
        for image in tqdm(folder_images, desc=f"{tokens_from}:{pool} {folder}", leave=False, mininterval=30):
            start = time.perf_counter()
            verdict = engine.analyze(image)
            encode_ms.append(1000 * (time.perf_counter() - start))
            yes[folder].append(yes_probability(engine, image))
            answer = engine.complete([Conversation.start(image, DETECTION_QUESTION)], max_new_tokens=3)[0]
            said_yes[folder].append("yes" in answer.lower())
            if folder == "local_defect":
                on_speck.append(box_holds(verdict.boxes, speck_position(image)))
    normal, local, all_defects = yes["good"], yes["local_defect"], yes["local_defect"] + yes["global_defect"]
    layout = engine.processor.layout((images["good"][0].height, images["good"][0].width))
    return {
        "setting": f"{tokens_from}, pool {pool}",
        "roi_tokens": layout.num_roi,
        "chat_local": float(np.mean([not s for s in said_yes["good"]] + said_yes["local_defect"])),
        "auroc_local": roc_auc_score([0] * len(normal) + [1] * len(local), normal + local),
        "auroc_all": roc_auc_score([0] * len(normal) + [1] * len(all_defects), normal + all_defects),
        "on_speck": float(np.mean(on_speck)),
        "encode_ms": statistics.median(encode_ms),
    }


def held_out(per_class: int) -> dict[str, list]:
    paths = split_paths("test")
    return {folder: [load_image(path) for path in paths[folder][:per_class]] for folder in CLASSES}


HEADER = (
    "| ROI tokens from, pool | ROI tokens | chat accuracy (local + normal) | P(Yes) AUROC local | P(Yes) AUROC all "
    "| speck inside a box | analyze ms |\n|---|---|---|---|---|---|---|"
)


def row(r: dict) -> str:
    return (
        f"| {r['setting']} | {r['roi_tokens']} | {r['chat_local']:.3f} | {r['auroc_local']:.3f} "
        f"| {r['auroc_all']:.3f} | {r['on_speck']:.3f} | {r['encode_ms']:.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=50, help="held-out images per class (at most 100)")
    parser.add_argument("--settings", nargs="+", default=["crops:2", "tiles:2", "tiles:4"], help="TOKENS_FROM:POOL")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = held_out(args.per_class)
    counts = ", ".join(f"{len(v)} {k}" for k, v in images.items())
    print(f"demo model, held-out textiles ({counts}), torch {torch.__version__}, {args.threads} thread(s)")
    print(HEADER, flush=True)
    for setting in args.settings:
        tokens_from, pool = setting.split(":")
        print(row(evaluate(tokens_from, int(pool), images)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
