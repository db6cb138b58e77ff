"""Product profiles on every surface: `enroll`/`profiles`/`inspect --profile`/`chat --profile` on the command line,
the endpoint client, the app's handler and picker, and the server's routes (with the serving interpreter).

One copy of the tiny model gets a profile "parts" enrolled from six drawn textures (`enrolled`); the original
tiny model is never written to.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import gradio as gr
import pytest
import torch
from gradio_client import Client, handle_file

from assistant.cli import main
from assistant.client import EndpointEngine, EndpointError
from assistant.clip.engine import ClipEngine
from assistant.config import Settings
from assistant.engine import LocalEngine
from assistant.errors import UsageError
from assistant.image_io import load_image
from assistant.profiles import Profile, image_side_fingerprint, profile_names
from assistant.serve.process import free_port
from assistant.ui import build_demo, launch, load_backend
from assistant.ui.handlers import NO_PROFILE, PROFILE_AND_REFERENCE, ChatHandlers
from assistant.verdict import Verdict
from tests.helpers import ROOT, defect_image, texture

NAME = "parts"


def no_progress(*args, **kwargs) -> None:
    pass


def run(argv: list[str]) -> tuple[int, str, str]:
    """`main(argv)` with its exit code, stdout and stderr (for module-scoped fixtures, where capsys is not)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """The one `error: ...` line (a progress bar may come before it), asserted to be the only thing after it."""
    message = err[err.find("error: ") :]
    assert message.startswith("error: ") and message.count("\n") == 1 and message.endswith("\n"), err
    return message


@pytest.fixture(scope="module")
def normals(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("normals")
    for seed in range(6):
        texture(seed).save(folder / f"normal_{seed}.png")
    return folder


@pytest.fixture(scope="module")
def enrolled(tiny_path, normals, tmp_path_factory) -> tuple[Path, str]:
    """(a copy of the tiny model with the profile enrolled by the CLI, what `enroll` printed)."""
    model = tmp_path_factory.mktemp("profiled") / "tiny"
    shutil.copytree(tiny_path, model)
    code, out, err = run(["enroll", NAME, "--images", str(normals), "--model", str(model), "--source", "drawn"])
    assert code == 0, err
    return model, out


@pytest.fixture(scope="module")
def other_model(enrolled, tmp_path_factory) -> Path:
    """Another tiny model (seed 1) holding a copy of the first model's profile."""
    model = tmp_path_factory.mktemp("other") / "tiny"
    assert run(["init-tiny", str(model), "--seed", "1"])[0] == 0
    shutil.copytree(enrolled[0] / "profiles" / NAME, model / "profiles" / NAME)
    return model


@pytest.fixture(scope="module")
def part(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("parts") / "part.png"
    defect_image().save(path)
    return path


@pytest.fixture(scope="module")
def engine(enrolled) -> LocalEngine:
    return LocalEngine.from_pretrained(enrolled[0], device="cpu")


# -- command line ---------------------------------------------------------------------------------------------


def test_enroll_saves_the_profile_next_to_the_model_and_profiles_lists_it(enrolled, tiny_path, capsys):
    model, printed = enrolled
    profile = Profile.load(model, NAME)
    assert printed.splitlines() == [profile.describe(), str(model / "profiles" / NAME)]
    assert profile.num_images == 6 and profile.source == "drawn" and profile.false_alarm_rate == 0.05
    assert profile_names(model) == [NAME] and profile_names(tiny_path) == []
    assert main(["profiles", "--model", str(model)]) == 0
    assert capsys.readouterr().out.splitlines() == [profile.describe()]
    assert main(["profiles", "--model", str(tiny_path)]) == 0
    listed = capsys.readouterr().out
    assert "no product profiles" in listed
    assert f"anomaly-assistant enroll NAME --images DIR --model {tiny_path}" in listed


def test_inspect_with_the_profile_compares_with_its_normal_images(enrolled, part, capsys):
    model, _ = enrolled
    common = ["inspect", str(part), "--model", str(model), "--max-new-tokens", "2", "--json"]
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main([*common, "--profile", NAME]) == 0
    profiled = capsys.readouterr().out
    zero_shot, verdict = Verdict.model_validate(json.loads(plain)), Verdict.model_validate(json.loads(profiled))
    assert zero_shot.reference_distance is None and verdict.reference_distance is not None
    assert profiled != plain
    threshold = Profile.load(model, NAME).threshold
    assert verdict.anomalous == (verdict.score >= threshold)  # the profile's own threshold decides
    assert zero_shot.in_domain is None and verdict.in_domain is not None  # the profile's domain statistics
    assert main(common[:-1] + ["--profile", NAME]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"reference distance {verdict.reference_distance:.3f}" in lines[0]
    assert lines[1].startswith(f"profile: {NAME} ")


def test_chat_with_the_profile_decides_with_it(enrolled, part, capsys, monkeypatch):
    model, _ = enrolled

    def no_more_questions(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", no_more_questions)
    assert main(["chat", str(part), "--model", str(model), "--profile", NAME]) == 0
    out = capsys.readouterr().out
    assert "reference distance" in out and f"profile: {NAME} " in out
    assert main(["chat", str(part), "--model", str(model)]) == 0
    assert "reference distance" not in capsys.readouterr().out


@pytest.mark.parametrize("command", ["inspect", "chat"])
def test_a_profile_with_references_is_refused_before_the_model_loads(enrolled, part, command, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(LocalEngine, "from_pretrained", no_loading)
    argv = [command, str(part), "--model", str(enrolled[0]), "--profile", NAME, "--reference", str(part)]
    assert main(argv) == 2
    assert error_line(capsys.readouterr().err) == "error: give normal --reference images or a --profile, not both\n"


def test_an_unknown_profile_is_one_line_naming_the_known_ones(enrolled, part, capsys):
    assert main(["inspect", str(part), "--model", str(enrolled[0]), "--profile", "gears", "--max-new-tokens", "2"]) == 2
    message = error_line(capsys.readouterr().err)
    assert "no profile 'gears'" in message and f"known: {NAME}" in message


def test_another_models_profile_is_refused(other_model, part, capsys):
    assert main(["inspect", str(part), "--model", str(other_model), "--profile", NAME, "--max-new-tokens", "2"]) == 2
    assert "was made with another model" in error_line(capsys.readouterr().err)


def test_enrolling_a_name_again_needs_replace(enrolled, normals, tmp_path, capsys):
    model = tmp_path / "tiny"
    shutil.copytree(enrolled[0], model)  # the module's profile stays as it is
    before = Profile.load(model, NAME)
    assert main(["enroll", NAME, "--images", str(normals), "--model", str(model)]) == 2
    message = error_line(capsys.readouterr().err)
    assert "already has a profile 'parts'" in message and "--replace" in message
    assert Profile.load(model, NAME).created == before.created  # untouched
    three = [str(normals / f"normal_{seed}.png") for seed in range(3)]
    assert main(["enroll", NAME, "--images", *three, "--model", str(model), "--replace"]) == 0
    assert Profile.load(model, NAME).num_images == 3 and profile_names(model) == [NAME]


def bad_enrolments(normals: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (argv, a fragment of the one-line error)."""
    return {
        "bad name": (["enroll", "my parts", "--images", str(normals)], "profile name 'my parts'"),
        "missing folder": (["enroll", "x", "--images", str(normals / "nowhere")], "no such file or folder"),
        "too few images": (["enroll", "x", "--images", str(normals / "normal_0.png")], "at least 2 normal images"),
        "no model": (["enroll", "x", "--images", str(normals), "--model", str(normals)], "not a model folder"),
    }


@pytest.mark.parametrize("case", ["bad name", "missing folder", "too few images", "no model"])
def test_bad_enrolments_are_one_line_and_exit_code_2(enrolled, normals, case, capsys):
    model, _ = enrolled
    argv, fragment = bad_enrolments(normals, model)[case]
    if "--model" not in argv:
        argv = [*argv, "--model", str(model)]
    assert main(argv) == 2
    assert fragment in error_line(capsys.readouterr().err)
    assert profile_names(model) == [NAME]  # nothing half-made


def test_a_false_alarm_rate_outside_0_1_is_refused(enrolled, normals, capsys):
    argv = ["enroll", "x", "--images", str(normals), "--model", str(enrolled[0]), "--false-alarm-rate", "1.5"]
    with pytest.raises(SystemExit) as exit_code:
        main(argv)
    assert exit_code.value.code == 2 and "1.5 is not within (0, 1)" in capsys.readouterr().err


def test_a_profile_made_in_float32_is_accepted_by_the_same_model_in_bfloat16(engine):
    """The fingerprint must not depend on the dtype the model runs in (CPU float32, GPU or server bfloat16)."""
    assert image_side_fingerprint(copy.deepcopy(engine.model).to(torch.bfloat16)) == image_side_fingerprint(
        engine.model
    )


def test_a_profile_does_not_depend_on_how_references_read_in_the_prompt(engine):
    """`reference.prompt` reaches only the language model: a profile stays valid when it changes."""
    model = copy.deepcopy(engine.model)
    model.config.apply_settings(Settings(reference={"prompt": "expert"}))
    assert model.config.reference.prompt != engine.model.config.reference.prompt
    assert image_side_fingerprint(model) == image_side_fingerprint(engine.model)
    model.config.apply_settings(Settings(reference={"shift": 0.123}))  # what the verdict reads still counts
    assert image_side_fingerprint(model) != image_side_fingerprint(engine.model)


# -- the endpoint client and the CLIP engine ------------------------------------------------------------------


def test_the_client_sends_the_profile_name_and_refuses_a_server_that_ignores_it(endpoint, part, capsys):
    url, stub = endpoint
    client = EndpointEngine(url, "stub", max_retries=0, timeout=10)
    client.analyze(part)
    assert "profile" not in stub.requests[-1]  # a server that predates profiles sees the request it knows
    with pytest.raises(EndpointError, match="ignored the profile 'parts'"):
        client.analyze(part, profile=NAME)  # the stub answers without reference evidence
    assert stub.requests[-1]["profile"] == NAME and stub.requests[-1]["reference_urls"] == []
    assert client.profiles() is None  # the stub has no /profiles route
    argv = ["inspect", str(part), "--endpoint", url, "--served-model", "stub", "--profile", NAME, "--json"]
    assert main(argv) == 2
    assert "ignored the profile" in error_line(capsys.readouterr().err)
    assert stub.requests[-1]["profile"] == NAME


def test_the_clip_engine_refuses_a_profile():
    with pytest.raises(UsageError, match="no product profiles"):
        ClipEngine(expert=None).analyze(defect_image(), profile=NAME)


# -- the app ------------------------------------------------------------------------------------------------


def test_the_app_handler_decides_with_the_chosen_profile(engine, part):
    handlers = ChatHandlers(engine, max_new_tokens=2)
    upload = {"path": str(part)}
    profiled = list(handlers.chat("Is there a defect?", upload, None, 0.5, NAME, None, no_progress))[-1]
    session = profiled[-1]
    assert session.profile == NAME and session.preview.verdict.reference_distance is not None
    expected = engine.analyze(part, profile=NAME)
    assert session.preview.verdict.reference_distance == expected.reference_distance
    assert session.preview.verdict.score == expected.score
    assert f"product profile **{NAME}**" in profiled[3]  # the notice beside the verdict
    follow_up = list(handlers.chat("Where?", upload, None, 0.5, NAME, session, no_progress))[-1][-1]
    assert len(follow_up.messages) == 4  # same uploads, same profile: the conversation goes on
    plain = list(handlers.chat("Where?", upload, None, 0.5, NO_PROFILE, follow_up, no_progress))[-1]
    assert len(plain[-1].messages) == 2 and plain[-1].profile is None  # another profile: a new conversation
    assert plain[-1].preview.verdict.reference_distance is None and "product profile" not in plain[3]


def test_the_app_refuses_a_profile_with_a_reference_and_an_unknown_profile_with_a_message(engine, part):
    handlers = ChatHandlers(engine, max_new_tokens=2)
    upload = {"path": str(part)}
    with pytest.raises(gr.Error) as error:
        list(handlers.chat("Is there a defect?", upload, upload, 0.5, NAME, None, no_progress))
    assert error.value.message == PROFILE_AND_REFERENCE
    with pytest.raises(gr.Error, match="no profile 'gears'") as error:
        list(handlers.chat("Is there a defect?", upload, None, 0.5, "gears", None, no_progress))


def picker(demo: gr.Blocks) -> dict:
    return next(c["props"] for c in demo.config["components"] if c["props"].get("elem_id") == "profile")


def test_the_picker_lists_the_models_profiles_and_hides_without_any(enrolled, tiny_path):
    backend = load_backend(model=str(enrolled[0]), device="cpu")
    assert backend.profiles == (NAME,)
    props = picker(build_demo(backend.engine, profiles=backend.profiles))
    assert props["visible"] is True and props["label"] == "Product profile" and props["value"] == NO_PROFILE
    assert [tuple(choice) for choice in props["choices"]] == [("none", NO_PROFILE), (NAME, NAME)]
    assert load_backend(model=str(tiny_path), device="cpu").profiles == ()
    assert picker(build_demo(backend.engine))["visible"] is False


def test_the_chat_api_takes_the_profile_after_the_opacity(engine, part):
    demo = build_demo(engine, max_new_tokens=2, profiles=(NAME,))
    try:
        client = Client(launch(demo, port=free_port(), block=False), verbose=False, download_files=False)
        outputs = client.predict("Is there a defect?", handle_file(str(part)), None, 0.5, NAME, api_name="/chat")
        assert f"product profile **{NAME}**" in outputs[3]
        outputs = client.predict("Is there a defect?", handle_file(str(part)), None, 0.5, api_name="/chat")
        assert "product profile" not in outputs[3]  # the default: none
    finally:
        demo.close()


# -- the server (routes in-process with the serving interpreter; no vLLM engine) -------------------------------


@pytest.mark.vllm
def test_the_server_lists_profiles_and_inspects_with_one(serving_python, enrolled, other_model, part, engine):
    script = ROOT / "tests" / "serve_profile_checks.py"
    result = subprocess.run(
        [serving_python, str(script), str(enrolled[0]), str(other_model), str(part)],
        cwd=ROOT, capture_output=True, text=True, check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["schema"]["description"].startswith("the name of a product profile")
    assert report["profiles"] == {
        "object": "list",
        "data": [{"name": NAME, "description": Profile.load(enrolled[0], NAME).describe()}],
    }
    inspected = report["inspect"]
    expected = engine.decide(load_image(part), [], 0.5, engine.profile(NAME))  # the script's fixed P(Yes)
    assert inspected["profile"]["status"] == 200
    assert inspected["profile"]["reference_distance"] == pytest.approx(expected.reference_distance, abs=1e-4)
    assert inspected["profile"]["score"] == pytest.approx(expected.score, abs=1e-4)
    assert inspected["profile"]["anomalous"] == expected.anomalous
    assert inspected["no profile"]["status"] == 200 and inspected["no profile"]["reference_distance"] is None
    for case, fragment in [
        ("unknown", "no profile 'nope'"),
        ("bad name", "profile name '../up'"),
        ("with references", "give normal reference images or a profile, not both"),
        ("other model", "was made with another model"),
    ]:
        answer = inspected[case]
        assert (answer["status"], answer["param"]) == (400, "profile") and fragment in answer["message"], case

