"""The in-process engine (streaming, multi-turn, batching, choice probabilities) and the CLI."""

import json
import threading
import time

import numpy as np
import pytest
import torch

from assistant.cli import main
from assistant.engine import Conversation, LocalEngine, inspect
from assistant.prompts import DEFECT_QUESTION, INSPECTION_QUESTION
from assistant.verdict import Verdict
from tests.helpers import defect_image


@pytest.fixture(scope="module")
def engine(tiny_path):
    return LocalEngine.from_pretrained(tiny_path, device="cpu")


def test_streamed_answer_equals_the_batch_answer(engine):
    conversation = Conversation.start(defect_image(), "Are there any defects?")
    streamed = "".join(engine.stream(conversation, max_new_tokens=12))
    assert streamed == engine.complete([conversation], max_new_tokens=12)[0]


def test_a_stream_closed_early_stops_its_generation(engine):
    before = threading.active_count()
    chunks = engine.stream(Conversation.start(defect_image(), "Describe the part."), max_new_tokens=400)
    next(chunks)
    started = time.monotonic()
    chunks.close()  # the reader went away, e.g. a closed browser tab
    assert threading.active_count() == before  # the generating thread has ended, not left running
    assert time.monotonic() - started < 5
    assert engine._lock.acquire(blocking=False)  # the model is free for the next caller
    engine._lock.release()


def test_batched_answers_equal_single_answers(engine):
    first = Conversation.start(defect_image(90, 150), "Any defect?")
    second = Conversation.start(defect_image(seed=4), "Describe the part.", references=[defect_image(defect=False)])
    batch = engine.complete([first, second], max_new_tokens=8)
    assert batch == [engine.complete([first], 8)[0], engine.complete([second], 8)[0]]


def test_follow_up_turns_reuse_the_cached_image(engine, monkeypatch):
    conversation = Conversation.start(defect_image(seed=7), "Is it defective?")
    answer = engine.complete([conversation], 6)[0]
    calls = []
    original = engine.model.encode_images
    monkeypatch.setattr(engine.model, "encode_images", lambda **kw: calls.append(1) or original(**kw))
    conversation.answer(answer).ask("Where is the defect?")
    follow_up = engine.complete([conversation], 6)[0]
    assert calls == [] and isinstance(follow_up, str)
    # The history changes the prompt, so the model sees both turns.
    texts = engine.processor.apply_chat_template(conversation.chat(), add_generation_prompt=True, tokenize=False)
    assert texts.count("<|im_start|>user") == 2 and texts.count("<image>") == 1


def prefilled_lengths(engine: LocalEngine) -> list[int]:
    """Records the tokens each language-model forward is given (the first one of a generation is its prefill)."""
    lengths: list[int] = []
    engine.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    return lengths


@pytest.mark.parametrize("streamed", [False, True])
def test_the_next_turn_continues_the_last_turns_kv_cache(tiny_path, streamed):
    """A follow-up prefills only its new tokens (not the image's again) and answers exactly as a fresh engine."""
    image = defect_image()
    reusing, fresh = (LocalEngine.from_pretrained(tiny_path, device="cpu") for _ in range(2))

    def answer(engine: LocalEngine, conversation: Conversation) -> str:
        if streamed:
            return "".join(engine.stream(conversation, max_new_tokens=6))
        return engine.complete([conversation], max_new_tokens=6)[0]

    first = answer(reusing, Conversation.start(image, INSPECTION_QUESTION))
    follow_up = Conversation.start(image, INSPECTION_QUESTION).answer(first).ask(DEFECT_QUESTION)
    lengths, fresh_lengths = prefilled_lengths(reusing), prefilled_lengths(fresh)
    assert answer(reusing, follow_up) == answer(fresh, follow_up)
    full = fresh_lengths[0]
    assert full > reusing.processor.layout((image.height, image.width)).num_embeddings
    assert lengths[0] < 40 < full  # the new turn's tokens only


def test_inspect_prefills_the_image_once(tiny_path, monkeypatch):
    """P(Yes), the reasoning and the defect turn share the image's prefill, and answer as without the sharing."""
    from assistant import engine as engine_module

    image = defect_image()
    reusing = LocalEngine.from_pretrained(tiny_path, device="cpu")
    torch.nn.init.constant_(reusing.model.anomaly_expert.selector.score_head[2].bias, 8.0)  # anomalous: a defect turn
    lengths = prefilled_lengths(reusing)
    shared = inspect(reusing, image, max_new_tokens=6)
    image_tokens = reusing.processor.layout((image.height, image.width)).num_embeddings
    prefills = [n for n in lengths if n > 1]  # decode steps feed one token each
    assert prefills[0] > image_tokens and all(n < image_tokens for n in prefills[1:]) and len(prefills) >= 3
    monkeypatch.setattr(engine_module, "_common_prefix", lambda first, second: 0)
    again = inspect(reusing, image, max_new_tokens=6)
    assert shared.defect is not None
    assert (again.reasoning, again.defect, again.score) == (shared.reasoning, shared.defect, shared.score)


def test_another_image_of_the_same_size_is_prefilled_in_full(tiny_path):
    """Token ids alone cannot tell two images apart (the same placeholders): the cache is keyed by the images too."""
    engine = LocalEngine.from_pretrained(tiny_path, device="cpu")
    engine.complete([Conversation.start(defect_image(seed=1), "Describe the part.")], max_new_tokens=4)
    lengths = prefilled_lengths(engine)
    engine.complete([Conversation.start(defect_image(seed=2), "Is it damaged?")], max_new_tokens=4)
    assert lengths[0] > engine.processor.layout((120, 160)).num_embeddings


def test_choice_probabilities_are_a_distribution(engine):
    conversations = [Conversation.start(defect_image(seed=s), "Defect? Yes or No.") for s in range(3)]
    probabilities = engine.choice_probabilities(conversations, ["Yes", "No"])
    assert len(probabilities) == 3
    for row in probabilities:
        assert set(row) == {"Yes", "No"} and sum(row.values()) == pytest.approx(1.0)
    single = engine.choice_probabilities(conversations[1:2], ["Yes", "No"])[0]
    assert single["Yes"] == pytest.approx(probabilities[1]["Yes"], abs=1e-5)


def test_verdict_has_image_resolution_heatmap_and_consistent_fields(engine):
    image = defect_image(130, 170)
    verdict = inspect(engine, image, max_new_tokens=8)
    assert verdict.heatmap.shape == (130, 170)
    assert 0.0 <= verdict.score <= 1.0
    assert verdict.anomalous == (verdict.score >= engine.model.config.decision.threshold)
    assert verdict.anomalous or verdict.boxes == []


def test_anomalous_verdict_names_boxes_and_defect(tiny_path, monkeypatch):
    engine = LocalEngine.from_pretrained(tiny_path, device="cpu")
    torch.nn.init.constant_(engine.model.anomaly_expert.selector.score_head[2].bias, 30.0)
    turns = []  # (last question, answer) of every completion
    complete = engine.complete

    def recorded(conversations, max_new_tokens=256):
        answers = complete(conversations, max_new_tokens)
        turns.append((conversations[0].messages[-1]["content"], answers[0]))
        return answers

    monkeypatch.setattr(engine, "complete", recorded)
    verdict = inspect(engine, defect_image(), max_new_tokens=4)
    assert verdict.anomalous and verdict.score > 0.99
    assert verdict.boxes and all(b.x1 <= 160 and b.y1 <= 120 for b in verdict.boxes)
    assert [question for question, _ in turns] == [INSPECTION_QUESTION, DEFECT_QUESTION]
    assert verdict.reasoning == turns[0][1].strip() and verdict.defect == (turns[1][1].strip() or None)


def test_cli_inspect_prints_a_valid_verdict_json(tiny_path, image_file, capsys, tmp_path):
    overlay = tmp_path / "overlay.png"
    code = main(
        [
            "inspect",
            image_file,
            "--model",
            str(tiny_path),
            "--json",
            "--max-new-tokens",
            "4",
            "--heatmap-out",
            str(overlay),
        ]
    )
    assert code == 0
    verdict = Verdict.model_validate(json.loads(capsys.readouterr().out))
    assert verdict.heatmap.shape == (120, 160)
    assert overlay.exists()


def test_cli_reports_bad_inputs_without_a_traceback(tiny_path, image_file, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert main(["inspect", str(bad), "--model", str(tiny_path)]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["inspect", image_file, "--model", str(tmp_path / "nowhere")]) == 2
    assert "no such folder, preset" in capsys.readouterr().err


def test_cli_init_tiny_writes_a_loadable_model(tmp_path, capsys):
    assert main(["init-tiny", str(tmp_path / "m"), "--no-roi"]) == 0
    engine = LocalEngine.from_pretrained(tmp_path / "m", device="cpu")
    assert not engine.model.config.roi.enabled
    assert np.isfinite(engine.analyze(defect_image()).score)
