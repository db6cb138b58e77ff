"""Cold start on the demo model: a first verdict from a fresh process, and the app's time to its first answer.

Each row runs its command as a new process N times (after one warm-up run that fills the caches: the base LLM's
conversion and the merged weights) and prints the median, min and max wall seconds:

    import floor       `import torch` and stock transformers LLaVA-OneVision's modeling module: what any
                       transformers-based inspect pays before it does anything
    import engine      `import assistant.engine` (everything the inspect path imports)
    inspect            `anomaly-assistant inspect IMAGE --json`: load, verdict (P(Yes) + the expert), reasoning and
                       defect turns
    app first answer   `python app.py` started, until its first chat answer (gradio_client, /chat) has arrived

    python benchmarks/bench_cold_start.py                 # 5 runs each, the demo's global-defect example
    python benchmarks/bench_cold_start.py --runs 3 --skip-app
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "assistant" / "weights" / "demo" / "examples" / "global_defect.jpg"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
FLOOR = "import torch; import transformers.models.llava_onevision.modeling_llava_onevision"


def timed_process(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def app_first_answer(port: int) -> float:
    """Seconds from starting the app to its first answer."""
    from gradio_client import Client, handle_file

    start = time.perf_counter()
    app = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:
            if app.poll() is not None:
                raise SystemExit(f"the app exited with {app.returncode}")
            try:
                client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
                break
            except Exception:  # not up yet
                time.sleep(0.2)
        client.predict("Is there a defect?", handle_file(str(IMAGE)), None, 0.5, None, api_name="/chat")
        return time.perf_counter() - start
    finally:
        app.terminate()
        app.wait(timeout=60)


def row(name: str, measure, runs: int) -> str:
    measure()  # warm-up: caches filled, files in the page cache
    seconds = [measure() for _ in range(runs)]
    return f"| {name} | {statistics.median(seconds):.2f} | {min(seconds):.2f} | {max(seconds):.2f} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-app", action="store_true")
    parser.add_argument("--port", type=int, default=7873)
    args = parser.parse_args(argv)
    os.environ.update(OFFLINE)
    cli = [sys.executable, "-m", "assistant"]
    rows = {
        "import floor (torch + transformers LLaVA-OneVision)": lambda: timed_process([sys.executable, "-c", FLOOR]),
        "import assistant.engine": lambda: timed_process([sys.executable, "-c", "import assistant.engine"]),
        "anomaly-assistant inspect IMAGE --json": lambda: timed_process([*cli, "inspect", str(IMAGE), "--json"]),
    }
    if not args.skip_app:
        rows["app: start to first answer"] = lambda: app_first_answer(args.port)
    threads = os.environ.get("OMP_NUM_THREADS", "all cores")
    print(f"demo model, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}, {args.runs} runs after one warm-up")
    print("| fresh process | median (s) | min (s) | max (s) |\n|---|---|---|---|", flush=True)
    for name, measure in rows.items():
        print(row(name, measure, args.runs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
