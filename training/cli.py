"""`anomaly-assistant train expert|instruct|merge|demo`.

    anomaly-assistant train expert --config training/configs/tiny_expert.yaml
    anomaly-assistant train instruct --config training/configs/tiny_instruct.yaml --set run.max_steps=50
    anomaly-assistant train instruct --config ... --resume              # from the latest checkpoint
    anomaly-assistant train merge runs/instruct/adapter --output runs/instruct/merged
    anomaly-assistant train demo                                        # the bundled demo model, end to end
    accelerate launch --config_file training/accelerate/zero2.yaml -m assistant train instruct --config ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from assistant.errors import UsageError


def _resume_path(argument: str | None, output_dir: str) -> Path | None:
    from .checkpoint import latest_checkpoint

    if argument is None:
        return None
    if argument != "latest":
        path = Path(argument)
        if not path.is_dir():
            raise UsageError(f"--resume {path}: no such checkpoint folder")
        return path
    path = latest_checkpoint(output_dir)
    if path is None:
        raise UsageError(f"--resume: no checkpoint under {output_dir}/checkpoints")
    return path


def cmd_train(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from .config import load_config

    config = load_config(args.config, args.stage, args.set)
    resume = _resume_path(args.resume, config.run.output_dir)
    if args.stage == "expert":
        from .expert import train_expert as train
    else:
        from .instruct import train_instruct as train
    summary = train(config, resume)
    if PartialState().is_main_process:
        print(f"\n{args.stage} training finished\n{summary.format()}")


def cmd_merge(args: argparse.Namespace) -> None:
    from .config import CONFIG_FILE, ConfigError, load_config
    from .lora import export_merged

    adapter = Path(args.adapter)
    try:
        config = load_config(adapter / CONFIG_FILE, "instruct")
    except ConfigError as error:
        raise UsageError(f"{adapter}: not an adapter folder written by `train instruct` ({error})") from error
    print(export_merged(config.model, adapter, Path(args.output)))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    print(run_demo(args.output, args.destination, per_class=args.per_class, seed=args.seed))


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="stage 1 (expert) and stage 2 (LoRA/QLoRA instruction) training")
    sub = train.add_subparsers(dest="train_command", required=True)
    for stage, text in (
        ("expert", "train the anomaly expert (vision frozen)"),
        ("instruct", "LoRA/QLoRA instruction tuning"),
    ):
        parser = sub.add_parser(stage, help=text)
        parser.add_argument("--config", required=True, help="YAML file (see training/configs/)")
        parser.add_argument(
            "--resume",
            nargs="?",
            const="latest",
            default=None,
            help="continue from a checkpoint folder (default: the latest)",
        )
        parser.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. run.max_steps=20"
        )
        parser.set_defaults(handler=cmd_train, stage=stage)

    merge = sub.add_parser("merge", help="merge a saved LoRA adapter into a full checkpoint")
    merge.add_argument("adapter", help="the adapter folder of a `train instruct` run (output_dir/adapter)")
    merge.add_argument("--output", required=True)
    merge.set_defaults(handler=cmd_merge)

    demo = sub.add_parser("demo", help="build the offline demo model (textile images + SmolLM2), resumable")
    demo.add_argument("--output", default="runs/demo", help="working folder: data split, checkpoints, logs")
    demo.add_argument("--destination", default=None, help="where the packaged model goes (default: the bundled one)")
    demo.add_argument("--per-class", type=int, default=75, help="conversations per defect class (twice as many normal)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=cmd_demo)
