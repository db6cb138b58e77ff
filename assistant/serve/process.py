"""`anomaly-assistant serve` as a managed child process, for tests, benchmarks and scripts.

vLLM starts an engine process and workers below its API server; the server runs in its own session so
stopping it stops the whole group, and nothing outlives the `with` block.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """Start with `with ServerProcess(model, ...) as server:`; `server.url` is the OpenAI base URL (…/v1)."""

    def __init__(self, model: str | Path, log: Path, serve_args: Sequence[str] = (), host: str = "127.0.0.1"):
        self.model = Path(model)
        self.log = log
        self.serve_args = list(serve_args)  # any `anomaly-assistant serve` options (--python, --api-key, ...)
        self.host = host
        self.port = free_port(host)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "assistant",
            "serve",
            "--model",
            str(self.model),
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        with self.log.open("w") as output:
            self.process = subprocess.Popen(
                command + self.serve_args, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_until_healthy(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"the server was not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, characters: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-characters:]

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to the group (vLLM shuts its engine down), SIGKILL to whatever is left after `timeout`."""
        if self.process is None or not self._group_alive():
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._group_alive() and time.monotonic() < deadline:
            self.process.poll()  # reap the leader so the group can empty
            time.sleep(0.2)
        if self._group_alive():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
