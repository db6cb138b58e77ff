"""`EndpointEngine` against a small deterministic OpenAI-compatible server on 127.0.0.1 (random port).

The server (`StubServer`) is also used by the evaluation tests. Its answers depend only on the request:
model "chat-only" has no logprobs and no /inspect, "slow" never answers in time, "flaky" fails once with 503.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import threading
import time
from typing import Annotated

import numpy as np
import pytest
import uvicorn
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from assistant.client import EndpointEngine, EndpointError, to_messages
from assistant.engine import REFERENCE_INTRO, Conversation
from assistant.verdict import Verdict
from tests.conftest import defect_image

# First-token alternatives the stub reports: P(Yes) = 0.6 / 0.9, P(B) = 0.05 / 0.07 after renormalising.
TOP_LOGPROBS = {" Yes": 0.5, "Yes": 0.1, "No": 0.3, " B": 0.05, "A": 0.02}


def last_user_text(body: dict) -> str:
    content = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def decode_image(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L"), dtype=np.float32)


def stub_answer(body: dict) -> str:
    text = last_user_text(body)
    if "reply with 'Yes' or 'No'" in text:
        return "Yes, there is a defect."
    if "Following is new question list" in text:
        return "B"
    if "[Reference answer]" in text:
        return "7\nMostly consistent with the reference."
    return "The part shows a bright scratch near the top."


def stub_verdict(url: str) -> dict:
    """Bright pixels are the 'defect': score grows with their share, the heatmap is the brightness."""
    gray = decode_image(url)
    score = float(min(1.0, 20 * (gray > 200).mean()))
    return Verdict(anomalous=score >= 0.2, score=score, heatmap=gray / 255.0, reasoning="").model_dump(mode="json")


class StubServer:
    def __init__(self):
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.failed_once = False
        self._lock = threading.Lock()
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)
        self.app.post("/v1/inspect")(self.inspect)

    def reset(self) -> None:
        self.requests.clear()
        self.max_in_flight = 0
        self.failed_once = False

    def _completion(self, body: dict, answer: str) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
        if body.get("logprobs") and body["model"] != "chat-only":
            top = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in TOP_LOGPROBS.items()]
            choice["logprobs"] = {
                "content": [{"token": " Yes", "logprob": math.log(0.5), "bytes": None, "top_logprobs": top}]
            }
        return {"id": "stub", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice]}

    def _events(self, body: dict, answer: str):
        for piece in re.findall(r"\S+\s*", answer):
            delta = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            chunk = {
                "id": "stub",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body["model"],
                "choices": [delta],
            }
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    def chat(self, body: Annotated[dict, Body()]):  # sync handlers run in FastAPI's thread pool: requests overlap
        with self._lock:
            self.requests.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fail = body["model"] == "flaky" and not self.failed_once
            self.failed_once = self.failed_once or fail
        try:
            time.sleep(2 if body["model"] == "slow" else 0.05)
        finally:
            with self._lock:
                self.in_flight -= 1
        if fail:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        answer = stub_answer(body)
        if body.get("stream"):
            return StreamingResponse(self._events(body, answer), media_type="text/event-stream")
        return self._completion(body, answer)

    def inspect(self, body: Annotated[dict, Body()]):
        self.requests.append(body)
        if body["model"] == "chat-only":
            return JSONResponse({"error": {"message": "Not Found"}}, status_code=404)
        return stub_verdict(body["image_url"])


@pytest.fixture(scope="session")
def stub_server():
    """(base URL ending in /v1, StubServer) for a server running in a background thread."""
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
    url, stub = stub_server
    stub.reset()
    return url, stub


def engine_for(url: str, model: str = "stub", **kwargs) -> EndpointEngine:
    return EndpointEngine(url, model, **{"max_retries": 0, "timeout": 10, **kwargs})


def test_messages_carry_images_in_the_first_turn_like_the_local_template():
    reference, query = defect_image(40, 60, defect=False), defect_image(50, 70)
    conversation = Conversation.start(query, "Any defect?", references=[reference]).answer("Yes.").ask("Where?")
    messages = to_messages(conversation)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]  # no system message
    first = messages[0]["content"]
    assert [p["type"] for p in first] == ["text", "image_url", "image_url", "text"]
    assert first[0]["text"] == REFERENCE_INTRO.format(n=1) + "\n" and first[-1]["text"] == "Any defect?"
    assert [decode_image(p["image_url"]["url"]).shape for p in first[1:3]] == [(40, 60), (50, 70)]  # reference first
    assert messages[1]["content"] == "Yes." and messages[2]["content"] == "Where?"
    assert (
        to_messages(Conversation.start(query, "Hi"))[0]["content"][0]["type"] == "image_url"
    )  # no intro without references


def test_complete_is_concurrent_greedy_and_keeps_the_order(endpoint):
    url, stub = endpoint
    conversations = [
        Conversation.start(defect_image(30, 40, seed=s), q)
        for s, q in enumerate(["Hi?", "Following is new question list: x"] * 3)
    ]
    answers = engine_for(url, concurrency=3).complete(conversations, max_new_tokens=7)
    assert answers == [stub_answer({"messages": to_messages(c)}) for c in conversations]
    assert answers[1] == "B" and answers[0] != "B"
    assert 1 < stub.max_in_flight <= 3
    assert all(r["temperature"] == 0 and r["max_tokens"] == 7 for r in stub.requests)


def test_stream_yields_several_chunks_that_add_up_to_the_answer(endpoint):
    url, _ = endpoint
    engine = engine_for(url)
    conversation = Conversation.start(defect_image(30, 40), "Describe it.")
    chunks = list(engine.stream(conversation, max_new_tokens=20))
    assert len(chunks) > 3 and "".join(chunks) == engine.complete([conversation])[0]


def test_choice_probabilities_renormalise_first_token_logprobs(endpoint):
    url, stub = endpoint
    conversations = [Conversation.start(defect_image(30, 40), "Defect? Yes or No.")] * 2
    rows = engine_for(url).choice_probabilities(conversations, ["Yes", "No"])
    assert rows == [pytest.approx({"Yes": 0.6 / 0.9, "No": 0.3 / 0.9})] * 2  # " Yes" and "Yes" both count
    assert engine_for(url).choice_probabilities(conversations[:1], ["A", "B"])[0] == pytest.approx(
        {"A": 2 / 7, "B": 5 / 7}
    )
    assert engine_for(url).choice_probabilities(conversations[:1], ["C", "D"])[0] == {"C": 0.5, "D": 0.5}
    assert stub.requests[0]["logprobs"] is True and stub.requests[0]["top_logprobs"] == 20
    with pytest.raises(EndpointError, match="no logprobs"):
        engine_for(url, "chat-only").choice_probabilities(conversations[:1], ["Yes", "No"])


def test_analyze_returns_the_servers_verdict_as_an_analysis(endpoint):
    url, stub = endpoint
    image, reference = defect_image(60, 80), defect_image(60, 80, defect=False)
    analysis = engine_for(url).analyze(image, [reference])
    assert analysis.heatmap.shape == (60, 80) and analysis.score == pytest.approx(
        stub_verdict(stub.requests[0]["image_url"])["score"]
    )
    assert analysis.anomalous and analysis.score > engine_for(url).analyze(reference).score
    body = stub.requests[0]
    assert body["model"] == "stub" and body["question"] is None and body["max_tokens"] == 0
    assert decode_image(body["image_url"]).shape == (60, 80) and len(body["reference_urls"]) == 1
    with pytest.raises(EndpointError, match="serves chat only"):
        engine_for(url, "chat-only").analyze(image)


def test_unreachable_slow_and_flaky_servers(endpoint):
    url, stub = endpoint
    with pytest.raises(EndpointError, match=r"cannot reach http://127\.0\.0\.1:9/v1"):
        engine_for("http://127.0.0.1:9/v1").complete([Conversation.start(None, "Hi")])
    with pytest.raises(EndpointError, match=r"no answer within 0.5 s"):
        engine_for(url, "slow", timeout=0.5).complete([Conversation.start(None, "Hi")])
    with pytest.raises(EndpointError, match="HTTP 503"):
        engine_for(url, "flaky").complete([Conversation.start(None, "Hi")])
    stub.failed_once = False  # fail once more: the retry (with backoff) must get the answer
    assert engine_for(url, "flaky", max_retries=2).complete([Conversation.start(None, "Hi")]) == [
        stub_answer({"messages": [{"role": "user", "content": "Hi"}]})
    ]
