"""How a normal reference should read in the LLM input, measured on the demo's held-out textiles with 1 reference.

Two layouts (`reference.prompt`, `config.ReferenceConfig`):

    base     the reference's padded square crop + one newline (LLaVA-OneVision's multi-image form; ours)
    expert   the same, then its own "with {adverb} suspicious features:" and expert tokens (Anomaly-OV's
             multi-image training form)

An LLM reads the layout it was trained with, so each layout is measured on a model trained with it: stage 2 of the
demo recipe run once per layout from one start (as `bench_roi_retrain.py` does; its conversations give half of
the multiple-choice questions a normal template image). The shipped demo, trained with "base", is measured with
both too (what switching an already trained model costs). For every held-out normal, local-defect and
global-defect textile, with one normal train image as the reference (drawn as `eval zeroshot --shots 1` draws it)
and without it, the table gives the LLM's P(Yes) AUROC (normal vs local defects, vs all defects) and chat accuracy
(the generated Yes/No, on normal + local defects). The Verdict itself does not depend on the layout: the expert
and the references' patch evidence read the images, not the prompt.

    python benchmarks/bench_reference_prompt.py --output runs/reference-prompt
    python benchmarks/bench_reference_prompt.py --output runs/reference-prompt --train-per-class 25 --per-class 30
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.config import Settings  # noqa: E402
from assistant.defaults import default_model_path  # noqa: E402
from assistant.engine import Conversation, LocalEngine, yes_probability  # noqa: E402
from assistant.image_io import load_image  # noqa: E402
from assistant.prompts import DETECTION_QUESTION  # noqa: E402
from benchmarks.bench_roi_quality import held_out  # noqa: E402
from benchmarks.bench_roi_retrain import prepare, train_arm  # noqa: E402
from data.textile import CATEGORY, split_paths  # noqa: E402
from eval.ad_metrics import auroc  # noqa: E402
from eval.datasets import draw_references  # noqa: E402

LAYOUTS = ("base", "expert")


def measure(model: Path, layout: str, images: dict[str, list], references: list) -> dict[str, float]:
    """P(Yes) AUROC and chat accuracy of one model read with one reference layout."""
    engine = LocalEngine.from_pretrained(model, device="cpu", settings=Settings(reference={"prompt": layout}))
    yes, said_yes = {}, {}
    for folder, folder_images in images.items():
        yes[folder], said_yes[folder] = [], []
        for image in tqdm(folder_images, desc=f"{model.name} {layout} {len(references)} ref {folder}", leave=False):
            yes[folder].append(yes_probability(engine, image, references))
            conversation = Conversation.start(image, DETECTION_QUESTION, references)
            said_yes[folder].append("yes" in engine.complete([conversation], max_new_tokens=3)[0].lower())

    def detection(defects: list[str]) -> float:
        positive = [p for folder in defects for p in yes[folder]]
        labels = np.r_[np.zeros(len(yes["good"])), np.ones(len(positive))]
        return auroc(labels, np.r_[yes["good"], positive])

    return {
        "auroc_local": detection(["local_defect"]),
        "auroc_all": detection(["local_defect", "global_defect"]),
        "chat_local": float(np.mean([not s for s in said_yes["good"]] + said_yes["local_defect"])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/reference-prompt"))
    parser.add_argument("--per-class", type=int, default=50, help="held-out images per class for the scores")
    parser.add_argument("--train-per-class", type=int, default=75, help="train images per defect class (the recipe's)")
    parser.add_argument("--no-shipped", action="store_true", help="leave out the shipped demo's rows")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_root, conversations, start = prepare(args.output, args.train_per_class)
    trained = {
        layout: train_arm(
            args.output, start, conversations, data_root, f"reference-{layout}", {"reference": {"prompt": layout}}
        )
        for layout in LAYOUTS
    }
    images = held_out(args.per_class)
    references = [load_image(path) for path in draw_references(CATEGORY, split_paths("train")["good"], 1, 0)]
    arms = [(f"stage 2 trained with {layout}", folder, layout) for layout, folder in trained.items()]
    if not args.no_shipped:
        arms += [("shipped demo (trained with base)", Path(default_model_path()), layout) for layout in LAYOUTS]
    counts = ", ".join(f"{len(v)} {k}" for k, v in images.items())
    print(f"held-out textiles ({counts}); stage 2 on {conversations.name}; P(Yes) and a 3-token answer per image")
    print("| model | read with | references | P(Yes) AUROC local | P(Yes) AUROC all | chat accuracy (normal + local) |")
    print("|---|---|---|---|---|---|", flush=True)
    without = set()  # models measured without a reference: there both layouts are the same prompt
    for name, folder, layout in arms:
        for shown in (references, []):
            if not shown and folder in without:
                continue
            without.update([] if shown else [folder])
            r = measure(folder, layout, images, shown)
            print(
                f"| {name} | {layout} | {len(shown)} | {r['auroc_local']:.3f} | {r['auroc_all']:.3f} "
                f"| {r['chat_local']:.3f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
