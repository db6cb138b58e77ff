"""lmms-eval: our model as an lmms-eval model and MMAD / VisA-D&R detection as lmms-eval tasks agree with
`anomaly-assistant eval` on the same model and data (the official schema's fixtures, the tiny model).

lmms-eval runs in its own environment ($ASSISTANT_LMMS_PYTHON, set by `./run test`), so each check runs the real
`lmms_eval` command line in a subprocess and compares its results and logged samples with ours.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from assistant.cli import main
from assistant.engine import Conversation, LocalEngine
from eval.lmms import TASKS
from eval.mmad import ANSWERS_FILE, MMADAnswer, summaries
from eval.records import AnswerLog
from eval.visa_dr_scoring import DetectionAnswer, detection_metrics
from tests.helpers import defect_image
from tests.test_eval_mmad import mmad_args, write_mmad
from tests.test_eval_visa_dr import write_visa_dr

LMMS_ENV = "ASSISTANT_LMMS_PYTHON"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lmms_python() -> str:
    python = os.environ.get(LMMS_ENV)
    if not python:
        pytest.skip(f"${LMMS_ENV} is not set (./run test sets it to the lmms-eval environment)")
    return python


def lmms_eval(python: str, output: Path, model_args: str, tasks: str, env: dict[str, str], *extra: str) -> dict:
    """Run `python -m lmms_eval` (4 new tokens, every sample logged); returns {task: (metrics, samples)}."""
    command = [
        python, "-m", "lmms_eval", "--model", "anomaly_assistant", "--model_args", model_args, "--tasks", tasks,
        "--include_path", str(TASKS), "--gen_kwargs", "max_new_tokens=4", "--batch_size", "4",
        "--output_path", str(output), "--log_samples", *extra,
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results_file,) = output.rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"]
    runs = {}
    for task in tasks.split(","):
        (samples_file,) = output.rglob(f"*_samples_{task}.jsonl")
        samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
        runs[task] = (
            {k.split(",")[0]: v for k, v in results[task].items()},
            sorted(samples, key=lambda s: s["doc_id"]),
        )
    return runs


def test_mmad_tasks_equal_eval_mmad_in_process(lmms_python, tiny_path, tmp_path):
    data = write_mmad(tmp_path / "mmad")
    ours = tmp_path / "ours"
    assert main([*mmad_args(data, ours, "--model", str(tiny_path), "--letter-probs"), "--max-side", "512"]) == 0
    records = list(AnswerLog(ours / ANSWERS_FILE, MMADAnswer).load().values())
    tables = summaries(records)
    runs = lmms_eval(
        lmms_python, tmp_path / "lmms", f"pretrained={tiny_path},device=cpu", "mmad,mmad_likelihood",
        {"ANOMALY_ASSISTANT_MMAD": str(data)},
    )  # fmt: skip
    metrics, samples = runs["mmad"]
    # The same prompts, images and answers, scored as generated.
    assert [s["official"]["answer"]["response"] for s in samples] == [r.response for r in records]
    assert metrics["official"] == pytest.approx(tables["official-compatible"].rows["Average"]["Average"])
    assert metrics["strict"] == pytest.approx(tables["strict"].rows["Average"]["Average"])
    likelihood, samples = runs["mmad_likelihood"]
    assert likelihood["letter_likelihood"] == pytest.approx(tables["letter likelihood"].rows["Average"]["Average"])
    for sample, record in zip(samples, records, strict=True):  # a loglikelihood request per option letter
        assert len(sample["filtered_resps"]) == len(record.letter_probs)
        # float32 rounding only: the two batch the requests differently
        assert sample["letter_likelihood"]["answer"]["letter_probs"] == pytest.approx(record.letter_probs, abs=1e-4)


def test_visa_dr_detection_equals_eval_visa_dr_with_the_verdicts_answers(lmms_python, tiny_path, tmp_path):
    detection, _ = write_visa_dr(tmp_path / "data")
    ours = tmp_path / "ours"
    args = ["eval", "visa-dr", "--detection", str(detection), "--output", str(ours), "--max-new-tokens", "4"]
    assert main([*args, "--model", str(tiny_path), "--answer", "verdict"]) == 0
    records = list(AnswerLog(ours / "answers-detection.jsonl", DetectionAnswer).load().values())
    macro = detection_metrics(records)["Macro"]
    runs = lmms_eval(
        lmms_python, tmp_path / "lmms", f"pretrained={tiny_path},answer=verdict", "visa_dr_detection",
        {"ANOMALY_ASSISTANT_VISA_DR": str(detection)},
    )  # fmt: skip
    metrics, samples = runs["visa_dr_detection"]
    assert [s["accuracy"]["answer"]["response"] for s in samples] == [r.response for r in records]
    assert {m: metrics[m] for m in ("accuracy", "precision", "recall", "f1")} == pytest.approx(
        {"accuracy": macro["Acc"], "precision": macro["Prec"], "recall": macro["Rec"], "f1": macro["F1"]}
    )


def test_over_our_servers_api_the_tasks_equal_eval_over_the_same_endpoint(lmms_python, endpoint, tmp_path):
    url, stub = endpoint
    data = write_mmad(tmp_path / "mmad")
    ours = {}
    for shots, task in ((1, "mmad"), (0, "mmad_0shot")):
        args = mmad_args(data, tmp_path / task, "--endpoint", url, "--served-model", "ours", "--shots", str(shots))
        assert main([*args, "--max-side", "512"]) == 0
        ours[task] = list(AnswerLog(tmp_path / task / ANSWERS_FILE, MMADAnswer).load().values())
    asked = list(stub.requests)
    runs = lmms_eval(
        lmms_python, tmp_path / "lmms", f"endpoint={url},served_model=ours", "mmad,mmad_0shot",
        {"ANOMALY_ASSISTANT_MMAD": str(data)},
    )  # fmt: skip
    # The same requests, images (templates only for 1-shot) included; lmms-eval sends them in its own order.
    assert sorted(map(json.dumps, stub.requests[len(asked) :])) == sorted(map(json.dumps, asked))
    for task, records in ours.items():
        metrics, samples = runs[task]
        assert [s["official"]["answer"]["response"] for s in samples] == [r.response for r in records]
        official = summaries(records)["official-compatible"].rows["Average"]["Average"]
        assert metrics["official"] == pytest.approx(official)


MODEL_CHECKS = """
import sys
from assistant.errors import UsageError
from eval.lmms.model import AnomalyAssistant, truncate
assert truncate("Yes.\\n\\nMore", ["\\n\\n", "More"]) == "Yes." and truncate("Yes.", []) == "Yes."
for args in ({"pretrained": sys.argv[1], "colour": "red"}, {"pretrained": sys.argv[1], "answer": "loud"}):
    try:
        AnomalyAssistant(**args)
    except UsageError as error:
        print(error)
remote = AnomalyAssistant(endpoint=sys.argv[2], served_model="ours")
try:
    remote.loglikelihood([])
except UsageError as error:
    print(error)
"""


def test_bad_task_data_and_model_args_are_named(lmms_python, tiny_path, endpoint, tmp_path):
    missing = tmp_path / "nowhere.json"
    command = [
        lmms_python, "-m", "lmms_eval", "--model", "anomaly_assistant", "--model_args", f"pretrained={tiny_path}",
        "--tasks", "mmad", "--include_path", str(TASKS), "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "ANOMALY_ASSISTANT_MMAD": str(missing)}
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert f"$ANOMALY_ASSISTANT_MMAD={missing}: no such file" in done.stdout + done.stderr
    checks = [lmms_python, "-c", MODEL_CHECKS, str(tiny_path), endpoint[0]]
    done = subprocess.run(checks, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "anomaly_assistant has no model_args colour",
        "answer='loud': give one of chat, verdict",
        "loglikelihood requests need the in-process model (model_args pretrained=...): an OpenAI-compatible "
        "endpoint returns no log-probabilities of given text",
    ]


# -- the log-likelihood requests, in the main environment -------------------------------------------------------


def teacher_forced(engine: LocalEngine, conversation: Conversation, text: str) -> tuple[float, bool]:
    """By hand: prompt and continuation as one sequence; the continuation tokens' log-softmax summed, and whether
    each is the argmax."""
    target = torch.tensor(engine.processor.tokenizer(text, add_special_tokens=False).input_ids)
    with torch.inference_mode():
        prompt = engine._prompt_embeddings([conversation])
        embeds = torch.cat([prompt.embeds, engine.model.get_input_embeddings()(target[None])], dim=1)
        logits = engine.model(inputs_embeds=embeds).logits[0, prompt.embeds.shape[1] - 1 : -1].log_softmax(-1)
    return float(logits.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())


def test_continuation_logprobs_are_the_teacher_forced_log_probabilities(tiny_path):
    engine = LocalEngine.from_pretrained(tiny_path, device="cpu")
    tokenizer = engine.processor.tokenizer
    image = defect_image(48, 64, seed=3)
    conversations = [Conversation.start(image, "Is there a defect?"), Conversation.start(None, "Say something.")]
    texts = ["No", " a bright scratch near the top"]
    for conversation, text in zip(conversations, texts, strict=True):
        (scored,) = engine.continuation_logprobs([conversation], [text])
        expected = teacher_forced(engine, conversation, text)
        assert scored[0] == pytest.approx(expected[0], abs=1e-4) and scored[1] == expected[1]
    # A batch (padded prompts and continuations of different lengths) scores each row as it scores alone.
    batched = engine.continuation_logprobs(conversations, texts)
    alone = [engine.continuation_logprobs([c], [t])[0] for c, t in zip(conversations, texts, strict=True)]
    assert [b[0] for b in batched] == pytest.approx([a[0] for a in alone], abs=1e-4)
    assert [b[1] for b in batched] == [a[1] for a in alone]
    # The greedy next token is greedy (where its text encodes back to that token: a random model's may not).
    checked = 0
    for question in ("Is there a defect?", "Describe it.", "What is this?", "Say something.", "Where?"):
        conversation = Conversation.start(image, question)
        with torch.inference_mode():
            prompt = engine._prompt_embeddings([conversation])
            token = int(engine.model(inputs_embeds=prompt.embeds).logits[0, -1].argmax())
        text = tokenizer.decode([token])
        if tokenizer(text, add_special_tokens=False).input_ids == [token]:
            assert engine.continuation_logprobs([conversation], [text])[0][1]
            checked += 1
    assert checked
    # Single letters: their likelihoods renormalised are `choice_probabilities` (MMAD's letter likelihood).
    letters = ["A", "B", "C"]
    scores = engine.continuation_logprobs([conversations[0]] * 3, letters)
    total = sum(torch.tensor(s[0]).exp() for s in scores)
    probabilities = engine.choice_probabilities([conversations[0]], letters)[0]
    assert [float(torch.tensor(s[0]).exp() / total) for s in scores] == pytest.approx(
        [probabilities[x] for x in letters], abs=1e-5
    )
