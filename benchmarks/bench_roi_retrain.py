"""Stage 2 of the demo recipe trained once per ROI token source from one start, compared on held-out textiles.

An LLM reads the ROI tokens it was trained with: the shipped demo (trained on re-encoded crops) answers worse when
its ROI tokens are pooled from the tiles instead (`bench_roi_quality.py`). This asks the fair question: trained
on pooled tile tokens from the start, does a model lose anything against one trained on re-encoded crops?

Start (the same for every arm): the shipped demo's vision tower and expert (stage 1's output; stage 2 does not
train them), the projector and image newline at their initial weights (seed 0) and SmolLM2-135M without adapter.
Each arm runs the demo's stage-2 config (`training/configs/demo_instruct.yaml`, the recipe's conversations, or
fewer with --train-per-class) with its `roi.tokens_from` and `roi.pool`, merges, and is scored like
`bench_roi_quality.py` (chat accuracy, P(Yes) AUROC, speck inside a box) with the setting it was trained with.

    python benchmarks/bench_roi_retrain.py --output runs/roi-retrain                 # crops:2 and tiles:2
    python benchmarks/bench_roi_retrain.py --output runs/roi-retrain --arms tiles:4 --train-per-class 25
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.checkpoint import IMAGE_SIDE_FILE, load_checkpoint  # noqa: E402
from assistant.defaults import DEMO_MODEL_DIR  # noqa: E402
from assistant.factory import save_assistant  # noqa: E402
from benchmarks.bench_roi_quality import HEADER, evaluate, held_out, row  # noqa: E402
from data.textile import DEMO_SPLIT, write_textile_dataset  # noqa: E402
from training.config import load_config  # noqa: E402
from training.demo import CONFIG_DIR, build_initial_model, write_conversations  # noqa: E402
from training.instruct import MERGED_DIR, train_instruct  # noqa: E402


def start_folder(output: Path, seed: int) -> Path:
    """The shipped demo's tower and expert around SmolLM2 (no adapter), projector and newline as initialised."""
    start = output / "start"
    if (start / "config.json").is_file():
        return start
    init = build_initial_model(output / "init")
    model, processor = load_checkpoint(init)
    shipped = load_file(str(Path(DEMO_MODEL_DIR) / IMAGE_SIDE_FILE))
    kept = {k: v.float() for k, v in shipped.items() if k.startswith(("model.vision_tower.", "model.anomaly_expert."))}
    unexpected = model.load_state_dict(kept, strict=False).unexpected_keys
    assert not unexpected, unexpected
    return save_assistant(model, processor, start)


def train_arm(output: Path, start: Path, conversations: Path, data_root: Path, name: str, settings: dict) -> Path:
    """The demo's stage 2 from `start` with these model settings (`model.settings`), merged; reused when done."""
    run = output / f"{conversations.stem}-{name}"
    if not (run / MERGED_DIR / "config.json").is_file():
        overrides = [
            f"model.path={start}",
            f"model.settings={json.dumps(settings)}",  # JSON is YAML's flow style
            f"data.json_path={conversations}",
            f"data.image_root={data_root}",
            f"run.output_dir={run}",
            "objective.merge=true",
        ]
        train_instruct(load_config(CONFIG_DIR / "demo_instruct.yaml", "instruct", overrides))
    return run / MERGED_DIR


def prepare(output: Path, train_per_class: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """The textile split, the stage-2 conversations and the common start: (data root, conversations, start)."""
    data_root = output / "data"
    write_textile_dataset(data_root, DEMO_SPLIT["test_fraction"], seed, DEMO_SPLIT["validation_fraction"])
    conversations = output / f"instruct-{train_per_class}.json"
    if not conversations.is_file():
        write_conversations(conversations, data_root, train_per_class, seed)
    return data_root, conversations, start_folder(output, seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/roi-retrain"))
    parser.add_argument("--arms", nargs="+", default=["crops:2", "tiles:2"], help="TOKENS_FROM:POOL")
    parser.add_argument("--per-class", type=int, default=50, help="held-out images per class for the scores")
    parser.add_argument("--train-per-class", type=int, default=75, help="train images per defect class (the recipe's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_root, conversations, start = prepare(args.output, args.train_per_class)
    merged = {}
    for arm in args.arms:
        tokens_from, pool = arm.split(":")
        settings = {"roi": {"tokens_from": tokens_from, "pool": int(pool)}}
        merged[arm] = train_arm(args.output, start, conversations, data_root, f"{tokens_from}-{pool}", settings)
    images = held_out(args.per_class)
    print(f"stage 2 retrained per arm from one start; {args.per_class} held-out textiles per class")
    print(HEADER, flush=True)
    for arm, folder in merged.items():
        tokens_from, pool = arm.split(":")
        print(row(evaluate(tokens_from, int(pool), images, folder)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
