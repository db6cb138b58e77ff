"""The chat app (assistant/ui, app.py) driven through gradio_client, as an API user or the browser would.

The app runs in-process around a tiny random model whose expert is biased to call everything anomalous,
so the verdict, heatmap and boxes are all present and the answers are deterministic (greedy).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageDraw

from assistant.defaults import MODEL_ENV
from assistant.engine import Conversation, LocalEngine
from assistant.errors import UsageError
from assistant.prompts import INSPECTION_QUESTION
from assistant.serve.process import free_port
from assistant.ui import build_demo, launch, load_backend
from assistant.ui.backend import NO_WEIGHTS_NOTICE
from assistant.ui.blocks import SESSION_TTL_S
from assistant.ui.handlers import ChatHandlers
from assistant.ui.views import make_preview, verdict_label
from assistant.verdict import Box, Verdict
from tests.helpers import ROOT, defect_image, expected_answer, wait_for_app


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """gradio_client's Client() asks huggingface_hub for headers, which may fetch a registry online unless
    these switches are on; the hub read them from the environment at import, so they are set directly."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_DISABLE_TELEMETRY", True)


def connect(url: str) -> Client:
    return Client(url, verbose=False, download_files=False, analytics_enabled=False)


@pytest.fixture
def client(app_url):
    """A fresh API session (its own gr.State), like a new browser tab."""
    return connect(app_url)


@pytest.fixture(scope="module")
def part(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("uploads") / "part.png"
    defect_image().save(path)
    return str(path)


def ask(client: Client, question: str, image: str | None, reference: str | None = None, opacity: float = 0.5):
    return client.predict(
        question,
        image and handle_file(image),
        reference and handle_file(reference),
        opacity,
        api_name="/chat",
    )


def text_of(message: dict) -> str:
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def test_first_question_streams_the_answer_beside_verdict_heatmap_and_boxes(client, app_engine, part):
    job = client.submit("Is there a defect?", handle_file(part), None, 0.5, api_name="/chat")
    chunks = list(job)
    history, question_box, label, domain, heatmap, rois = job.result()

    assert len(chunks) >= 3  # the panel first, then the answer as it grows, then everything again
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert [p["type"] for p in history[0]["content"]] == ["file", "text"]  # the photo opens the chat
    assert text_of(history[1]) == expected_answer(app_engine, Conversation.start(part, "Is there a defect?"))
    assert question_box["value"] == "" and question_box["interactive"] is False  # unlocked by the next event
    analysis = app_engine.analyze(part)
    assert label["label"] == "Anomalous"
    assert {c["label"]: c["confidence"] for c in label["confidences"]} == pytest.approx(
        {"Anomalous": analysis.score, "Normal": 1 - analysis.score}
    )
    assert domain.startswith("**Domain unknown:**")  # the tiny model carries no domain statistics
    assert Image.open(heatmap["path"]).size == (160, 120)
    assert analysis.boxes and len(rois["annotations"]) == len(analysis.boxes)
    assert rois["annotations"][0]["label"].startswith("region 1 · peak")


def test_follow_up_keeps_the_conversation_and_the_encoded_image(client, app_engine, part, monkeypatch):
    first = text_of(ask(client, "Is there a defect?", part)[0][1])
    calls = []
    encode = app_engine.model.encode_images
    monkeypatch.setattr(app_engine.model, "encode_images", lambda **inputs: calls.append(1) or encode(**inputs))

    history, _, label, _, _, _ = ask(client, "Where is it?", part)

    assert calls == []  # the cached encoding of the first turn answered the second
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert [text_of(m) for m in history[:3]] == ["Is there a defect?", first, "Where is it?"]
    both_turns = Conversation.start(part, "Is there a defect?").answer(first).ask("Where is it?")
    assert text_of(history[3]) == expected_answer(app_engine, both_turns)
    assert label["label"] == "Anomalous"


def test_new_upload_starts_a_new_conversation(client, part, tmp_path):
    other = tmp_path / "other.png"
    defect_image(seed=3).save(other)
    ask(client, "Is there a defect?", part)
    history = ask(client, "And this one?", str(other))[0]
    assert [text_of(m) for m in history[:1]] == ["And this one?"]
    assert len(history) == 2


def test_empty_question_asks_for_a_full_inspection(client, part):
    history = ask(client, "   ", part)[0]
    assert text_of(history[0]) == INSPECTION_QUESTION


def test_opacity_reblends_the_heatmap_over_the_photo(client, app_engine, part):
    ask(client, "Is there a defect?", part)
    photo = np.asarray(Image.open(part).convert("RGB"), dtype=np.int16)
    photo_only = np.asarray(Image.open(client.predict(0.0, api_name="/reblend")["path"]).convert("RGB"), dtype=np.int16)
    heat_only = np.asarray(Image.open(client.predict(1.0, api_name="/reblend")["path"]).convert("RGB"), dtype=np.int16)
    outlines = Image.new("L", (photo.shape[1], photo.shape[0]))
    for box in app_engine.analyze(part).boxes:  # box outlines are drawn at every opacity
        ImageDraw.Draw(outlines).rectangle((box.x0 - 3, box.y0 - 3, box.x1 + 2, box.y1 + 2), outline=255, width=7)
    elsewhere = np.asarray(outlines) == 0
    assert elsewhere.mean() > 0.5
    assert np.array_equal(photo_only[elsewhere], photo[elsewhere])
    assert np.abs(heat_only - photo)[elsewhere].mean() > 20


def test_reblend_before_any_question_changes_nothing(client):
    assert client.predict(0.8, api_name="/reblend") == {"__type__": "update"}


def test_reset_empties_chat_verdict_and_uploads(client, part):
    ask(client, "Is there a defect?", part)
    chat, label, domain, heatmap, rois, question, image, reference = client.predict(api_name="/reset")
    assert chat == [] and label == {} and domain == "" and heatmap is None and rois is None
    assert question == "" and image is None and reference is None
    assert client.predict(0.3, api_name="/reblend") == {"__type__": "update"}  # the session went too


def test_unusable_uploads_are_refused_with_a_readable_reason(client, part, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a picture")
    truncated = tmp_path / "truncated.png"
    defect_image().save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    huge = tmp_path / "huge.png"
    Image.new("L", (9000, 8000)).save(huge)  # 72 MP, a few hundred kB of zeros
    too_big = tmp_path / "big.png"
    too_big.write_bytes(os.urandom(21 * 2**20))

    with pytest.raises(AppError, match="Upload an image"):
        ask(client, "Is there a defect?", None)
    with pytest.raises(AppError, match="not a recognised image format"):
        ask(client, "Is there a defect?", str(not_image))
    with pytest.raises(AppError, match="corrupt or truncated"):
        ask(client, "Is there a defect?", str(truncated))
    with pytest.raises(AppError, match="megapixel limit"):
        ask(client, "Is there a defect?", str(huge))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        ask(client, "Is there a defect?", str(too_big))
    with pytest.raises(AppError, match="reference 1: not a recognised image format"):
        ask(client, "Is there a defect?", part, str(not_image))


def test_without_trained_weights_the_app_runs_a_random_model_and_says_so(monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)
    monkeypatch.setattr("assistant.ui.backend.default_model_path", lambda: None)
    backend = load_backend()
    assert isinstance(backend.engine, LocalEngine) and backend.notice == NO_WEIGHTS_NOTICE
    demo = build_demo(backend.engine, notice=backend.notice, backend=backend.description)
    shown = [c["props"].get("value") for c in demo.config["components"] if c["props"].get("elem_id") == "notice"]
    assert shown and "No trained weights found" in shown[0]


def test_a_model_the_user_named_must_exist(tmp_path):
    with pytest.raises(UsageError, match="not a model folder"):
        load_backend(model=str(tmp_path))
    with pytest.raises(UsageError, match="--served-model"):
        load_backend(endpoint="http://127.0.0.1:9/v1")


def test_endpoint_backend_chats_and_shows_the_servers_verdict(stub_server, part):
    url, _ = stub_server
    backend = load_backend(endpoint=url, served_model="stub")
    demo = build_demo(backend.engine, backend=backend.description)
    try:
        app = connect(launch(demo, port=free_port(), block=False))
        history, _, label, domain, heatmap, _ = ask(app, "Is there a defect?", part)
    finally:
        demo.close()
    assert text_of(history[-1]) == "The part shows a bright scratch near the top."
    # The stub calls a score of 0.2 anomalous: the label must follow that decision, not the larger class.
    assert label["label"].startswith("Anomalous (anomaly score 0.")
    assert domain.startswith("**Domain unknown:**")  # the tiny model carries no domain statistics
    assert Image.open(heatmap["path"]).size == (160, 120)


def test_large_photos_are_shown_scaled_down_with_their_boxes():
    photo = Image.new("RGB", (4000, 1000))
    box = Box(x0=3990, y0=0, x1=4000, y1=3, score=0.9)
    verdict = Verdict(score=0.9, anomalous=True, heatmap=np.ones((1000, 4000), np.float32), boxes=[box])
    preview = make_preview(photo, verdict, max_side=1024)
    assert preview.image.size == (1024, 256) and preview.verdict.heatmap.shape == (256, 1024)
    assert [box.corners for box in preview.verdict.boxes] == [(1021, 0, 1024, 1)]


def test_the_label_heading_is_always_the_models_decision():
    def label(score: float, anomalous: bool):
        return verdict_label(Verdict(score=score, anomalous=anomalous, heatmap=np.zeros((2, 2)), boxes=[]))

    assert label(0.8, True) == {"Anomalous": 0.8, "Normal": pytest.approx(0.2)}
    assert label(0.3, False) == {"Anomalous": 0.3, "Normal": 0.7}
    assert label(0.4, True) == "Anomalous (anomaly score 0.40)"  # a decision threshold below 0.5
    assert label(0.6, False) == "Normal (anomaly score 0.60)"


def test_app_py_serves_the_app_on_the_given_model(tiny_path, part, tmp_path):
    port, log = free_port(), tmp_path / "app.log"
    command = [sys.executable, "app.py", "--model", str(tiny_path), "--port", str(port), "--max-new-tokens", "4"]
    with log.open("w") as output:
        server = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_app(server, port, log, timeout=120)
        history, _, label, _, _, _ = ask(connect(f"http://127.0.0.1:{port}/"), "Is there a defect?", part)
        assert label["label"] in ("Normal", "Anomalous") and history[-1]["role"] == "assistant"
        assert f"backend: in-process model `{tiny_path}`" in log.read_text()
    finally:
        server.terminate()
        server.wait(10)


class FailingEngine:
    """The app's engine, failing the way a bug would: in the analysis, or after the answer began to stream."""

    def __init__(self, engine: LocalEngine, where: str):
        self.engine, self.where = engine, where

    def analyze(self, image, references=()):
        if self.where == "analysis":
            raise RuntimeError("shape '[1, 4, 4]' is invalid for input of size 12\nsee the shape above")
        return self.engine.analyze(image, references)

    def stream(self, conversation, max_new_tokens=256):
        yield "The part"
        raise IndexError("index 7 is out of bounds for dimension 0 with size 7")


@pytest.mark.parametrize(
    "where, line",
    [
        ("analysis", "RuntimeError: shape '[1, 4, 4]' is invalid for input of size 12"),
        ("answer", "IndexError: index 7 is out of bounds for dimension 0 with size 7"),
    ],
)
def test_an_unexpected_failure_reaches_the_user_as_one_line(app_engine, part, where, line, caplog):
    demo = build_demo(FailingEngine(app_engine, where), max_new_tokens=4)
    try:
        app = connect(launch(demo, port=free_port(), block=False))
        with pytest.raises(AppError) as error:
            ask(app, "Is there a defect?", part)
    finally:
        demo.close()
    assert str(error.value) == f"Something went wrong: {line} (details in the app's log)"
    assert "Traceback" in caplog.text  # the details are in the log, for whoever runs the app


def reachable_bytes(value, seen=None) -> int:
    """Bytes of the arrays and images a session value holds, through dataclasses and containers."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, Image.Image):
        return value.width * value.height * len(value.getbands())
    if dataclasses.is_dataclass(value):
        return sum(reachable_bytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return sum(reachable_bytes(item, seen) for item in value)
    if isinstance(value, dict):
        return sum(reachable_bytes(item, seen) for item in value.values())
    return 0


def test_a_session_holds_its_panel_at_display_size_and_expires(app_engine, tmp_path):
    """A 12-megapixel upload (48 MB as RGB + float heatmap) costs its session little more than a 1024 px preview."""
    photo = tmp_path / "large.png"
    defect_image(3000, 4000).save(photo)
    handlers = ChatHandlers(app_engine, max_new_tokens=2)
    outputs = list(
        handlers.chat("Is there a defect?", {"path": str(photo)}, None, 0.5, None, None, lambda *a, **k: None)
    )
    session = outputs[-1][-1]
    assert session.preview.image.size == (1024, 768) and session.preview.verdict.heatmap.shape == (768, 1024)
    assert reachable_bytes(session) <= 1.05 * 1024 * 768 * (3 + 4)  # the RGB preview and its float32 heatmap
    follow_up = list(handlers.chat("Where?", {"path": str(photo)}, None, 0.5, None, session, lambda *a, **k: None))
    assert [m["role"] for m in follow_up[-1][-1].messages] == ["user", "assistant", "user", "assistant"]
    demo = build_demo(app_engine)
    states = [block for block in demo.blocks.values() if isinstance(block, gr.State)]
    assert [state.time_to_live for state in states] == [SESSION_TTL_S]


def test_a_url_instead_of_an_upload_is_refused_before_anything_is_fetched(client, part, monkeypatch):
    """Through the API a client can send a URL where a file goes; Gradio would download it on the server."""
    import gradio.processing_utils

    downloads = []

    async def download(url, *args, **kwargs):
        downloads.append(url)
        raise AssertionError("the app fetched a URL")

    monkeypatch.setattr(gradio.processing_utils, "async_ssrf_protected_download", download)
    for url in ("https://example.com/part.png", "http://127.0.0.1:9/part.png"):
        payload = {"path": url, "url": url, "meta": {"_type": "gradio.FileData"}}
        with pytest.raises(AppError, match="uploaded image files only"):
            client.predict("Is there a defect?", payload, None, 0.5, api_name="/chat")
        with pytest.raises(AppError, match="uploaded image files only"):
            client.predict("Is there a defect?", handle_file(part), payload, 0.5, api_name="/chat")
    assert downloads == []
