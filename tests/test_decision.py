"""One decision per answer: the fused, calibrated score decides once; every text agrees with it."""

import itertools
import math

import numpy as np
import pytest

from assistant.config import AssistantConfig, DecisionConfig, Settings, SettingsError
from assistant.engine import Conversation, LocalEngine, agreeing_answers, agreeing_stream, inspect, yes_probability
from assistant.factory import tiny_assistant
from assistant.prompts import DETECTION_QUESTION, INSPECTION_QUESTION, stated_decision, yes_means_anomalous
from tests.helpers import defect_image

# Both sources count, and the threshold sits where tiny random models land on both sides of it.
FUSED = Settings(decision={"expert_weight": 1.0, "llm_weight": 2.0, "bias": 0.0, "threshold": 0.5})


def test_fusion_rule_and_old_checkpoint_keys():
    decision = DecisionConfig(expert_weight=0.5, llm_weight=2.0, bias=-1.0)
    p_yes = 0.8
    expected = 1 / (1 + math.exp(-(0.5 * 1.5 + 2.0 * math.log(0.8 / 0.2) - 1.0)))
    assert decision.score(1.5, p_yes) == pytest.approx(expected)
    assert decision.score(1.5, None) == pytest.approx(1 / (1 + math.exp(-(0.75 - 1.0))))  # no LLM term
    assert not decision.calibrated and DecisionConfig(fitted_on="val").calibrated
    # a checkpoint written before `decision` existed keeps its Platt scaling and threshold
    old = AssistantConfig(expert={"score_scale": 0.5, "score_shift": -1.25, "decision_threshold": 0.3})
    assert (old.decision.expert_weight, old.decision.bias, old.decision.threshold) == (0.5, -1.25, 0.3)
    assert "score_scale" not in old.to_dict()["expert"] and old.to_dict()["decision"]["threshold"] == 0.3
    assert old.decision.calibrated and "_moved_decision" not in old.to_dict()  # it was Platt-scaled
    old.update({"expert": {"decision_threshold": 0.7}})  # the old key after construction: still the decision's
    assert old.decision.threshold == 0.7 and old.decision.expert_weight == 0.5
    with pytest.raises(SettingsError, match=r"^expert\.decision_threshold: moved to decision\.threshold$"):
        Settings.parse(["expert.decision_threshold=0.4"])


@pytest.fixture(scope="module")
def engines():
    """Tiny random models of several seeds: their expert and LLM disagree often."""
    built = []
    for seed in range(3):
        model, processor = tiny_assistant(seed=seed)
        model.config.apply_settings(FUSED)
        built.append(LocalEngine(model, processor))
    return built


def test_verdict_is_the_fused_decision_of_both_sources(engines):
    for engine in engines:
        image = defect_image(seed=3)
        verdict = engine.analyze(image)
        logit = float(engine.encode([image]).analysis.logits[0])
        p_yes = yes_probability(engine, image)
        assert verdict.llm_yes_probability == pytest.approx(p_yes, abs=1e-6)
        assert verdict.expert_score == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-6)
        assert verdict.score == pytest.approx(engine.model.config.decision.score(logit, p_yes), abs=1e-6)
        assert verdict.anomalous == (verdict.score >= 0.5)
        assert verdict.in_domain is None and verdict.domain_status == "domain unknown"  # no statistics


def test_no_text_contradicts_the_verdict_over_many_images_and_models(engines):
    """Random tiny models answer Yes or No at random: the text must still follow the decision."""
    outcomes = set()
    for engine, seed in itertools.product(engines, range(6)):
        image = defect_image(seed=seed, defect=seed % 2 == 0)
        verdict = inspect(engine, image, max_new_tokens=6)
        assert stated_decision(verdict.reasoning) == verdict.anomalous, verdict.reasoning
        assert verdict.anomalous == (verdict.score >= engine.model.config.decision.threshold)
        outcomes.add(verdict.anomalous)
    assert outcomes == {True, False}  # both decisions occurred, so both directions were checked


def test_follow_ups_may_not_flip_the_decision(engines):
    engine = engines[0]
    image = defect_image(seed=1)
    for anomalous in (True, False):
        conversation = Conversation.start(image, INSPECTION_QUESTION).answer("Yes." if anomalous else "No.")
        conversation.ask(DETECTION_QUESTION)  # asked again: answered as the decision
        streamed = "".join(agreeing_stream(engine, conversation, anomalous, max_new_tokens=4))
        assert stated_decision(streamed) == anomalous
        (batched,) = agreeing_answers(engine, [conversation], [anomalous], max_new_tokens=4)
        assert stated_decision(batched) == anomalous


class Scripted:
    """An engine whose free answers open with a fixed word: shows that a flip is generated again."""

    def __init__(self, free_answer: str):
        self.free_answer = free_answer
        self.prompts: list[Conversation] = []

    def complete(self, conversations, max_new_tokens=256):
        self.prompts += conversations
        return [c.answer_prefix + (" it is." if c.answer_prefix else self.free_answer) for c in conversations]

    def stream(self, conversation, max_new_tokens=256):
        self.prompts.append(conversation)
        text = conversation.answer_prefix + (" it is." if conversation.answer_prefix else self.free_answer)
        yield from (text[i : i + 2] for i in range(0, len(text), 2))


@pytest.mark.parametrize(
    "question, free_answer, shown",
    [
        ("Is anything wrong with it?", "No, nothing is wrong.", "Yes, it is."),  # flipped: generated again
        ("Is anything wrong with it?", "The fabric is grey.", "The fabric is grey."),  # no Yes/No: kept
        ("Is this part OK?", "Yes, it looks fine.", "No, it is."),  # "Yes" means normal here: a flip too
        ("Is this part OK?", "No, it is not.", "No, it is not."),  # agrees with the anomalous verdict
        ("What colour is it?", "No, grey.", "No, grey."),  # not a question about the decision: free
    ],
)
def test_a_contradicting_follow_up_is_generated_again_from_the_decision(question, free_answer, shown):
    conversation = Conversation.start(defect_image(), question)
    batched = agreeing_answers(Scripted(free_answer), [conversation], [True])[0]
    streamed = "".join(agreeing_stream(Scripted(free_answer), conversation, True))
    assert batched == streamed == shown


def test_the_question_says_what_yes_means():
    assert [yes_means_anomalous(q) for q in ("Is there a defect?", "Is it OK?", "Is it normal and defect-free?")] == [
        True,
        False,
        None,
    ]
    assert yes_means_anomalous("Describe the fabric.") is None and yes_means_anomalous(INSPECTION_QUESTION) is True
    assert [stated_decision(a) for a in ("**No** it is fine", "Yes2", "Nothing", "yes.")] == [False, True, None, True]


def test_fitted_decision_is_written_and_used(tiny_path, tmp_path):
    import json
    import shutil

    from assistant.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    for index in range(4):
        for folder, defect in (("good", False), ("scratch", True)):
            path = tmp_path / "data" / "part" / "val" / folder / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            defect_image(seed=index + 10 * defect, defect=defect).save(path)
    args = ["eval", "calibrate", "--data", str(tmp_path / "data"), "--model", str(model), "--device", "cpu"]
    assert main([*args, "--write"]) == 0
    decision = json.loads((model / "config.json").read_text())["decision"]
    assert decision["fitted_on"].startswith("data [val], 8 images (4 anomalous)")
    assert decision["llm_weight"] != 0.0 and decision["expert_weight"] != 1.0
    engine = LocalEngine.from_pretrained(model, device="cpu")
    image = defect_image(seed=2)
    logit = float(engine.encode([image]).analysis.logits[0])
    fused = 1 / (1 + np.exp(-(decision["expert_weight"] * logit + decision["bias"]
                               + decision["llm_weight"] * np.log((p := yes_probability(engine, image)) / (1 - p)))))
    assert engine.analyze(image).score == pytest.approx(float(fused), abs=1e-5)
