"""The anomaly inspection chat app: `python app.py` serves it at http://127.0.0.1:7860.

    python app.py                                  # in-process: $ANOMALY_ASSISTANT_MODEL, else the demo model
    python app.py --model runs/ckpt --device cuda  # a checkpoint folder of your own
    python app.py --endpoint http://localhost:8000/v1 --served-model anomaly-assistant  # the project's server

Product profiles enrolled in the model's folder (`anomaly-assistant enroll NAME --images DIR --model CKPT`), or
listed by the server, appear in the "Product profile" picker. Options, backends and limits: docs/app.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from assistant.defaults import MODEL_HELP
from assistant.options import add_settings_argument, run_settings

# Read when gradio and huggingface_hub are imported: no version checks, analytics or telemetry. Downloads stay
# allowed: `--model PRESET` may pull weights (set HF_HUB_OFFLINE=1 to forbid it).
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    backend = parser.add_mutually_exclusive_group()
    backend.add_argument("--model", help=MODEL_HELP)
    backend.add_argument("--endpoint", help="base URL of the project's server, e.g. http://localhost:8000/v1")
    parser.add_argument("--served-model", help="model name on the endpoint (required with --endpoint)")
    parser.add_argument("--api-key", help="endpoint API key (default: $OPENAI_API_KEY)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... for the in-process model (default: cuda if present)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on; 0.0.0.0 opens it to the network")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    add_settings_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    from assistant.errors import AssistantError
    from assistant.ui import build_demo, launch, load_backend

    try:
        settings = run_settings(args)
        backend = load_backend(args.model, args.endpoint, args.served_model, args.api_key, args.device, settings)
    except (AssistantError, FileNotFoundError, ValueError) as error:  # e.g. settings the model cannot run with
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"backend: {backend.description}", flush=True)
    demo = build_demo(
        backend.engine,
        backend.notice,
        backend.description,
        args.max_new_tokens,
        backend.card,
        backend.examples,
        profiles=backend.profiles,
    )
    launch(demo, args.host, args.port, examples=backend.examples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
