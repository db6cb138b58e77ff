"""The command line as a whole: `--help` loads no model code, and every kind of bad input ends with one line.

Each family of user errors (images, data files, benchmark files, training configs, official checkpoints,
endpoints, usage) derives from `assistant.errors.AssistantError`; `main` prints it as `error: ...` with
exit code 2 instead of a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from assistant.cli import main
from assistant.client import data_url
from assistant.engine import LocalEngine, inspect
from assistant.image_io import load_image
from assistant.serve.process import free_port
from tests.helpers import ROOT, defect_image, stub_answer, stub_verdict

HEAVY_MODULES = ("torch", "transformers", "sklearn", "gradio", "open_clip", "vllm")


def test_building_the_parser_imports_no_model_code():
    probe = (
        "import sys; from assistant.cli import build_parser; build_parser(); "
        f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_bad_data_file_is_one_line_and_exit_code_2_from_the_console(tmp_path):
    broken = tmp_path / "train.json"
    broken.write_text('[{"id": 1, "conversations": [}')
    result = subprocess.run(
        [sys.executable, "-m", "assistant", "data", "check", str(broken)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {broken}: not valid JSON (line 1, column 30: Expecting value)\n"


def write_visa_detection(root) -> str:
    """A one-item VisA-D&R detection file in the official layout (images under the JSON folder's parent)."""
    (root / "VisA" / "candle").mkdir(parents=True)
    defect_image(40, 56).save(root / "VisA" / "candle" / "000.png")
    path = root / "VisA" / "test_data.json"
    path.write_text(json.dumps([{"image": "VisA/candle/000.png", "anomaly": True}]))
    return str(path)


def bad_inputs(tmp_path, tiny_path) -> dict[str, tuple[list[str], str]]:
    """family -> (argv, a fragment of the expected message)."""
    not_image, part = tmp_path / "notes.png", tmp_path / "part.png"
    not_image.write_text("text, not a picture")
    defect_image().save(part)
    broken_json = tmp_path / "broken.json"
    broken_json.write_text('{"a.png": ')
    config = tmp_path / "typo.yaml"
    config.write_text("model: {tiny: true}\ndata: {folders: []}\nrun: {max_step: 3}\n")
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    model = ["--model", str(tiny_path)]
    return {
        "image": (["inspect", str(not_image), *model], "not a recognised image format"),
        "usage": (["inspect", str(part), "--model", str(tmp_path / "nowhere")], "no such folder, preset"),
        "data file": (["data", "check", str(broken_json)], "not valid JSON"),
        "benchmark file": (["eval", "mmad", "--data", str(broken_json), *model], "MMAD file"),
        "missing config": (["train", "expert", "--config", str(tmp_path / "missing.yaml")], "config file not found"),
        "config key": (["train", "expert", "--config", str(config)], "run.max_step: Extra inputs are not permitted"),
        "checkpoint": (["convert", "--llava", str(tmp_path), "--output", str(tmp_path / "out")], "no config.json"),
        "endpoint down": (
            ["eval", "visa-dr", "--detection", write_visa_detection(tmp_path), "--endpoint", closed]
            + ["--served-model", "m", "--output", str(tmp_path / "eval")],
            f"cannot reach {closed}",
        ),
        "endpoint flags": (
            ["eval", "zeroshot", "--data", str(tmp_path), "--endpoint", closed],
            "--endpoint needs --served-model",
        ),
        "inspect endpoint down": (
            ["inspect", str(part), "--endpoint", closed, "--served-model", "m", "--timeout", "5"],
            f"cannot reach {closed}",
        ),
        "inspect endpoint flags": (
            [
                "inspect", str(part), "--endpoint", closed, "--served-model", "m",
                "--expert", "clip", "--clip-model", "x",
            ],
            "drop the CLIP options",
        ),
    }


FAMILIES = [
    "image",
    "usage",
    "data file",
    "benchmark file",
    "missing config",
    "config key",
    "checkpoint",
    "endpoint down",
    "endpoint flags",
    "inspect endpoint down",
    "inspect endpoint flags",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_input_exits_2_with_one_line(family, tmp_path, tiny_path, capsys):
    argv, fragment = bad_inputs(tmp_path, tiny_path)[family]
    assert main(argv) == 2
    err = capsys.readouterr().err
    message = err[err.find("error: ") :]  # a progress bar may come first
    assert message.startswith("error: ") and message.count("\n") == 1 and message.endswith("\n"), err
    assert fragment in message


def test_inspect_through_an_endpoint_prints_the_served_verdict(endpoint, tmp_path, capsys):
    url, stub = endpoint
    part = tmp_path / "part.png"
    defect_image().save(part)
    assert main(["inspect", str(part), "--endpoint", url, "--served-model", "stub", "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    expected = stub_verdict(data_url(load_image(part)))
    assert verdict["anomalous"] and verdict["score"] == pytest.approx(expected["score"])
    # /inspect first, then the chat answer: the stub ignores the opening it is given to continue, the client keeps it
    assert verdict["reasoning"] == "Yes," + stub_answer(stub.requests[1])
    assert stub.requests[1]["continue_final_message"] and stub.requests[1]["messages"][-1]["content"] == "Yes,"
    assert [request.get("image_url") is not None for request in stub.requests[:2]] == [True, False]


def test_an_unexpected_failure_is_one_line_and_exit_code_1_with_the_traceback_behind_debug(tiny_path, tmp_path):
    """A bug (here: the engine's analysis raising) must not print a traceback at a user; --debug shows it."""
    part = tmp_path / "part.png"
    defect_image().save(part)
    probe = (
        "import sys; from assistant.engine import LocalEngine; from assistant.cli import main\n"
        "def broken(self, *args, **kwargs):\n"
        "    raise RuntimeError('tensor a (3) must match tensor b (4)\\nat dimension 1')\n"
        "LocalEngine.analyze = broken\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    argv = ["inspect", str(part), "--model", str(tiny_path)]
    result = subprocess.run([sys.executable, "-c", probe, *argv], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (  # after the weight loader's progress bar
        "error: RuntimeError: tensor a (3) must match tensor b (4) (`anomaly-assistant --debug inspect ...` shows "
        "the traceback)"
    )
    debug = subprocess.run(
        [sys.executable, "-c", probe, "--debug", *argv], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_a_closed_pipe_ends_quietly(tiny_path, tmp_path):
    part = tmp_path / "part.png"
    defect_image(400, 600).save(part)
    verdict = inspect(LocalEngine.from_pretrained(tiny_path, device="cpu"), load_image(part), max_new_tokens=2)
    assert len(verdict.model_dump_json()) > 4 * 65536  # more than a pipe holds: the write must fail once head exits
    command = f"{sys.executable} -m assistant inspect {part} --model {tiny_path} --json --max-new-tokens 2 | head -c 10"
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.stdout == '{"anomalou' and "Error" not in result.stderr and "Traceback" not in result.stderr
    assert result.returncode == 0
