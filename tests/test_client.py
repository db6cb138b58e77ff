"""`EndpointEngine` against a small deterministic OpenAI-compatible server on 127.0.0.1 (random port).

The server is `tests.helpers.StubServer` (the `endpoint` fixture): model "chat-only" has no logprobs and no
/inspect, "slow" never answers in time, "flaky" fails once with 503.
"""

from __future__ import annotations

import pytest

from assistant.client import EndpointEngine, EndpointError, to_messages
from assistant.engine import REFERENCE_INTRO, Conversation
from tests.helpers import decode_image, defect_image, stub_answer, stub_verdict


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
