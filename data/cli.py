"""`anomaly-assistant data synth|instruct|check`: write synthetic datasets and conversations, validate files.

    anomaly-assistant data synth runs/synth --size 128 --instruct runs/synth/instruct.json
    anomaly-assistant data instruct /data/mvtec --layout mvtec --split test --output mvtec_instruct.json
    anomaly-assistant data check datasets.yaml --image-root /data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _write_conversations(images: list, root: Path, output: Path, seed: int, balanced: bool) -> int:
    from .conversations import conversation_records

    records = conversation_records(images, root, seed=seed, balanced=balanced)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return len(records)


def cmd_synth(args: argparse.Namespace) -> None:
    from .synth_dataset import SynthSpec, write_synthetic_dataset

    spec = SynthSpec(
        categories=args.categories,
        train_good=args.train_good,
        test_good=args.test_good,
        test_defective=args.test_defective,
        size=args.size,
        seed=args.seed,
    )
    images = write_synthetic_dataset(args.output, spec)
    print(f"{args.output}: {len(images)} images ({sum(i.anomalous for i in images)} with synthetic defects)")
    if args.instruct:
        count = _write_conversations(images, Path(args.output), Path(args.instruct), args.seed, balanced=True)
        print(f"{args.instruct}: {count} conversations (image paths relative to {args.output})")


def cmd_instruct(args: argparse.Namespace) -> None:
    from .folder import load_folder

    images = load_folder(args.root, args.layout, args.split, args.categories)
    count = _write_conversations(images, Path(args.root), Path(args.output), args.seed, balanced=not args.unbalanced)
    print(f"{args.output}: {count} conversations from {len(images)} labelled images")


def cmd_check(args: argparse.Namespace) -> None:
    from .instruct import check_images, load_instruct_json
    from .mixture import load_mixture

    path = Path(args.file)
    is_mixture = path.suffix in (".yaml", ".yml")
    samples = load_mixture(path, args.image_root) if is_mixture else load_instruct_json(path, args.image_root)
    check_images(samples)
    turns = sum(len(s.messages) for s in samples)
    print(f"{path}: {len(samples)} records, {turns} turns, {sum(len(s.images) for s in samples)} images, all found")


def register(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="write synthetic datasets and conversations, check data files")
    sub = data.add_subparsers(dest="data_command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic MVTec-layout dataset with defect masks")
    synth.add_argument("output", help="dataset folder to write")
    synth.add_argument("--categories", nargs="+", default=["textile", "pill"])
    synth.add_argument("--train-good", type=int, default=8, help="normal training images per category")
    synth.add_argument("--test-good", type=int, default=4, help="normal test images per category")
    synth.add_argument("--test-defective", type=int, default=2, help="test images per defect kind and category")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--instruct", help="also write Anomaly-Instruct-style conversations to this JSON file")
    synth.set_defaults(handler=cmd_synth)

    instruct = sub.add_parser("instruct", help="conversations (LLaVA JSON) from a labelled MVTec/VisA folder")
    instruct.add_argument("root", help="dataset folder")
    instruct.add_argument("--layout", choices=["mvtec", "visa"], default="mvtec")
    instruct.add_argument("--split", choices=["train", "test", "all"], default="test")
    instruct.add_argument("--categories", nargs="*", default=[])
    instruct.add_argument("--output", required=True, help="JSON file to write (image paths relative to root)")
    instruct.add_argument("--seed", type=int, default=0)
    instruct.add_argument("--unbalanced", action="store_true", help="keep every image instead of balancing Yes/No")
    instruct.set_defaults(handler=cmd_instruct)

    check = sub.add_parser("check", help="validate a conversation JSON/JSONL or a datasets.yaml mixture")
    check.add_argument("file")
    check.add_argument("--image-root", help="folder image paths are relative to (default: the JSON file's folder)")
    check.set_defaults(handler=cmd_check)
