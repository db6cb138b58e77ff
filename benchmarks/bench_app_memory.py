"""Resident memory of the chat app while N sessions each hold a maximum-size upload.

Starts `python app.py` on a tiny random model (or --model), opens N API sessions with gradio_client (one
gr.State each, like N browser tabs), sends each an 8000 x 8000 image (the 64-megapixel limit; a flat PNG of
a few hundred KB, as a uniform product photo compresses) and one question, and prints the app's RSS before
and after. Run it on two commits to compare them:

    python benchmarks/bench_app_memory.py                 # 8 sessions, tiny random model
    python benchmarks/bench_app_memory.py --sessions 4 --side 4000 --model assistant/weights/demo
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def rss_mib(pid: int) -> float:
    """RSS of the app and its children (Gradio may start helpers), in MiB."""
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the app exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the app did not answer at {url} within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--side", type=int, default=8000, help="upload side in pixels (8000: the pixel limit)")
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random model written to a temp folder)")
    parser.add_argument("--port", type=int, default=7871)
    args = parser.parse_args()
    os.environ.update(OFFLINE)

    from gradio_client import Client, handle_file

    from assistant.factory import save_assistant, tiny_assistant

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or str(save_assistant(*tiny_assistant(seed=0), Path(scratch) / "tiny"))
        upload = Path(scratch) / "upload.png"
        Image.new("RGB", (args.side, args.side), (128, 120, 110)).save(upload)
        upload_kb = upload.stat().st_size // 1024
        command = [sys.executable, str(ROOT / "app.py"), "--model", model, "--port", str(args.port)]
        command += ["--max-new-tokens", "4"]
        app = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{args.port}/"
            wait_until_up(url, app)
            idle = rss_mib(app.pid)
            clients, rows = [], []
            for number in range(1, args.sessions + 1):
                client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
                client.predict("Is there a defect?", handle_file(str(upload)), None, 0.5, api_name="/chat")
                clients.append(client)  # the session stays open, holding its state
                rows.append((number, rss_mib(app.pid)))
        finally:
            app.terminate()
            app.wait(timeout=60)
    print(f"app RSS, {args.side}x{args.side} uploads ({args.side**2 / 1e6:.1f} MP, {upload_kb} KB "
          f"on disk), model {'tiny random' if not args.model else args.model}")
    print("| sessions holding an upload | app RSS (MiB) | added by the last session (MiB) |")
    print("|---|---|---|")
    print(f"| 0 (idle) | {idle:.0f} | - |")
    previous = idle
    for number, rss in rows:
        print(f"| {number} | {rss:.0f} | {rss - previous:+.0f} |")
        previous = rss


if __name__ == "__main__":
    main()
