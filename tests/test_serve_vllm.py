"""vLLM serving end to end: one server per test checkpoint (ROI on, ROI off), started by `anomaly-assistant serve`.

Greedy token ids from the server (official `openai` client) must equal transformers' for the same
conversation; /v1/inspect must return the in-process Verdict; auth and bad input must be refused with a
reason while the server keeps serving. The test models' weights are scaled so their greedy answers depend
on every part of the image input (checked below), which makes token agreement a strong check.
"""

from __future__ import annotations

import base64
import http.server
import io
import threading
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from assistant.card import ModelCard
from assistant.client import EndpointEngine, data_url, to_messages
from assistant.engine import Conversation, LocalEngine, inspect
from assistant.factory import save_assistant, tiny_assistant
from assistant.image_io import MAX_BYTES
from assistant.prompts import stated_decision
from assistant.serve.plugin import OPEN_PATHS
from assistant.serve.process import ServerProcess, free_port
from assistant.verdict import Verdict
from tests.helpers import defect_image, served_tokens, transformers_tokens

API_KEY = "sk-test-assistant"
NAME = "tiny"
MAX_TOKENS = 12
QUESTION = "Are there any defects?"


def sensitive_tiny(roi: bool | dict, score_bias: float, text_model: str, seed: int = 2, **config):
    """A tiny model with LLM/projector weights ~N(0, 0.3): well-separated logits that react to image tokens."""
    model, processor = tiny_assistant(seed=seed, roi=roi, text_model=text_model, **config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and name.startswith(
                ("model.language_model", "lm_head", "model.multi_modal_projector")
            ):
                parameter.normal_(0, 0.3)
        model.anomaly_expert.selector.score_head[2].bias.fill_(score_bias)
    return model, processor


# ROI on, anomalous score (boxes, a defect turn), Qwen2, references read as base tokens; ROI off, normal score,
# Llama (the demo LLM's kind), references read with their own phrase and expert tokens.
# The ROI tokens come from the tiles for small images and from re-encoded crops for an 896 px one ("auto": its
# 896 px ROI source is finer than its 336 px tile canvas).
ROI = {"tokens_from": "auto", "source_max_side": 896}
CHECKPOINTS = {
    "roi": {"roi": ROI, "score_bias": 4.0, "text_model": "qwen2"},
    "no_roi": {"roi": False, "score_bias": -4.0, "text_model": "llama", "reference": {"prompt": "expert"}},
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("served")
    return {key: save_assistant(*sensitive_tiny(**spec), folder / key) for key, spec in CHECKPOINTS.items()}


@pytest.fixture(scope="session")
def local(checkpoints) -> dict[str, LocalEngine]:
    return {key: LocalEngine.from_pretrained(path, device="cpu") for key, path in checkpoints.items()}


def inspect_request(server: ServerProcess, body: dict, api_key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.post(f"{server.url}/inspect", json={"model": NAME, **body}, headers=headers, timeout=120)


def client(server: ServerProcess, api_key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=api_key, max_retries=0, timeout=120)


class ImageHost:
    """A loopback HTTP server the servers may fetch from (its port is allow-listed, with one closed port):
    /part.png, /huge.png (over the byte limit), /moved.png (a redirect to /part.png), 404 for anything else."""

    def __init__(self, png: bytes):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/moved.png":
                    self.send_response(302)
                    self.send_header("Location", "/part.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = {"/part.png": png, "/huge.png": bytes(MAX_BYTES + 1)}.get(self.path)
                self.send_response(404 if body is None else 200)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.closed_port = free_port()  # allow-listed, nothing listens there: an unreachable URL
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="session")
def image_host():
    host = ImageHost(png_bytes(defect_image(seed=14)))
    yield host
    host.server.shutdown()


@pytest.fixture(scope="session")
def servers(checkpoints, serving_python, image_host, tmp_path_factory) -> dict[str, ServerProcess]:
    """Both servers start together (start-up is mostly imports and process spawning) and stop at session end."""
    logs = tmp_path_factory.mktemp("server-logs")
    options = [
        "--python",
        serving_python,
        "--api-key",
        API_KEY,
        "--name",
        NAME,
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--kv-cache-gib",
        "1",
        "--allow-image-domain",
        f"127.0.0.1:{image_host.port}",  # the loopback image server, and nothing else on this machine
        "--allow-image-domain",
        f"127.0.0.1:{image_host.closed_port}",
    ]
    started = {key: ServerProcess(path, logs / f"{key}.log", options) for key, path in checkpoints.items()}
    try:
        for server in started.values():
            server.start()
        for server in started.values():
            server.wait_until_healthy()
        yield started
    finally:
        for server in started.values():
            server.stop()


# -- helpers ------------------------------------------------------------------------------------------------


def assert_agreement(server: ServerProcess, engine: LocalEngine, conversation: Conversation) -> str:
    prompt, answer, response = served_tokens(client(server), NAME, conversation, MAX_TOKENS)
    expected_prompt, expected_answer = transformers_tokens(engine, conversation, MAX_TOKENS)
    assert prompt == expected_prompt, "vLLM's prompt (placeholders, chat template) differs from the processor's"
    assert answer == expected_answer
    return response.choices[0].message.content


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_message(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
        }
    ]


# -- the test models are sensitive to what is checked (no server needed) -------------------------------------


def test_test_models_answers_depend_on_expert_and_roi_tokens(local):
    """Zeroing the expert or ROI embeddings changes transformers' greedy answer: agreement proves vLLM uses them."""
    for key, engine in local.items():
        conversation = Conversation.start(defect_image(), QUESTION)
        encoding = engine.encode(conversation.images)
        layout = encoding.layouts[0]
        parts = {"expert": slice(layout.num_base, layout.num_embeddings - layout.num_roi)}
        if layout.num_roi:
            parts["roi"] = slice(layout.num_embeddings - layout.num_roi, None)
        with torch.inference_mode():
            reference = engine.complete([conversation], MAX_TOKENS)[0]
            for part, rows in parts.items():
                original = encoding.embeddings.clone()
                encoding.embeddings[rows] = 0
                try:
                    assert engine.complete([conversation], MAX_TOKENS)[0] != reference, (
                        f"{key}: {part} tokens have no effect"
                    )
                finally:
                    encoding.embeddings.copy_(original)


def test_a_references_expert_tokens_change_the_answer(local):
    """`no_roi` reads a reference with its own phrase and expert tokens: zeroing them changes the answer."""
    engine = local["no_roi"]
    conversation = Conversation.start(defect_image(seed=2), QUESTION, [defect_image(80, 200, defect=False, seed=7)])
    encoding = engine.encode(conversation.images)
    layout = encoding.layouts[0]
    assert not layout.is_query and layout.num_expert
    with torch.inference_mode():
        answer = engine.complete([conversation], MAX_TOKENS)[0]
        original = encoding.embeddings.clone()
        encoding.embeddings[layout.num_base : layout.num_embeddings] = 0
        try:
            assert engine.complete([conversation], MAX_TOKENS)[0] != answer
        finally:
            encoding.embeddings.copy_(original)


# -- agreement --------------------------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.parametrize("key", ["roi", "no_roi"])
def test_greedy_tokens_match_transformers(servers, local, key):
    assert_agreement(servers[key], local[key], Conversation.start(defect_image(), QUESTION))


@pytest.mark.vllm
def test_greedy_tokens_match_with_reencoded_roi_crops(servers, local):
    """An image whose ROI source is finer than its tiles: "auto" re-encodes its crops in both backends."""
    assert_agreement(servers["roi"], local["roi"], Conversation.start(defect_image(896, 896), QUESTION))


@pytest.mark.vllm
@pytest.mark.parametrize("key", ["roi", "no_roi"])
def test_reference_image_after_it_was_a_query(servers, local, key):
    """The reference is first sent alone (cached as a query), then as a reference: its tokens must change role
    (to base tokens, or with `no_roi`'s `reference.prompt` "expert" to base, phrase and expert tokens)."""
    reference = defect_image(80, 200, defect=False, seed=7)  # its expert tokens change no_roi's answer (below)
    assert_agreement(servers[key], local[key], Conversation.start(reference, QUESTION))
    assert_agreement(servers[key], local[key], Conversation.start(defect_image(seed=2), QUESTION, [reference]))


@pytest.mark.vllm
def test_streamed_answer_matches(servers, local):
    conversation = Conversation.start(defect_image(150, 110, seed=5), QUESTION)
    stream = client(servers["roi"]).chat.completions.create(
        model=NAME, messages=to_messages(conversation), max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    chunks = [chunk for chunk in stream if chunk.choices]
    assert len(chunks) > 1
    streamed = [token for chunk in chunks for token in chunk.choices[0].model_extra.get("token_ids") or []]
    assert streamed == transformers_tokens(local["roi"], conversation, MAX_TOKENS)[1]


@pytest.mark.vllm
def test_two_turn_chat_matches(servers, local):
    conversation = Conversation.start(defect_image(seed=6), QUESTION)
    first = assert_agreement(servers["no_roi"], local["no_roi"], conversation)
    conversation.answer(first).ask("Where is it?")
    assert_agreement(servers["no_roi"], local["no_roi"], conversation)


# -- /v1/inspect and the client ----------------------------------------------------------------------------


def assert_same_verdict(served: Verdict, expected: Verdict) -> None:
    assert served.anomalous == expected.anomalous
    assert served.score == pytest.approx(expected.score, abs=1e-4)
    assert served.heatmap.shape == expected.heatmap.shape
    assert np.abs(served.heatmap - expected.heatmap).max() < 1e-3
    assert [(b.x0, b.y0, b.x1, b.y1) for b in served.boxes] == [(b.x0, b.y0, b.x1, b.y1) for b in expected.boxes]
    assert (served.reasoning, served.defect) == (expected.reasoning, expected.defect)
    assert served.expert_score == pytest.approx(expected.expert_score, abs=1e-4)
    assert served.llm_yes_probability == pytest.approx(expected.llm_yes_probability, abs=1e-4)  # exact logprobs
    assert stated_decision(served.reasoning) == served.anomalous  # one decision, text included


@pytest.mark.vllm
@pytest.mark.parametrize("key", ["roi", "no_roi"])
def test_inspect_returns_the_in_process_verdict(servers, local, key):
    image, reference = defect_image(130, 170, seed=8), defect_image(130, 170, defect=False, seed=9)
    response = inspect_request(
        servers[key], {"image_url": data_url(image), "reference_urls": [data_url(reference)], "max_tokens": 8}
    )
    assert response.status_code == 200, response.text
    served = Verdict.model_validate(response.json())
    assert_same_verdict(served, inspect(local[key], image, [reference], max_new_tokens=8))
    assert served.anomalous == (key == "roi") and bool(served.boxes) == served.anomalous  # the checkpoints' biases


@pytest.mark.vllm
def test_the_model_card_route_says_what_is_served(servers, checkpoints):
    server = servers["roi"]
    response = httpx.get(f"{server.url}/model-card", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert response.status_code == 200, response.text
    assert ModelCard.model_validate(response.json()) == ModelCard.load(checkpoints["roi"])
    assert httpx.get(f"{server.url}/model-card", timeout=30).status_code == 401  # the key guards it too
    assert EndpointEngine(server.url, NAME, api_key=API_KEY).model_card() == ModelCard.load(checkpoints["roi"])


@pytest.mark.vllm
def test_endpoint_engine_over_the_server(servers, local):
    """assistant.client.EndpointEngine: analysis (max_tokens 0) and answers equal the in-process engine's."""
    endpoint = EndpointEngine(servers["roi"].url, NAME, api_key=API_KEY)
    image = defect_image(seed=10)
    analysis, expected = endpoint.analyze(image), local["roi"].analyze(image)
    assert analysis.score == pytest.approx(expected.score, abs=1e-4) and analysis.boxes == expected.boxes
    conversation = Conversation.start(image, QUESTION)
    assert endpoint.complete([conversation], MAX_TOKENS) == local["roi"].complete([conversation], MAX_TOKENS)


# -- auth and bad input -------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_requests_without_the_key_are_refused(servers):
    server = servers["no_roi"]
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key="wrong").chat.completions.create(
            model=NAME, messages=image_message(data_url(defect_image()))
        )
    assert (
        inspect_request(server, {"image_url": data_url(defect_image()), "max_tokens": 0}, api_key=None).status_code
        == 401
    )
    assert inspect_request(server, {"image_url": data_url(defect_image()), "max_tokens": 0}).status_code == 200


@pytest.mark.vllm
def test_malformed_images_get_400_with_a_reason_and_the_server_keeps_serving(servers, local):
    server = servers["roi"]
    png = png_bytes(defect_image())
    bad_urls = {
        "not base64": "data:image/png;base64,%%%not-base64%%%",
        "not an image": "data:image/png;base64," + base64.b64encode(b"plain text, no pixels").decode(),
        "truncated": "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode(),
    }
    for case, url in bad_urls.items():
        with pytest.raises(openai.BadRequestError) as error:
            client(server).chat.completions.create(model=NAME, messages=image_message(url), max_tokens=4)
        assert error.value.status_code == 400 and error.value.message, case
        response = inspect_request(server, {"image_url": url})
        assert response.status_code == 400 and response.json()["error"]["message"].startswith("image"), (
            case,
            response.text,
        )
    response = inspect_request(server, {"image_url": "https://example.com/part.png"})
    assert response.status_code == 400 and "allow-list" in response.json()["error"]["message"]
    assert inspect_request(server, {"reference_urls": []}).status_code == 400  # no image at all
    assert inspect_request(server, {"model": "other", "image_url": data_url(defect_image())}).status_code == 404
    # Still serving, and still right.
    assert_agreement(server, local["roi"], Conversation.start(defect_image(seed=11), QUESTION))


# -- hardening: one bad request never stops the server; one status code per kind of bad input ---------------


@pytest.mark.vllm
def test_a_thin_image_is_answered_and_the_engine_keeps_serving(servers, local):
    """A 50x2000 strip once emptied the tile heatmap inside the engine, which then failed every later request."""
    server = servers["roi"]
    for size in [(50, 2000), (2000, 3)]:
        thin = defect_image(*size, seed=12)
        assert_agreement(server, local["roi"], Conversation.start(thin, QUESTION))
        response = inspect_request(server, {"image_url": data_url(thin), "max_tokens": 0})
        assert response.status_code == 200, response.text
        assert Verdict.model_validate(response.json()).heatmap.shape == size
    assert httpx.get(server.url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
    assert_agreement(server, local["roi"], Conversation.start(defect_image(seed=13), QUESTION))


def bad_image_urls(image_host: ImageHost) -> dict[str, tuple[str, int]]:
    """The status-code table of docs/serving.md: case -> (image URL, expected status)."""

    def b64(data: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(data).decode()

    bomb = png_bytes(defect_image(20, 20).convert("1").resize((9000, 9000)))  # 81 MP: tiny on disk
    return {
        "malformed image": (b64(b"plain text, no pixels"), 400),
        "bad base64": ("data:image/png;base64,%%%not-base64%%%", 400),
        "data URL without base64": ("data:image/png,rawpixels", 400),
        "unsupported scheme": ("ftp://127.0.0.1/part.png", 400),
        "file URL": ("file:///etc/hostname", 400),
        "host not allow-listed": (f"http://localhost:{image_host.port}/part.png", 400),
        "port not allow-listed": (f"http://127.0.0.1:{free_port()}/part.png", 400),
        "user info": (f"http://user@127.0.0.1:{image_host.port}/part.png", 400),
        "backslash": (f"http://169.254.169.254\\@127.0.0.1:{image_host.port}/part.png", 400),
        "unreachable URL": (f"http://127.0.0.1:{image_host.closed_port}/part.png", 400),
        "missing on the host": (f"http://127.0.0.1:{image_host.port}/nothing.png", 400),
        "a redirect": (f"http://127.0.0.1:{image_host.port}/moved.png", 400),
        "URL over the byte limit": (f"http://127.0.0.1:{image_host.port}/huge.png", 413),
        "over the pixel limit": (b64(bomb), 413),
        "over the byte limit": (b64(bytes(MAX_BYTES + 1)), 413),
    }


@pytest.mark.vllm
def test_every_kind_of_bad_image_gets_its_status_and_a_reason(servers, local, image_host):
    server = servers["roi"]
    for case, (url, status) in bad_image_urls(image_host).items():
        chat = httpx.post(
            f"{server.url}/chat/completions",
            json={"model": NAME, "messages": image_message(url), "max_tokens": 2},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=120,
        )
        inspected = inspect_request(server, {"image_url": url, "max_tokens": 0})
        for route, response in (("chat", chat), ("inspect", inspected)):
            assert response.status_code == status, (case, route, response.text[:300])
            assert response.json()["error"]["message"], (case, route)
    too_many = inspect_request(server, {"image_url": data_url(defect_image()), "reference_urls": ["x"] * 4})
    assert too_many.status_code == 400 and "At most 4 image(s)" in too_many.json()["error"]["message"]
    assert httpx.get(server.url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
    assert_agreement(server, local["roi"], Conversation.start(defect_image(seed=15), QUESTION))


@pytest.mark.vllm
def test_an_allow_listed_url_is_fetched_like_a_data_url(servers, local, image_host):
    server = servers["roi"]
    url = f"http://127.0.0.1:{image_host.port}/part.png"
    fetched = client(server).chat.completions.create(
        model=NAME, messages=image_message(url), max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    conversation = Conversation.start(defect_image(seed=14), QUESTION)
    assert fetched.choices[0].model_extra["token_ids"] == transformers_tokens(local["roi"], conversation, MAX_TOKENS)[1]
    response = inspect_request(server, {"image_url": url, "max_tokens": 0})
    assert response.status_code == 200, response.text
    expected = local["roi"].analyze(defect_image(seed=14))
    assert Verdict.model_validate(response.json()).score == pytest.approx(expected.score, abs=1e-4)


def live_routes(server: ServerProcess) -> set[tuple[str, str]]:
    """(method, path) of every route the running server lists in its OpenAPI schema, plus FastAPI's docs."""
    schema = httpx.get(
        server.url.removesuffix("/v1") + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    )
    assert schema.status_code == 200, schema.text[:300]
    routes = {(method.upper(), path) for path, operations in schema.json()["paths"].items() for method in operations}
    return routes | {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/docs/oauth2-redirect")}


@pytest.mark.vllm
def test_the_key_guards_every_route_but_the_open_probes(servers):
    server = servers["no_roi"]
    base = server.url.removesuffix("/v1")
    routes = live_routes(server)
    paths = {path for _, path in routes}
    assert {"/v1/chat/completions", "/v1/inspect", "/v1/profiles", "/invocations", "/tokenize", "/v1/models"} <= paths
    guarded = 0
    for method, path in sorted(routes):
        if path in OPEN_PATHS:
            continue
        url = base + path.replace("{", "").replace("}", "")  # path parameters get a placeholder value
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            response = httpx.request(method, url, headers=headers, json={}, timeout=30)
            assert response.status_code == 401, (method, path, headers, response.status_code, response.text[:200])
        guarded += 1
    assert guarded >= 20
    # A path no route has yet (a later vLLM's) is guarded too; the probes stay open.
    assert httpx.post(base + "/v9/some-new-route", json={}, timeout=10).status_code == 401
    assert httpx.get(base + "/health", timeout=10).status_code == 200
    invoked = httpx.post(
        base + "/invocations",
        json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )
    assert invoked.status_code == 200, invoked.text[:300]
